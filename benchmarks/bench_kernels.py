"""GPU benchmarks of the CUDA kernels (issue 4). Needs CuPy and a GPU; no network.

    python -m benchmarks.bench_kernels [--out results.json] [--quick]

1. LR-Net layer shape: B=32, C=256, 56x56, k=7, m=8 (heads = C/m = 32, Dqk = 1, Dv = 8),
   geometry prior as bias, float32, fused forward. Reports the time of the fast path
   (``attention_forward_tiled``) and of the general path, and the achieved bandwidth
   (q, k, v read once + out written once) / time as a share of the device's peak, the
   peak being 2 x memory clock x bus width (DDR), both queried from the device.
2. SASA layer shape: B=32, C=256, heads=8 (Dqk = Dv = 32), 56x56, k=7, relative
   embeddings, float16, forward + backward: time and peak memory, against an unfold
   implementation (torch's, from ``benchmarks.baselines``, when torch has CUDA; else a
   CuPy unfold forward only).

Times are medians over CUDA-event-timed repetitions after warm-up. Everything is written
as one JSON document (stdout, and ``--out``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def _cupy():
    import cupy
    return cupy


def cuda_time(fn, repeat=20, warmup=3):
    """Median milliseconds of ``fn()`` on the current stream (CUDA events)."""
    cp = _cupy()
    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def device_info() -> dict:
    cp = _cupy()
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    clock_khz = props.get("memoryClockRate")
    bus_bits = props.get("memoryBusWidth")
    # CUDA 13 dropped memoryClockRate from cudaDeviceProp: ask the attribute instead.
    try:
        if not clock_khz:
            clock_khz = cp.cuda.runtime.deviceGetAttribute(36, dev.id)  # cudaDevAttrMemoryClockRate
        if not bus_bits:
            bus_bits = cp.cuda.runtime.deviceGetAttribute(37, dev.id)   # cudaDevAttrGlobalMemoryBusWidth
    except Exception:
        pass
    peak = 2.0 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None
    return dict(name=name, id=dev.id, compute_capability=dev.compute_capability,
                memory_clock_khz=clock_khz, bus_width_bits=bus_bits, peak_bandwidth_GBps=peak and peak / 1e9,
                total_memory_GiB=props.get("totalGlobalMem", 0) / 2**30,
                cupy=cp.__version__, cuda_runtime=cp.cuda.runtime.runtimeGetVersion(),
                driver=cp.cuda.runtime.driverGetVersion())


# ---------------------------------------------------------------------------------------
# LR-Net forward
# ---------------------------------------------------------------------------------------

def bench_lrnet(info: dict, quick: bool) -> dict:
    cp = _cupy()
    import cupy_localrel as cl
    from cupy_localrel import _geometry as G
    from cupy_localrel._backends import _cupy as backend, _kernel_ops as K

    B, C, H, W, k, m = (4 if quick else 32), 256, 56, 56, 7, 8
    heads = C // m
    rng = cp.random.default_rng(0)
    q = rng.standard_normal((B, heads, H, W), dtype=cp.float32)
    key = rng.standard_normal((B, heads, H, W), dtype=cp.float32)
    v = rng.standard_normal((B, C, H, W), dtype=cp.float32)
    bias = rng.standard_normal((heads, k, k), dtype=cp.float32)
    geo = G.qk_geometry(q, key, heads, k, 1, 1, "mask", bias, None, 1.0, v=v)
    fast = cuda_time(lambda: cl.local_attention2d(q, key, v, heads, k, bias=bias, scale=1.0))
    general = cuda_time(lambda: K.attention_forward(backend.TARGET, geo, q, key, v, bias, None, allow_tiled=False))
    nbytes = (q.nbytes + key.nbytes + v.nbytes) + v.nbytes   # out has v's size (stride 1)
    result = dict(shape=dict(B=B, C=C, H=H, W=W, k=k, m=m, heads=heads, dtype="float32", border="mask"),
                  bytes_moved_min=nbytes, fast_path_ms=fast, general_path_ms=general,
                  fast_path_kernel=f"attention_forward_tiled<float, {', '.join(map(str, K.TILED_CONFIGS['lrnet']['attention_forward_tiled']))}>")
    # Backward too (not asked for the LR-Net shape, but the same layer trains).
    out, lse = cl.local_attention2d(q, key, v, heads, k, bias=bias, scale=1.0, return_lse=True)
    grad = cp.ones_like(out)
    result["backward_ms"] = cuda_time(lambda: cl.local_attention2d_backward(
        grad, q, key, v, out, lse, heads, k, bias=bias, scale=1.0), repeat=10)
    result["backward_general_path_ms"] = cuda_time(lambda: K.attention_backward(
        backend.TARGET, geo, grad, q, key, v, out, lse, bias, None, allow_tiled=False), repeat=10)
    for label, ms in (("fast_path", fast), ("general_path", general)):
        gbps = nbytes / (ms * 1e-3) / 1e9
        result[f"{label}_GBps"] = gbps
        if info.get("peak_bandwidth_GBps"):
            result[f"{label}_share_of_peak"] = gbps / info["peak_bandwidth_GBps"]
    return result


# ---------------------------------------------------------------------------------------
# SASA forward + backward against unfold
# ---------------------------------------------------------------------------------------

def _peak_bytes(fn):
    """(result, pool high-water bytes) of ``fn`` run on a fresh CuPy memory pool."""
    cp = _cupy()
    old = cp.get_default_memory_pool()
    pool = cp.cuda.MemoryPool()
    cp.cuda.set_allocator(pool.malloc)
    try:
        out = fn()
        cp.cuda.get_current_stream().synchronize()
        return out, pool.total_bytes()
    finally:
        cp.cuda.set_allocator(old.malloc)


def bench_sasa(info: dict, quick: bool) -> dict:
    cp = _cupy()
    import cupy_localrel as cl

    B, C, H, W, heads, k = (4 if quick else 32), 256, 56, 56, 8, 7
    d = C // heads
    rng = cp.random.default_rng(1)
    q, key, v = (rng.standard_normal((B, C, H, W), dtype=cp.float32).astype(cp.float16) for _ in range(3))
    rel = (0.1 * rng.standard_normal((heads, d, k, k), dtype=cp.float32)).astype(cp.float16)
    grad = rng.standard_normal((B, C, H, W), dtype=cp.float32).astype(cp.float16)
    kw = dict(rel=rel, scale=1.0)

    def ours():
        out, lse = cl.local_attention2d(q, key, v, heads, k, return_lse=True, **kw)
        return cl.local_attention2d_backward(grad, q, key, v, out, lse, heads, k, **kw)

    result = dict(shape=dict(B=B, C=C, H=H, W=W, k=k, heads=heads, dqk=d, dv=d, dtype="float16", border="mask"))
    result["ours_fwd_ms"] = cuda_time(lambda: cl.local_attention2d(q, key, v, heads, k, **kw), repeat=10)
    from cupy_localrel import _geometry as G
    from cupy_localrel._backends import _cupy as backend, _kernel_ops as K
    geo = G.qk_geometry(q, key, heads, k, 1, 1, "mask", None, rel, 1.0, v=v)
    result["ours_fwd_general_path_ms"] = cuda_time(
        lambda: K.attention_forward(backend.TARGET, geo, q, key, v, None, rel, allow_tiled=False), repeat=10)
    result["ours_fwd_bwd_ms"] = cuda_time(ours, repeat=10)
    _, result["ours_fwd_bwd_peak_bytes"] = _peak_bytes(ours)
    result["inputs_bytes"] = q.nbytes * 3 + grad.nbytes
    result["memory_note"] = ("peak bytes beyond the inputs: ours = high-water of a fresh CuPy pool over "
                             "one fwd+bwd; torch = max_memory_allocated minus what was allocated before")
    result["unfold"] = _sasa_unfold(q, key, v, rel, grad, heads, k)
    return result


def _sasa_unfold(q, key, v, rel, grad, heads, k) -> dict:
    """torch unfold (fwd+bwd, autograd) if torch has CUDA; else CuPy unfold (forward only)."""
    cp = _cupy()
    try:
        import torch
        if not torch.cuda.is_available():
            raise ImportError("torch has no CUDA")
        from benchmarks.baselines import sasa_paper_unfold
    except Exception as exc:
        out = dict(impl="cupy unfold (forward only)", why_not_torch=f"{type(exc).__name__}: {exc}")
        fwd = lambda: _cupy_unfold_forward(q, key, v, rel, heads, k)   # noqa: E731
        out["fwd_ms"] = cuda_time(fwd, repeat=5)
        _, out["fwd_peak_bytes"] = _peak_bytes(fwd)
        return out

    tq, tk, tv, tg = (torch.as_tensor(x, device="cuda") for x in (q, key, v, grad))
    half = q.shape[1] // heads // 2
    rel_h = torch.as_tensor(rel[:, :half, :, k // 2], device="cuda").clone()
    rel_w = torch.as_tensor(rel[:, half:, k // 2, :], device="cuda").clone()
    leaves = [t.detach().clone().requires_grad_(True) for t in (tq, tk, tv, rel_h, rel_w)]

    def step():
        out = sasa_paper_unfold(*leaves, heads=heads, kernel_size=k)
        out.backward(tg)
        return out

    stream = torch.cuda.current_stream()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(5):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        step()
        stop.record(stream)
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return dict(impl="torch unfold (benchmarks.baselines.sasa_paper_unfold), fwd+bwd",
                torch=torch.__version__, fwd_bwd_ms=statistics.median(times),
                fwd_bwd_peak_bytes=torch.cuda.max_memory_allocated() - base)


def _cupy_unfold_forward(q, key, v, rel, heads, k):
    """Materialise the (B, heads, D, K, H, W) windows, as unfold-based layers do."""
    cp = _cupy()
    B, C, H, W = q.shape
    d, r = C // heads, k // 2
    pad = lambda x: cp.pad(x, ((0, 0), (0, 0), (r, r), (r, r)))   # noqa: E731
    kp, vp = pad(key).reshape(B, heads, d, H + 2 * r, W + 2 * r), pad(v).reshape(B, heads, d, H + 2 * r, W + 2 * r)
    kw = cp.stack([kp[..., i:i + H, j:j + W] for i in range(k) for j in range(k)], axis=3)
    vw = cp.stack([vp[..., i:i + H, j:j + W] for i in range(k) for j in range(k)], axis=3)
    qh = q.reshape(B, heads, d, 1, H, W).astype(cp.float32)
    logits = (qh * (kw.astype(cp.float32) + rel.reshape(1, heads, d, k * k, 1, 1))).sum(axis=2)
    logits -= logits.max(axis=2, keepdims=True)
    p = cp.exp(logits)
    p /= p.sum(axis=2, keepdims=True)
    return (p[:, :, None] * vw).sum(axis=3).astype(q.dtype).reshape(B, C, H, W)


# ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the JSON here too")
    ap.add_argument("--quick", action="store_true", help="B=4 instead of 32")
    args = ap.parse_args(argv)
    report = dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), quick=args.quick)
    rc = 0
    try:
        report["device"] = device_info()
    except Exception as exc:
        report["device"] = dict(error=f"{type(exc).__name__}: {exc}")
        rc = 1
    for name, fn in (("lrnet_forward_fp32", bench_lrnet), ("sasa_fwd_bwd_fp16", bench_sasa)):
        try:
            report[name] = fn(report.get("device", {}), args.quick)
        except Exception as exc:   # keep going: the other benchmark may still work
            report[name] = dict(error=f"{type(exc).__name__}: {exc}")
            rc = 1
        print(f"{name}: {json.dumps(report[name], default=str)}", file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
