"""Ours against the baselines, side by side: time, peak memory, (GPU) bandwidth.

    python -m benchmarks.run [--quick] [--gpu | --cpu] [--out DIR] [--repeats N]
                             [--time-budget S] [--render RESULTS_JSON]

GPU check (about 3-5 minutes on an H100, FlexAttention compiles included):

    python -m benchmarks.run --gpu --quick --time-budget 150 --no-progress --out DIR

A SIGTERM (e.g. ``timeout``) stops it early and still writes the figures measured so far.

Writes ``results.json`` (device, versions, commit, date, every figure), ``results.md``,
``headline.md`` (ours vs each baseline at B=8, C=64, 56x56, k=7, both shapes) and PNG
plots (time and memory vs resolution, kernel size and channels) under
``benchmarks/results/<device>-<date>/`` or ``--out``.

What is measured (each row names device, dtype and shape):

- Baselines (:mod:`benchmarks.baselines`): ``lrnet-unfold`` (the seed's LR-Net layer,
  fixed), ``sasa-seed-unfold`` (the seed's ``AttentionConv``: per-channel softmax),
  ``sasa-unfold`` (paper SASA, per-head dot product) and, on CUDA, ``lrnet-flex`` /
  ``sasa-flex`` (FlexAttention with a 2-D neighbourhood block mask). Each is checked
  against our reference on the same inputs before it is timed; ours is then timed on the
  equivalent ``local_attention2d`` call (``ours[<baseline>]`` rows).
- Ours: the package's NumPy reference on CPU (NumPy arrays), the CuPy backend on GPU;
  ``ours-torch[...]`` rows go through ``cupy_localrel.adapters.torch`` when importable.
- forward = inference forward (no autograd graph, no lse); fwd+bwd = forward (with lse /
  autograd graph) then backward with a fixed output gradient.
- Time: wall clock on CPU, CUDA events on GPU; warm-up then median of ``--repeats``.
- Memory: on CPU the peak resident-set growth (``VmHWM`` reset via
  ``/proc/self/clear_refs``; glibc's mmap threshold pinned low while measuring so that
  freed buffers are unmapped, see :mod:`benchmarks._measure`); it sees NumPy's and torch's
  allocations alike. The headline also gives tracemalloc's figure for ours. On GPU
  ``torch.cuda.max_memory_allocated`` growth (CuPy is routed through torch's allocator).
  Inputs and the output gradient are allocated before measuring; outputs and gradients
  count.
- GPU bandwidth: the op's minimal traffic (read q, k, v, write out; backward also reads
  grad_out, out, lse and writes dq, dk, dv) over the time, as a share of the device's peak.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import traceback

import numpy as np
import torch

from benchmarks import _measure as M
from benchmarks import baselines as bl

HEADLINE = dict(B=8, C=64, H=56, W=56, k=7)
#: Small shapes (CPU): one image at LR-Net's and SASA's late-stage sizes, where a fixed
#: per-call cost would show. Timed through the torch adapter as well.
SMALL = [dict(B=1, C=64, H=28, W=28, k=7), dict(B=1, C=64, H=14, W=14, k=7)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


def plan(device: str, quick: bool) -> list[dict]:
    """Items ``{suite, baseline, B, C, H, W, k, dtype}``; the headline first."""
    gpu = device == "cuda"
    unfold = ["lrnet-unfold", "sasa-seed-unfold", "sasa-unfold"]
    flex = ["lrnet-flex", "sasa-flex"] if gpu else []
    dtypes = (["float32", "float16", "bfloat16"] if not quick else ["float32", "float16"]) \
        if gpu else ["float32"]
    items = []
    # Quick on CPU: the headline at B=1, 28x28 (rows name their shape), small sweeps.
    head = dict(HEADLINE, B=1, H=28, W=28) if (quick and not gpu) else HEADLINE
    for dt in dtypes:
        for b in unfold:
            items.append(dict(suite="headline", baseline=b, dtype=dt, **head))
    if not gpu:
        for shape in SMALL:
            for b in unfold:
                items.append(dict(suite="small", baseline=b, dtype="float32", **shape))
    # Sweeps: unfold baselines only (FlexAttention compiles per shape: headline only).
    hw = 56
    if gpu:
        B, res, ks, cs = 8, [14, 28, 56, 112], [3, 5, 7, 9, 11, 13], [32, 64, 128, 256]
        if quick:
            res, ks, cs = [28, 56, 112], [3, 7, 13], [32, 128]
    elif quick:
        B, res, ks, cs, hw = 1, [14, 28], [3, 7], [32, 64], 28
    else:
        B, res, ks, cs = 2, [14, 28, 56, 112], [3, 5, 7, 9, 11, 13], [32, 64, 128, 256]
    sweep_b = ["lrnet-unfold", "sasa-unfold"]
    for dt in dtypes:
        for b in sweep_b:
            for r in res:
                items.append(dict(suite="resolution", baseline=b, dtype=dt, B=B, C=64, H=r,
                                  W=r, k=7))
            for k in ks:
                items.append(dict(suite="kernel", baseline=b, dtype=dt, B=B, C=64, H=hw, W=hw,
                                  k=k))
            for c in cs:
                items.append(dict(suite="channels", baseline=b, dtype=dt, B=B, C=c, H=hw,
                                  W=hw, k=7))
    # FlexAttention last: it compiles per dtype and shape (about a minute each), so a
    # --time-budget cut loses it rather than the sweeps. Quick keeps fp16 only.
    for dt in dtypes:
        for b in flex:
            if not (quick and dt != "float16"):
                items.append(dict(suite="headline", baseline=b, dtype=dt, **head))
    return items


def unfold_bytes_estimate(item: dict) -> int:
    """Rough peak of an unfold baseline's forward+backward (the K-times-larger tensors)."""
    heads, dqk, dv = bl.shape_of(item["baseline"], item["C"])
    K = item["k"] ** 2
    n = item["B"] * item["H"] * item["W"] * K
    esize = torch.finfo(DTYPES[item["dtype"]]).bits // 8
    return int(esize * n * (4 * heads * dv + 4 * heads * dqk + 6 * heads))


# ---------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------

class CPU:
    kind = "cpu"
    mem_method = "peak RSS growth (VmHWM reset via /proc/self/clear_refs, glibc mmap threshold pinned)"
    time_method = "wall clock (time.perf_counter)"

    def __init__(self):
        self.rss = M.rss_supported()
        if not self.rss:
            self.mem_method = "tracemalloc (NumPy only; torch rows have no memory figure)"
        M.set_malloc_mode("time")

    def sync(self):
        pass

    def times(self, fn, repeats, warmup=1):
        return M.wall_times(fn, warmup=warmup, repeats=repeats)

    def memory(self, fn, numpy_only=False):
        if not self.rss:
            return M.traced_peak(fn)[0] if numpy_only else None
        M.set_malloc_mode("memory")
        try:
            return M.rss_peak(fn)[0]
        finally:
            M.set_malloc_mode("time")


class GPU:
    kind = "cuda"
    mem_method = "torch.cuda.max_memory_allocated growth (CuPy allocations routed through torch)"
    time_method = "CUDA events"

    def __init__(self):
        self.cupy_routed = _route_cupy_to_torch()
        if not self.cupy_routed:
            self.mem_method += "; CuPy NOT routed: ours has no memory figure"
        self.peak_bw = peak_bandwidth()

    def sync(self):
        torch.cuda.synchronize()

    def times(self, fn, repeats, warmup=1):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        return out

    def memory(self, fn, numpy_only=False):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del result
        return peak


def _route_cupy_to_torch() -> bool:
    """Make CuPy allocate through torch's caching allocator (so torch's peak sees it)."""
    try:
        import cupy
        from cupy.cuda import memory as cm
    except Exception:
        return False

    class _Block:
        def __init__(self, size):
            self.ptr = torch.cuda.caching_allocator_alloc(size, torch.cuda.current_device())

        def __del__(self):
            try:
                torch.cuda.caching_allocator_delete(self.ptr)
            except Exception:
                pass

    def alloc(size):
        device = torch.cuda.current_device()
        if size == 0:
            return cm.MemoryPointer(cm.UnownedMemory(0, 0, None, device), 0)
        block = _Block(size)
        return cm.MemoryPointer(cm.UnownedMemory(block.ptr, size, block, device), 0)

    try:
        cupy.cuda.set_allocator(alloc)
        x = cupy.arange(1024, dtype=cupy.float32)
        del x
        return True
    except Exception:
        cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)
        return False


_PEAK_BW_BY_NAME = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
                    "H200": 4.8e12, "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12,
                    "A100-PCIE-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12}


def peak_bandwidth() -> dict:
    """``{"bytes_per_s", "source"}`` of the current GPU, or ``None`` figures if unknown."""
    try:  # the kernel benchmarks' query (handles CUDA 13, which dropped memoryClockRate)
        from benchmarks.bench_kernels import device_info
        gbps = device_info().get("peak_bandwidth_GBps")
        if gbps:
            return dict(bytes_per_s=gbps * 1e9, source="2 x memory clock x bus width "
                        "(benchmarks.bench_kernels.device_info)")
    except Exception:
        pass
    try:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        clock_khz, bus_bits = props.get("memoryClockRate", 0), props.get("memoryBusWidth", 0)
        if clock_khz and bus_bits:
            return dict(bytes_per_s=2.0 * clock_khz * 1e3 * bus_bits / 8,
                        source="2 x memoryClockRate x memoryBusWidth (CUDA device properties)")
    except Exception:
        pass
    name = torch.cuda.get_device_name()
    for key, bw in _PEAK_BW_BY_NAME.items():
        if key in name:
            return dict(bytes_per_s=bw, source=f"datasheet figure for {key}")
    return dict(bytes_per_s=None, source=f"unknown for {name}")


def traffic_bytes(item: dict, backward: bool) -> int:
    """Minimal memory traffic of the op (see the module doc)."""
    heads, dqk, dv = bl.shape_of(item["baseline"], item["C"])
    e = torch.finfo(DTYPES[item["dtype"]]).bits // 8
    px = item["B"] * item["H"] * item["W"]
    q = k = px * heads * dqk * e
    v = out = px * heads * dv * e
    lse = px * heads * 4
    fwd = q + k + v + out
    if not backward:
        return fwd
    return fwd + lse + (out + out + lse + q + k + v) + (q + k + v)


# ---------------------------------------------------------------------------------------
# Measuring one item
# ---------------------------------------------------------------------------------------

def _grad_out(case: bl.Case):
    g = torch.Generator().manual_seed(7)
    heads, _, dv = case.heads_dqk_dv
    return torch.randn(case.B, heads * dv, case.H, case.W, generator=g).to(
        device=case.device, dtype=case.dtype)


def _torch_fns(case: bl.Case, grad, run):
    """(forward, forward+backward) closures of a torch implementation ``run(inputs)``."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in case.inputs.items()}

    def fwd():
        with torch.no_grad():
            return run(case.inputs)

    def reset():  # drop the last call's gradients, so a memory baseline excludes them
        for t in leaves.values():
            t.grad = None

    def fwdbwd():
        reset()
        out = run(leaves)
        out.backward(grad)
        return out, [t.grad for t in leaves.values()]
    fwdbwd.reset = reset
    return fwd, fwdbwd


def _ours_fns(case: bl.Case, grad, xp):
    a = bl.ours_arrays(case, xp)
    g = grad.detach().cpu().numpy() if xp is np else xp.from_dlpack(grad.detach())

    def fwd():
        return bl.ours_forward(a)

    def fwdbwd():
        return bl.ours_forward_backward(a, g)
    return fwd, fwdbwd


def _interleaved(dev, impls: dict, repeats: int) -> tuple[dict, dict]:
    """Median times of every implementation, repeats interleaved (A, B, A, B, ...) so that
    load from other processes on a shared machine hits all of them alike.

    Returns ``(figures by name, error note by name)``; an implementation whose warm-up
    fails is dropped from that measurement (the others still run)."""
    res = {name: {} for name in impls}
    errors = {}
    for which in ("fwd", "fwdbwd"):
        live = {}
        for name, fns in impls.items():          # warm-up (and compile, for FlexAttention)
            try:
                fns[which]()
                live[name] = fns[which]
            except Exception as exc:
                errors[name] = f"{which} failed: {type(exc).__name__}: {exc}"[:300]
        dev.sync()
        times = {name: [] for name in live}
        for _ in range(repeats):
            for name, fn in live.items():
                times[name] += dev.times(fn, 1, warmup=0)
        for name in live:
            res[name][f"{which}_times_s"] = times[name]
            res[name][f"{which}_s"] = M.median(times[name])
    return res, errors


def _memory(dev, fns, *, numpy_only=False, traced=False) -> dict:
    """Peak extra memory of one call each; gradients left by earlier calls are dropped
    first (torch rows), so that every row counts its outputs and gradients."""
    reset = getattr(fns["fwdbwd"], "reset", None)
    if reset:
        reset()
    r = dict(fwd_mem_bytes=dev.memory(fns["fwd"], numpy_only))
    if reset:
        reset()
    r["fwdbwd_mem_bytes"] = dev.memory(fns["fwdbwd"], numpy_only)
    if traced:
        r["fwdbwd_traced_bytes"] = M.traced_peak(fns["fwdbwd"])[0]
    return r


def measure_item(item: dict, dev, repeats: int, max_bytes: int, adapter,
                 quick: bool = False) -> list[dict]:
    """Rows for one plan item: ours on the equal call, the baseline, ours-torch."""
    dtype = DTYPES[item["dtype"]]
    base = dict(device=dev.kind, dtype=item["dtype"], suite=item["suite"], B=item["B"],
                C=item["C"], H=item["H"], W=item["W"], k=item["k"])
    heads, dqk, dv = bl.shape_of(item["baseline"], item["C"])
    base.update(heads=heads, dqk=dqk, dv=dv, family=bl.FAMILY[item["baseline"]],
                border="mask" if item["baseline"].endswith("flex") else "zeros",
                loadavg_1min=os.getloadavg()[0])
    if item["baseline"].endswith("flex"):
        ok, why = bl.flex_status(dev.kind)
        if not ok:
            return [dict(base, impl=item["baseline"], note=f"skipped: {why}")]
    case = bl.make_case(item["baseline"], item["B"], item["C"], item["H"], item["W"],
                        item["k"], dtype=dtype, device=dev.kind)
    grad = _grad_out(case)
    xp = np
    if dev.kind == "cuda":
        try:
            import cupy as xp  # noqa: F811
        except Exception as exc:
            xp = None
            cupy_missing = f"ours not run: CuPy not importable ({exc})"

    rows = {}
    impls = {}
    # Ours first: its output is the reference the baseline is checked against.
    oname = f"ours[{item['baseline']}]"
    rows[oname] = dict(base, impl=oname, equal_to=item["baseline"])
    ours_out = None
    try:
        if xp is None:
            raise RuntimeError(cupy_missing)
        fwd, fwdbwd = _ours_fns(case, grad, xp)
        ours_out = fwd()
        impls[oname] = dict(fwd=fwd, fwdbwd=fwdbwd)
    except Exception as exc:
        rows[oname]["note"] = f"ours failed: {type(exc).__name__}: {exc}"[:300]

    # The baseline: checked against our reference before it is timed.
    bname = item["baseline"]
    rows[bname] = dict(base, impl=bname)
    est = unfold_bytes_estimate(item)
    # Every timed implementation is first checked against our reference on these inputs.
    ref = ours_out if dtype == torch.float32 else None
    if ref is None and dev.kind == "cuda":
        ref = _gpu_reference(case)  # float32 on the rounded inputs
    tol = 4 * bl.TOLERANCE[dtype] if dtype != torch.float32 else None
    if "unfold" in bname and est > max_bytes:
        rows[bname]["note"] = (f"skipped: estimated {M.fmt_bytes(est)} > limit "
                               f"{M.fmt_bytes(max_bytes)}")
    else:
        try:
            rows[bname]["check_max_rel_err"] = bl.check_forward(case, ref, tol)
            fwd, fwdbwd = _torch_fns(case, grad, case.run_baseline)
            impls[bname] = dict(fwd=fwd, fwdbwd=fwdbwd)
        except Exception as exc:
            rows[bname]["note"] = f"not timed: check failed: {type(exc).__name__}: {exc}"

    # Ours through the torch adapter, when there is one.
    if adapter is not None and not bname.endswith("flex") and (
            item["suite"] in ("headline", "resolution", "small") or dev.kind == "cuda"):
        aname = f"ours-torch[{bname}]"
        rows[aname] = dict(base, impl=aname, equal_to=bname)
        try:
            with torch.no_grad():
                got = bl.ours_torch(case)
            rows[aname]["check_max_rel_err"] = bl.check_output(case, got, aname, ref, tol)
            fwd, fwdbwd = _torch_fns(case, grad, lambda inp: bl.ours_torch(case, inp))
            impls[aname] = dict(fwd=fwd, fwdbwd=fwdbwd)
        except AssertionError as exc:
            rows[aname]["note"] = f"not timed: check failed: {exc}"
        except Exception as exc:
            rows[aname]["note"] = f"adapter failed: {type(exc).__name__}: {exc}"

    figures, errors = _interleaved(dev, impls, repeats)
    for name, r in figures.items():
        rows[name].update(r)
    for name, why in errors.items():
        rows[name]["note"] = why
    for name, fns in impls.items():
        if name in errors:
            continue
        try:
            if name == oname and dev.kind == "cuda" and not dev.cupy_routed:
                rows[name]["note"] = "no memory figure: CuPy could not be routed through torch"
                continue
            rows[name].update(_memory(dev, fns, numpy_only=(name == oname and xp is np),
                                      traced=(name == oname and xp is np
                                              and item["suite"] == "headline"
                                              and not quick)))
        except Exception as exc:
            rows[name]["note"] = f"memory failed: {type(exc).__name__}: {exc}"
        if dev.kind == "cuda":
            _bandwidth(rows[name], item, dev)
    return list(rows.values())


def _gpu_reference(case: bl.Case):
    """Ours in float32 on the GPU from the case's (rounded) inputs, else None (NumPy)."""
    try:
        import cupy
        c32 = bl.Case(**{**case.__dict__, "dtype": torch.float32, "inputs": {
            n: t.float() for n, t in case.inputs.items()}})
        return cupy.asnumpy(bl.ours_forward(bl.ours_arrays(c32, cupy)))
    except Exception:
        return None


def _bandwidth(row: dict, item: dict, dev):
    peak = dev.peak_bw["bytes_per_s"]
    for key, bwd in (("fwd", False), ("fwdbwd", True)):
        t = row.get(f"{key}_s")
        if t:
            achieved = traffic_bytes(item, bwd) / t
            row[f"{key}_bytes_per_s"] = achieved
            row[f"{key}_bw_share"] = achieved / peak if peak else None


# ---------------------------------------------------------------------------------------
# Environment, outputs
# ---------------------------------------------------------------------------------------

def environment(dev) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except Exception:
            return None
    import cupy_localrel
    env = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain",
                                                               "--", "cupy_localrel",
                                                               "benchmarks", "adapters")),
               python=platform.python_version(), numpy=np.__version__,
               torch=torch.__version__, cupy_localrel=cupy_localrel.__version__,
               platform=platform.platform(), torch_threads=torch.get_num_threads(),
               cpu=_cpu_model(), cpu_count=os.cpu_count(), device=dev.kind,
               time_method=dev.time_method, memory_method=dev.mem_method,
               numpy_memory_budget=cupy_localrel.get_numpy_memory_budget())
    try:
        import cupy
        env["cupy"] = cupy.__version__
    except Exception:
        env["cupy"] = None
    if dev.kind == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["peak_bandwidth"] = dev.peak_bw
    return env


_cpu_model = M.cpu_model


def device_slug(env: dict) -> str:
    if env["device"] == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
    return "cpu"


def _ratio(a, b):
    return None if (a is None or b is None or not b) else a / b


def _paired(rows, suite="headline"):
    """``(baseline row, ours row, ours-torch row or None)`` per headline baseline/dtype."""
    by = {}
    for r in rows:
        if r["suite"] != suite:
            continue
        key = (r["dtype"], r.get("equal_to") or r["impl"], r["B"], r["C"], r["H"], r["W"], r["k"])
        slot = "base" if r["impl"] == key[1] else ("torch" if r["impl"].startswith("ours-torch")
                                                    else "ours")
        by.setdefault(key, {})[slot] = r
    return [(v.get("base"), v.get("ours"), v.get("torch")) for v in by.values()]


def headline_markdown(rows, env) -> str:
    dev = env.get("gpu") or f"CPU ({env['cpu']}, {env['cpu_count']} cores)"
    heads_rows = [r for r in rows if r["suite"] == "headline"]
    at = (f"B={heads_rows[0]['B']}, C={heads_rows[0]['C']}, {heads_rows[0]['H']}x"
          f"{heads_rows[0]['W']}, k={heads_rows[0]['k']}") if heads_rows else "-"
    lines = [f"Ours vs each baseline at {at} on {dev}; ratio = ours / "
             f"baseline (below 1: ours is faster / smaller). Commit `{(env['commit'] or '')[:10]}`, "
             f"{env['date'][:10]}.",
             "", "| shape | baseline | dtype | fwd+bwd time: baseline / ours (ratio) | "
             "fwd+bwd peak memory: baseline / ours (ratio) | fwd time ratio | fwd memory ratio | "
             "fwd+bwd time ratio, ours through the torch adapter |",
             "|---|---|---|---|---|---|---|---|"]
    for base, ours, via_torch in _paired(rows):
        if base is None or ours is None:
            continue
        shape = (f"LR-Net (heads={base['heads']}, Dqk=1, Dv=8)" if base["family"] == "lrnet"
                 else f"SASA (heads={base['heads']}, Dqk=Dv={base['dqk']})")
        if base.get("fwdbwd_s") is None:
            lines.append(f"| {shape} | {base['impl']} | {base['dtype']} | "
                         f"{base.get('note', '-')} | | | | |")
            continue
        tr = _ratio(ours.get("fwdbwd_s"), base.get("fwdbwd_s"))
        mr = _ratio(ours.get("fwdbwd_mem_bytes"), base.get("fwdbwd_mem_bytes"))
        ftr = _ratio(ours.get("fwd_s"), base.get("fwd_s"))
        fmr = _ratio(ours.get("fwd_mem_bytes"), base.get("fwd_mem_bytes"))
        lines.append(
            f"| {shape} | {base['impl']} | {base['dtype']} | "
            f"{M.fmt_time(base.get('fwdbwd_s'))} / {M.fmt_time(ours.get('fwdbwd_s'))} "
            f"({_fmt_ratio(tr)}) | {M.fmt_bytes(base.get('fwdbwd_mem_bytes'))} / "
            f"{M.fmt_bytes(ours.get('fwdbwd_mem_bytes'))} ({_fmt_ratio(mr)}) | "
            f"{_fmt_ratio(ftr)} | {_fmt_ratio(fmr)} | "
            f"{_fmt_ratio(_ratio((via_torch or {}).get('fwdbwd_s'), base.get('fwdbwd_s')))} |")
    lines += ["", f"Time: {env['time_method']}, median. Memory: {env['memory_method']}."
                  f"{_load_note(rows, env)}",
              "Ours on CPU is the NumPy reference (single-threaded NumPy); torch baselines use "
              f"{env['torch_threads']} threads." if env["device"] == "cpu" else
              "Ours on GPU is the CuPy backend."]
    return "\n".join(lines) + "\n"


def ratios_markdown(rows, suite) -> str:
    """Side by side, one line per shape and baseline of ``suite``: fwd+bwd and fwd times of
    the baseline, ours and ours through the torch adapter, with ratios to the baseline."""
    lines = ["| baseline | B | C | HxW | k | fwd+bwd: baseline / ours / ours-torch | ratio ours "
             "| ratio ours-torch | fwd: baseline / ours / ours-torch | fwd ratio ours-torch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for base, ours, via_torch in _paired(rows, suite):
        if base is None or ours is None:
            continue
        t = via_torch or {}
        lines.append(
            f"| {base['impl']} | {base['B']} | {base['C']} | {base['H']}x{base['W']} | "
            f"{base['k']} | {M.fmt_time(base.get('fwdbwd_s'))} / "
            f"{M.fmt_time(ours.get('fwdbwd_s'))} / {M.fmt_time(t.get('fwdbwd_s'))} | "
            f"{_fmt_ratio(_ratio(ours.get('fwdbwd_s'), base.get('fwdbwd_s')))} | "
            f"{_fmt_ratio(_ratio(t.get('fwdbwd_s'), base.get('fwdbwd_s')))} | "
            f"{M.fmt_time(base.get('fwd_s'))} / {M.fmt_time(ours.get('fwd_s'))} / "
            f"{M.fmt_time(t.get('fwd_s'))} | "
            f"{_fmt_ratio(_ratio(t.get('fwd_s'), base.get('fwd_s')))} |")
    return "\n".join(lines) + "\n"


def _load_note(rows, env) -> str:
    loads = [r["loadavg_1min"] for r in rows if r.get("loadavg_1min") is not None]
    if not loads or env["device"] != "cpu":
        return ""
    return (f" 1-minute load average during the run {min(loads):.1f}-{max(loads):.1f} on "
            f"{env['cpu_count']} CPUs (ours and the baseline of a row are timed with "
            f"interleaved repeats, so the load hits both).")


def _fmt_ratio(x):
    return "-" if x is None else (f"{x:.3f}" if x < 0.1 else f"{x:.2f}")


def results_markdown(rows, env) -> str:
    lines = [f"# Benchmarks: {env['device']} ({env.get('gpu') or env['cpu']})", "",
             f"date {env['date']}, commit `{env['commit']}`{' (dirty)' if env['dirty'] else ''}, "
             f"python {env['python']}, numpy {env['numpy']}, torch {env['torch']}, "
             f"cupy {env['cupy']}, torch threads {env['torch_threads']}.", "",
             f"Time: {env['time_method']} (median). Memory: {env['memory_method']}."
             f"{_load_note(rows, env)}", "",
             ]
    if any(r["suite"] == "headline" for r in rows):
        lines += ["## Headline", "", headline_markdown(rows, env)]
    for suite, title in (("small", "Small shapes"), ("resolution", "Resolution sweep")):
        if any(r["suite"] == suite for r in rows):
            lines += [f"## {title}: side by side (ratio = time / baseline's time)", "",
                      ratios_markdown(rows, suite)]
    lines += ["## All rows", "",
              "| suite | impl | dtype | B | C | HxW | k | heads/Dqk/Dv | border | fwd | fwd+bwd | "
              "fwd mem | fwd+bwd mem | check err | BW share fwd / fwd+bwd | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bw = "-"
        if r.get("fwd_bw_share") is not None:
            bw = f"{100 * r['fwd_bw_share']:.1f}% / {100 * (r.get('fwdbwd_bw_share') or 0):.1f}%"
        err = r.get("check_max_rel_err")
        lines.append(
            f"| {r['suite']} | {r['impl']} | {r['dtype']} | {r['B']} | {r['C']} | "
            f"{r['H']}x{r['W']} | {r['k']} | {r['heads']}/{r['dqk']}/{r['dv']} | {r['border']} | "
            f"{M.fmt_time(r.get('fwd_s'))} | {M.fmt_time(r.get('fwdbwd_s'))} | "
            f"{M.fmt_bytes(r.get('fwd_mem_bytes'))} | {M.fmt_bytes(r.get('fwdbwd_mem_bytes'))} | "
            f"{'-' if err is None else f'{err:.1e}'} | {bw} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def plots(rows, env, out_dir) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    axis = {"resolution": ("H", "resolution (H = W)"), "kernel": ("k", "kernel size k"),
            "channels": ("C", "channels C")}
    written = []
    for suite, (field, xlabel) in axis.items():
        for dtype in sorted({r["dtype"] for r in rows if r["suite"] == suite}):
            for family in ("lrnet", "sasa"):
                sel = [r for r in rows if r["suite"] == suite and r["dtype"] == dtype
                       and r["family"] == family]
                if not sel:
                    continue
                fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=72)
                for impl in sorted({r["impl"] for r in sel}):
                    pts = sorted((r[field], r.get("fwdbwd_s"), r.get("fwdbwd_mem_bytes"))
                                 for r in sel if r["impl"] == impl)
                    style = "-o" if impl.startswith("ours") else "--s"
                    for ax, idx, scale in ((axes[0], 1, 1e3), (axes[1], 2, 1 / 2 ** 20)):
                        xs = [p[0] for p in pts if p[idx] is not None]
                        ys = [p[idx] * scale for p in pts if p[idx] is not None]
                        if xs:
                            ax.plot(xs, ys, style, label=impl, markersize=4)
                sample = sel[0]
                fixed = {"resolution": f"B={sample['B']} C={sample['C']} k={sample['k']}",
                         "kernel": f"B={sample['B']} C={sample['C']} {sample['H']}x{sample['W']}",
                         "channels": f"B={sample['B']} {sample['H']}x{sample['W']} k={sample['k']}"}
                for ax, ylabel in ((axes[0], "fwd+bwd time (ms)"),
                                   (axes[1], "fwd+bwd peak memory (MiB)")):
                    ax.set_xlabel(xlabel)
                    ax.set_ylabel(ylabel)
                    ax.set_yscale("log")
                    ax.grid(alpha=0.3)
                axes[0].legend(fontsize=7)
                fig.suptitle(f"{family} shape, {env['device']} {dtype}, {fixed[suite]}",
                             fontsize=9)
                fig.tight_layout()
                name = f"{env['device']}-{dtype}-{family}-{suite}.png"
                fig.savefig(os.path.join(out_dir, name), dpi=72)
                plt.close(fig)
                written.append(name)
    return written


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpu", action="store_true", help="the GPU suite (needs CUDA)")
    g.add_argument("--cpu", action="store_true", help="the CPU suite even if a GPU is present")
    p.add_argument("--quick", action="store_true", help="a short run (CPU: < 2 minutes)")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    p.add_argument("--max-gib", type=float, default=None,
                   help="skip unfold baselines whose estimated peak exceeds this")
    p.add_argument("--only", default=None, help="comma list of suites (headline,small,"
                   "resolution,kernel,channels)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new case after S seconds (the rest is listed as not run)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--render", metavar="RESULTS_JSON", default=None,
                   help="only rewrite the Markdown and plots from a (partial) results.json")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            doc = json.load(f)
        out_dir = args.out or os.path.dirname(os.path.abspath(args.render))
        _render(out_dir, doc["environment"], doc["rows"])
        return 0

    cuda = torch.cuda.is_available()
    if args.gpu and not cuda:
        print("--gpu: no CUDA device visible to torch", file=sys.stderr)
        return 2
    dev = GPU() if (cuda and not args.cpu) else CPU()
    if dev.kind == "cuda":
        repeats = args.repeats or (5 if args.quick else 10)
    else:
        repeats = args.repeats or (2 if args.quick else 3)
    if dev.kind == "cuda":
        try:
            from torch import _dynamo
            _dynamo.config.cache_size_limit = max(64, _dynamo.config.cache_size_limit)
        except Exception:
            pass
    if args.max_gib is not None:
        max_bytes = int(args.max_gib * 2 ** 30)
    elif dev.kind == "cuda":
        max_bytes = int(0.6 * torch.cuda.get_device_properties(0).total_memory)
    else:
        max_bytes = int(0.35 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    env = environment(dev)
    items = plan(dev.kind, args.quick)
    if args.only:
        keep = set(args.only.split(","))
        items = [i for i in items if i["suite"] in keep]
    adapter = bl.torch_adapter()
    env["torch_adapter"] = adapter is not None
    env["quick"] = args.quick
    env["repeats"] = repeats
    date = env["date"][:10]
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       f"{device_slug(env)}-{date}" + ("-quick" if args.quick else ""))
    os.makedirs(out_dir, exist_ok=True)

    from tqdm import tqdm
    import time as _time
    t_start = _time.monotonic()
    rows = []
    bar = tqdm(items, disable=args.no_progress, desc=f"benchmarks ({dev.kind})", unit="case")
    # SIGTERM (a step timeout) ends the loop like Ctrl-C: the figures so far are written.
    signal.signal(signal.SIGTERM, _terminate)
    interrupted = None
    try:
        for item in bar:
            # FlexAttention compiles (about two minutes for forward and backward): start it
            # only if that still fits the budget.
            cost = FLEX_COMPILE_S if item["baseline"].endswith("flex") and dev.kind == "cuda" else 0
            if args.time_budget is not None and \
                    _time.monotonic() - t_start + cost > args.time_budget:
                heads, dqk, dv = bl.shape_of(item["baseline"], item["C"])
                rows.append(dict(device=dev.kind, suite=item["suite"], impl=item["baseline"],
                                 dtype=item["dtype"], B=item["B"], C=item["C"], H=item["H"],
                                 W=item["W"], k=item["k"], family=bl.FAMILY[item["baseline"]],
                                 heads=heads, dqk=dqk, dv=dv, border=None,
                                 note=f"not run: --time-budget {args.time_budget:g} s"))
                continue
            bar.set_postfix_str(f"{item['suite']} {item['baseline']} {item['dtype']} "
                                f"{item['H']}x{item['W']} k={item['k']} C={item['C']}")
            try:
                rows.extend(measure_item(item, dev, repeats, max_bytes, adapter, args.quick))
            except Exception as exc:  # keep going: one broken case must not lose the run
                traceback.print_exc()
                rows.append(dict(device=dev.kind, suite=item["suite"], impl=item["baseline"],
                                 dtype=item["dtype"], B=item["B"], C=item["C"], H=item["H"],
                                 W=item["W"], k=item["k"], family=bl.FAMILY[item["baseline"]],
                                 heads=None, dqk=None, dv=None, border=None,
                                 note=f"error: {type(exc).__name__}: {exc}"[:300]))
            if dev.kind == "cuda":
                torch.cuda.empty_cache()
            _write_json(out_dir, env, rows, partial=True)  # a killed run still leaves figures
    except KeyboardInterrupt as exc:
        interrupted = str(exc) or "interrupted"
        env["interrupted"] = interrupted
    finally:
        bar.close()
    env["wall_s"] = round(_time.monotonic() - t_start, 1)
    _write_json(out_dir, env, rows, partial=interrupted is not None)
    _render(out_dir, env, rows)
    return 1 if interrupted else 0


FLEX_COMPILE_S = 120


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: stopped early")


def _render(out_dir, env, rows):
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(results_markdown(rows, env))
    headline = any(r["suite"] == "headline" for r in rows)   # not with --only small,...
    if headline:
        with open(os.path.join(out_dir, "headline.md"), "w") as f:
            f.write(headline_markdown(rows, env))
        print(headline_markdown(rows, env))
    pngs = plots([r for r in rows if r.get("heads") is not None], env, out_dir)
    print(f"wrote {out_dir}: results.json, results.md{', headline.md' if headline else ''}, "
          f"{len(pngs)} PNG plots")


def _write_json(out_dir, env, rows, partial):
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(dict(environment=dict(env, partial=partial), rows=rows), f, indent=1,
                  default=_json_default)
    os.replace(tmp, os.path.join(out_dir, "results.json"))


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
