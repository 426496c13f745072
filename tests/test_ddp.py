"""One DistributedDataParallel step (gloo, 2 CPU processes) equals a single-process step."""
import os
import sys
import traceback

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

WORLD = 2
TIMEOUT_S = 60


def _model():
    from cupy_localrel.adapters.torch.layers import LocalRelation2d, SASA2d
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        LocalRelation2d(8, kernel_size=3, m=4),
        SASA2d(8, 8, kernel_size=3, heads=2, stride=2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(4 * WORLD, 1, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (4 * WORLD,), generator=g))


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def _worker(rank, out_dir):
    import datetime
    torch.set_num_threads(1)
    # A file store rather than a TCP store: with TCP, rank 0 hosts the store server, and
    # when it exited while rank 1 was still tearing down, rank 1 aborted (seen once in CI:
    # "terminate called without an active exception", exit code -6).
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "store"),
                            rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    code = 1
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        x, y = _batch()
        shard = slice(rank * 4, (rank + 1) * 4)
        _loss(model, x[shard], y[shard]).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        if rank == 0:
            torch.save(grads, os.path.join(out_dir, "ddp_grads.pt"))
        dist.barrier()  # nobody tears down while the other rank still communicates
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        dist.destroy_process_group()
        # The exit code says whether the step worked; skip the interpreter's teardown,
        # where torch.distributed's own threads were the ones that aborted.
        sys.stderr.flush()
        os._exit(code)


def test_ddp_gradients_equal_single_process(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(rank, str(tmp_path)), daemon=True)
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
        p.join(5)
    assert not alive, "DDP workers timed out"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]

    ddp_grads = torch.load(tmp_path / "ddp_grads.pt", weights_only=True)
    model = _model()
    x, y = _batch()
    _loss(model, x, y).backward()  # mean over the global batch = DDP's average of shard means
    for got, want in zip(ddp_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
