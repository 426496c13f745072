"""The benchmark baselines compute what ours computes (values, not timings; tiny shapes).

Each baseline of ``benchmarks/baselines.py`` is compared with our NumPy reference on the
same float64 inputs, forward and gradients, so that the benchmarks compare equal work.
"""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import baselines as bl  # noqa: E402

UNFOLD = ["lrnet-unfold", "sasa-seed-unfold", "sasa-unfold"]
SHAPES = [dict(B=2, C=16, H=9, W=11, k=5), dict(B=1, C=16, H=4, W=3, k=7)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s['H']}x{s['W']}k{s['k']}")
@pytest.mark.parametrize("baseline", UNFOLD)
def test_unfold_baseline_equals_ours(baseline, shape):
    case = bl.make_case(baseline, dtype=torch.float64, **shape)
    assert bl.check_forward(case, tol=1e-10) <= 1e-10


@pytest.mark.parametrize("baseline", UNFOLD)
def test_unfold_baseline_gradients_equal_ours(baseline):
    case = bl.make_case(baseline, 2, 16, 7, 6, 3, dtype=torch.float64)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in case.inputs.items()}
    out = case.run_baseline(leaves)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    # Ours through the canonical call, differentiated w.r.t. the canonical tensors, then
    # mapped back to the baseline's arguments by torch's autograd on the (tiny) mapping.
    canon = case.canonical(leaves)
    a = {n: (v.detach().numpy() if isinstance(v, torch.Tensor) else v) for n, v in canon.items()}
    ours_out, g = bl.ours_forward_backward(a, grad.numpy())
    assert bl.rel_error(out.detach(), ours_out) <= 1e-10
    names = [n for n in ("q", "k", "v", "bias", "rel") if canon[n] is not None]
    torch.autograd.backward([canon[n] for n in names],
                            [torch.from_numpy(np.ascontiguousarray(getattr(g, n)))
                             for n in names])
    ours_grads = {n: t.grad.clone() for n, t in leaves.items()}
    for t in leaves.values():
        t.grad = None
    out.backward(grad)
    for n, t in leaves.items():
        assert bl.rel_error(t.grad, ours_grads[n]) <= 1e-9, n


@pytest.mark.slow  # importing FlexAttention's machinery takes seconds on a small CPU
@pytest.mark.parametrize("baseline", ["lrnet-flex", "sasa-flex"])
def test_flex_baseline_equals_ours_eager(baseline):
    """FlexAttention's mask/score mods, run eagerly on the CPU (the benchmark compiles them
    on CUDA): equal to ours with ``border="mask"``."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import warnings
    case = bl.make_case(baseline, 2, 16, 9, 11, 5, dtype=torch.float32)
    c = case.canonical()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = bl.flex_neighbourhood(c["q"], c["k"], c["v"], c["heads"], case.k, bias=c["bias"],
                                    rel=c["rel"], scale=c["scale"], compiled=False)
    want = bl.ours_forward(bl.ours_arrays(case))
    assert bl.rel_error(got, want) <= 2e-5


def test_case_shapes():
    assert bl.shape_of("lrnet-unfold", 64) == (8, 1, 8)
    assert bl.shape_of("sasa-unfold", 64) == (8, 8, 8)
    assert bl.shape_of("sasa-seed-unfold", 64) == (64, 1, 1)
    with pytest.raises(ValueError, match="baseline"):
        bl.make_case("nope", 1, 8, 4, 4, 3)


def test_run_plan_and_tables(tmp_path):
    """The runner's plan, tables and plots from synthetic rows (no timing)."""
    from benchmarks import run
    items = run.plan("cpu", quick=True)
    assert items[0]["suite"] == "headline"
    assert {i["baseline"] for i in items} >= set(UNFOLD)
    assert all(not i["baseline"].endswith("flex") for i in items)
    gpu_items = run.plan("cuda", quick=False)
    assert {i["dtype"] for i in gpu_items} == {"float32", "float16", "bfloat16"}
    rows = []
    for i, res in enumerate((14, 28)):
        for impl in ("lrnet-unfold", "ours[lrnet-unfold]"):
            rows.append(dict(device="cpu", dtype="float32", suite="resolution" if i else "headline",
                             B=1, C=64, H=res, W=res, k=7, heads=8, dqk=1, dv=8, border="zeros",
                             family="lrnet", impl=impl, fwd_s=0.01, fwdbwd_s=0.02 * (1 + i),
                             fwd_mem_bytes=1e6, fwdbwd_mem_bytes=2e6,
                             **({"equal_to": "lrnet-unfold"} if impl.startswith("ours") else {})))
    env = dict(device="cpu", cpu="test", cpu_count=2, commit="0" * 40, date="2026-01-01T00:00",
               time_method="t", memory_method="m", torch_threads=2, dirty=False, python="3",
               numpy="2", torch="2", cupy=None)
    head = run.headline_markdown(rows, env)
    assert "lrnet-unfold" in head and "(1.00)" in head
    assert "| resolution |" in run.results_markdown(rows, env)
    # the small shapes (CPU) with ours through the adapter: side-by-side ratios in one table
    small = [i for i in items if i["suite"] == "small"]
    assert {(i["B"], i["H"], i["k"]) for i in small} == {(1, 28, 7), (1, 14, 7)}
    assert not any(i["suite"] == "small" for i in gpu_items)
    for impl, t in (("lrnet-unfold", 0.04), ("ours[lrnet-unfold]", 0.02),
                    ("ours-torch[lrnet-unfold]", 0.03)):
        rows.append(dict(rows[0], suite="small", H=28, W=28, impl=impl, fwdbwd_s=t,
                         **({"equal_to": "lrnet-unfold"} if impl.startswith("ours") else {})))
    table = run.ratios_markdown(rows, "small")
    assert "| lrnet-unfold | 1 | 64 | 28x28 | 7 | 40.0 ms / 20.0 ms / 30.0 ms | 0.50 | 0.75 |" in table
    assert "## Small shapes" in run.results_markdown(rows, env)
    assert run.plots(rows, env, str(tmp_path)) == ["cpu-float32-lrnet-resolution.png"]


def test_nothing_is_timed_that_disagrees_with_our_reference(monkeypatch):
    """A wrong baseline and a wrong adapter result are both refused before timing."""
    from benchmarks import run
    item = dict(suite="headline", baseline="lrnet-unfold", dtype="float32", B=1, C=16, H=9,
                W=10, k=3)
    rows = {r["impl"]: r for r in run.measure_item(item, run.CPU(), 1, 2**30, bl.torch_adapter())}
    assert all("fwd_s" in r for r in rows.values()), rows      # all agree: all timed
    right_ours_torch, right_baseline = bl.ours_torch, bl.Case.run_baseline
    monkeypatch.setattr(bl, "ours_torch", lambda case, inputs=None: 1.001 * right_ours_torch(case, inputs))
    monkeypatch.setattr(bl.Case, "run_baseline", lambda self, inputs=None: 1.001 * right_baseline(self, inputs))
    rows = {r["impl"]: r for r in run.measure_item(item, run.CPU(), 1, 2**30, bl.torch_adapter())}
    for name in ("lrnet-unfold", "ours-torch[lrnet-unfold]"):
        assert "fwd_s" not in rows[name] and "check failed" in rows[name]["note"], rows[name]
    assert "fwd_s" in rows["ours[lrnet-unfold]"]
