"""Launch every CUDA kernel instantiation once on a small case (for compute-sanitizer).

    compute-sanitizer --tool memcheck python -m benchmarks.memcheck_driver
    compute-sanitizer --tool racecheck python -m benchmarks.memcheck_driver --dtypes float32
    python -m benchmarks.memcheck_driver --backend sim     # the same launches on the CPU engine

Every op forward and backward, for every dtype, through the general and the fast path,
with bias and rel and a border that has invalid slots, plus stride 2 (general path only).
Exits non-zero if any call raised; compute-sanitizer adds its own error exit code
(``--error-exitcode``) for memory errors.
"""
from __future__ import annotations

import sys
import traceback

import numpy as np


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("cupy", "sim"), default="cupy")
    ap.add_argument("--dtypes", default="all",
                    help="comma-separated dtypes (default all): float32 alone for the slower "
                         "racecheck/synccheck tools, whose subject is shared memory, not dtypes")
    args = ap.parse_args(argv)
    import cupy_localrel as cl
    from cupy_localrel import _geometry as G
    from cupy_localrel._backends import _kernel_ops as K
    if args.backend == "cupy":
        import cupy as cp
        # No memory pool: compute-sanitizer only sees accesses outside a real cudaMalloc
        # range, and the pool would hand out parts of larger, reused blocks.
        cp.cuda.set_allocator(None)
        from cupy_localrel._backends import _cupy as backend
        sync = lambda: cp.cuda.get_current_stream().synchronize()   # noqa: E731
    else:
        cp = np
        from cupy_localrel._backends import _sim as backend
        sync = lambda: None   # noqa: E731
    run = dict(backend=args.backend)
    # Record which instantiations get launched: the point is to cover every one.
    launched, original = set(), K.Target.function

    def recording(self, filename, name, device=None):
        launched.add((filename, name))
        return original(self, filename, name, device)

    K.Target.function = recording

    dtypes = [np.float16, np.float32, np.float64]
    try:   # bfloat16 where CuPy can hold it
        import ml_dtypes
        cp.asarray(np.zeros(1, ml_dtypes.bfloat16))
        dtypes.insert(1, ml_dtypes.bfloat16)
    except Exception as exc:
        print(f"skip bfloat16: {type(exc).__name__}: {exc}", flush=True)
    if args.dtypes != "all":
        dtypes = [d for d in dtypes if np.dtype(d).name in args.dtypes.split(",")]
    failures = 0
    rng = np.random.default_rng(0)
    # (heads, Dqk, Dv, H, W, kernel, stride, border, scratch limit): LR-Net-like, SASA-like,
    # strided shift, and a window too large for shared memory (backward work arrays in
    # global scratch; a limit of 1 byte makes every block its own launch: first_block).
    default = K.SCRATCH_LIMIT
    cases = [(2, 1, 8, 19, 21, 7, 1, "mask", default), (2, 16, 16, 11, 18, 5, 1, "zeros", default),
             (2, 3, 5, 9, 10, (3, 5), 2, "shift", default), (1, 2, 3, 9, 10, (17, 15), 1, "mask", 1)]
    for dtype in dtypes:
        for heads, dqk, dv, H, W, kernel, stride, border, scratch_limit in cases:
            label = f"{np.dtype(dtype).name} heads={heads} dqk={dqk} dv={dv} {H}x{W} k={kernel} s={stride} {border}"
            K.SCRATCH_LIMIT = scratch_limit
            try:
                def arr(*shape):
                    return cp.asarray(rng.standard_normal(shape).astype(dtype))
                kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
                th, tw = G.table_length(kh, border), G.table_length(kw, border)
                q, k, v = arr(2, heads * dqk, H, W), arr(2, heads * dqk, H, W), arr(2, heads * dv, H, W)
                bias, rel = arr(heads, th, tw), arr(heads, dqk, th, tw)
                win = dict(stride=stride, border=border, **run)
                out, lse = cl.local_attention2d(q, k, v, heads, kernel, bias=bias, rel=rel, return_lse=True, **win)
                geo = G.qk_geometry(q, k, heads, kernel, 1, stride, border, bias, rel, None, v=v)
                K.attention_forward(backend.TARGET, geo, q, k, v, bias, rel, allow_tiled=False)
                cl.local_attention2d_backward(out, q, k, v, out, lse, heads, kernel, bias=bias, rel=rel, **win)
                logits = cl.local_qk2d(q, k, heads, kernel, bias=bias, rel=rel, **win)
                attn = cp.zeros(logits.shape, logits.dtype)
                cl.local_qk2d_backward(attn, q, k, heads, kernel, bias=bias, rel=rel, **win)
                cl.local_av2d(attn, v, kernel, **win)
                cl.local_av2d_backward(out, attn, v, kernel, **win)
                # Every other similarity, with key_bias (-inf on a corner): the <..., SIM>
                # instantiations of the general kernels.
                key_bias = arr(2, heads, H, W)
                key_bias[:, :, : H // 2, : W // 2] = -np.inf
                for similarity in G.SIMILARITIES[1:]:
                    sk = dict(win, similarity=similarity, key_bias=key_bias, bias=bias)
                    o, s = cl.local_attention2d(q, k, v, heads, kernel, return_lse=True, **sk)
                    cl.local_attention2d_backward(o, q, k, v, o, s, heads, kernel, **sk)
                    cl.local_qk2d_backward(attn, q, k, heads, kernel, **sk)
                    cl.local_qk2d(q, k, heads, kernel, **sk)
                sync()
                print("ok  ", label, flush=True)
            except Exception:
                failures += 1
                print("FAIL", label, flush=True)
                traceback.print_exc()
    from cupy_localrel._loader import INSTANTIATIONS
    missing = sorted(f"{f}: {n}" for f, names in INSTANTIATIONS.items() for n in names
                     if (f, n) not in launched)
    print(f"{len(launched)} instantiations launched; not launched: {missing or 'none'}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
