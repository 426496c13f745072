"""Command line: ``python -m cupy_localrel {info,demo,kernels}``.

- ``info``: package, NumPy/CuPy/torch versions, and each backend's availability.
- ``demo``: the main job. Runs every op on an embedded synthetic example on the best
  available backend, checks it against the NumPy reference (a short table), then trains
  small LR-Net and SASA networks on scikit-learn's digits when torch is installed.
  ``demo --check-only`` stops after the table.
- ``kernels``: compiles every CUDA kernel with NVRTC for sm_80 and sm_90 (no GPU needed).
- ``profile``: counts the kernels' memory traffic on the CPU engine and models their time on
  a GPU (every figure modelled); see cupy_localrel/kernels/PROFILING.md.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import numpy as np

from . import __version__
from . import _ops
from ._backends import backend_status
from ._geometry import BACKENDS


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:  # noqa: BLE001 - report any import failure as text
        return f"not installed ({type(exc).__name__})"


def info(_args=None) -> int:
    print(f"cupy-localrel {__version__}")
    for module in ("numpy", "cupy", "torch"):
        print(f"  {module:8s} {_version(module)}")
    print("backends:")
    for name in BACKENDS:
        ok, reason = backend_status(name)
        print(f"  {name:8s} {'available' if ok else 'unavailable'}: {reason}")
    from ._nvrtc_check import nvrtc_available
    ok, reason = nvrtc_available()
    print(f"compile check (python -m cupy_localrel kernels): {'available' if ok else 'unavailable'}: {reason}")
    return 0


def best_backend() -> str:
    """``cupy`` on a GPU, else ``sim`` (the CUDA kernels on the CPU), else ``numpy``."""
    for name in ("cupy", "sim"):
        if backend_status(name)[0]:
            return name
    return "numpy"


def _demo_cases(seed, asarray):
    """An embedded synthetic example per op: (name, function(backend) -> tuple of arrays).

    ``asarray`` moves the NumPy inputs to the backend's array kind.
    """
    rng = np.random.default_rng(seed)
    B, heads, dqk, dv, H, W, k = 2, 4, 8, 8, 16, 16, 5
    q, kk = (rng.standard_normal((B, heads * dqk, H, W)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((B, heads * dv, H, W)).astype(np.float32)
    bias = rng.standard_normal((heads, k, k)).astype(np.float32)
    g = rng.standard_normal((B, heads * dv, H, W)).astype(np.float32)
    attn = rng.random((B, heads, k * k, H, W)).astype(np.float32)
    x, key, query = v, q[:, :heads * 2], kk[:, :heads * 2]
    geometry = rng.standard_normal((heads * 2, k, k)).astype(np.float32)
    rel_h = rng.standard_normal((heads, dqk // 2, k)).astype(np.float32)
    rel_w = rng.standard_normal((heads, dqk // 2, k)).astype(np.float32)
    q, kk, v, bias, g, attn, x, key, query, geometry, rel_h, rel_w = (
        asarray(a) for a in (q, kk, v, bias, g, attn, x, key, query, geometry, rel_h, rel_w))

    def attention(backend):
        out, lse = _ops.local_attention2d(q, kk, v, heads, k, bias=bias, return_lse=True, backend=backend)
        return (out, lse) + tuple(_ops.local_attention2d_backward(
            g, q, kk, v, out, lse, heads, k, bias=bias, backend=backend))

    def qk(backend):
        logits = _ops.local_qk2d(q, kk, heads, k, bias=bias, border="zeros", backend=backend)
        return (logits,) + tuple(_ops.local_qk2d_backward(logits, q, kk, heads, k, bias=bias,
                                                          border="zeros", backend=backend))

    def av(backend):
        out = _ops.local_av2d(attn, v, k, border="shift", backend=backend)
        return (out,) + tuple(_ops.local_av2d_backward(g, attn, v, k, border="shift", backend=backend))

    def relation(backend):
        out, lse = _ops.local_relation2d(x, key, query, geometry, k, return_lse=True, backend=backend)
        return (out,) + tuple(_ops.local_relation2d_backward(g, x, key, query, geometry, out, lse, k,
                                                             backend=backend))

    def sasa(backend):
        out, lse = _ops.sasa2d(q, kk, v, rel_h, rel_w, heads, k, stride=2, return_lse=True, backend=backend)
        return (out,) + tuple(_ops.sasa2d_backward(g[..., ::2, ::2], q, kk, v, rel_h, rel_w, out, lse,
                                                   heads, k, stride=2, backend=backend))

    return [("local_attention2d (+backward)", attention), ("local_qk2d (+backward)", qk),
            ("local_av2d (+backward)", av), ("local_relation2d (+backward)", relation),
            ("sasa2d stride 2 (+backward)", sasa)]


def _to_numpy(a):
    return a.get() if hasattr(a, "get") else a


def check_table(backend: str | None = None) -> bool:
    """Run every op on ``backend`` and compare with the NumPy reference; print a table."""
    backend = backend or best_backend()
    if backend == "cupy":
        import cupy
        asarray = cupy.asarray
    else:
        asarray = np.asarray
    print(f"Every op in float32 on backend={backend!r} against the float64 NumPy reference "
          "(tolerance 2e-5, docs/contract.md):")
    print(f"  {'op':32s} {'max rel err':>12s} {'time':>9s} {'1st call':>9s}  result")
    all_ok = True
    for (name, run), (_, reference) in zip(_demo_cases(0, asarray), _demo_cases(0, _float64)):
        # The first call of a kernel backend compiles (g++ for sim, NVRTC for cupy; cached
        # afterwards): time it apart, and report the second call as the op's time.
        first, got = _timed(run, backend)
        elapsed, got = _timed(run, backend)
        want = reference("numpy")
        err = max(_rel_err(_to_numpy(a), b) for a, b in zip(got, want) if b is not None)
        ok = err <= 2e-5
        all_ok &= ok
        print(f"  {name:32s} {err:12.2e} {elapsed * 1e3:7.1f}ms {first * 1e3:7.1f}ms  "
              f"{'ok' if ok else 'FAIL'}")
    print("  (time: a warm call; 1st call: includes compiling the kernels, if not cached)")
    return all_ok


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def _float64(a):
    return np.asarray(a, np.float64)


def _rel_err(got, want):
    want = np.asarray(want, np.float64)
    finite = np.isfinite(want)
    got = np.asarray(got, np.float64)
    if not np.array_equal(finite, np.isfinite(got)):
        return float("inf")
    scale = max(1.0, float(np.abs(want[finite]).max(initial=0)))
    return float(np.abs(got[finite] - want[finite]).max(initial=0)) / scale


def demo(args) -> int:
    ok = check_table(args.backend)
    if not ok:
        print("demo: some op disagrees with the reference", file=sys.stderr)
        return 1
    if args.check_only:
        return 0
    try:
        train = importlib.import_module("cupy_localrel.adapters.torch.train")
    except ImportError as exc:
        print(f"\nTraining skipped: {exc} (pip install 'cupy-localrel[torch]' to enable it)")
        return 0
    print()
    return train.main(args.train_args)


def kernels(args) -> int:
    from . import _nvrtc_check
    return _nvrtc_check.main(args.rest)


def profile(args) -> int:
    from . import _profile
    return _profile.run(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cupy_localrel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and backend availability").set_defaults(func=info)
    d = sub.add_parser("demo", help="check every op, then train small LR-Net and SASA models")
    d.add_argument("--backend", choices=BACKENDS, default=None, help="default: the best available")
    d.add_argument("--check-only", action="store_true", help="only the table of checks")
    d.add_argument("train_args", nargs=argparse.REMAINDER, help="passed on to the training job")
    d.set_defaults(func=demo)
    k = sub.add_parser("kernels", help="NVRTC compile check of every kernel for sm_80/sm_90")
    k.add_argument("rest", nargs=argparse.REMAINDER)
    k.set_defaults(func=kernels)
    from . import _profile
    p = sub.add_parser("profile", help="memory-traffic counters and modelled GPU time of the kernels")
    _profile.build_parser(p).set_defaults(func=profile)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
