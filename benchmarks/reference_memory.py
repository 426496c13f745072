"""Issue 2: extra memory and time of forward+backward, NumPy reference vs torch unfold.

Shape: B=8, C=64, 56x56, k=7, LR-Net layout (heads=8, Dqk=1, Dv=8: q, k ``(8, 8, 56, 56)``,
v ``(8, 64, 56, 56)``), float32, ``border="zeros"`` (the unfold semantics), geometry bias,
scale 1. The unfold side is :func:`benchmarks.baselines.lrnet_unfold` with autograd.

Every measurement runs in a fresh subprocess (inputs and the output gradient allocated
before measuring). Memory = peak minus baseline of

- resident set size (``VmHWM`` reset through ``/proc/self/clear_refs``, glibc's mmap
  threshold pinned, see :mod:`benchmarks._measure`) for both sides: this sees torch's
  CPU allocations, which tracemalloc does not;
- tracemalloc, for ours only (NumPy reports its buffers to it).

Time: median wall clock of ``--repeats`` forward+backward calls after one warm-up, all
sides in one process with the repeats interleaved (the machine may be shared: the load
then hits every side alike; the 1-minute load average is recorded).
Targets (issue 2): ours <= 1/5 of unfold's memory and <= 1.5x its time.

    python -m benchmarks.reference_memory [--repeats 5] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPE = dict(B=8, C=64, H=56, W=56, k=7)


def _setup(side: str, threads: int | None):
    import numpy as np
    import torch

    from benchmarks import baselines as bl
    if threads:
        torch.set_num_threads(threads)
    case = bl.make_case("lrnet-unfold", SHAPE["B"], SHAPE["C"], SHAPE["H"], SHAPE["W"],
                        SHAPE["k"], dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    ho, wo = SHAPE["H"], SHAPE["W"]
    grad = torch.randn(SHAPE["B"], SHAPE["C"], ho, wo, generator=g)
    if side.startswith("ours"):
        a = bl.ours_arrays(case)
        grad_np = np.ascontiguousarray(grad.numpy())

        def run():
            return bl.ours_forward_backward(a, grad_np)
        return run
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in case.inputs.items()}

    def run():
        for t in leaves.values():
            t.grad = None
        out = case.run_baseline(leaves)
        out.backward(grad)
        return out, {n: t.grad for n, t in leaves.items()}
    return run


def child(side: str, what: str, repeats: int, threads: int | None) -> dict:
    """One side, one kind of figure. Memory and time run in separate processes: pinning
    glibc's mmap threshold (needed to see freed-and-reused memory) makes every large
    temporary a fresh mapping and would slow the timed calls with page faults."""
    from benchmarks import _measure as M
    res = dict(side=side)
    if what == "mem":
        res["malloc_pinned"] = M.pin_malloc()
        run = _setup(side, threads)
        res["rss_peak_bytes"], result = M.rss_peak(run)
        del result
        if side.startswith("ours"):
            res["traced_peak_bytes"], result = M.traced_peak(run)
            del result
    else:
        run = _setup(side, threads)
        times = M.wall_times(run, warmup=1, repeats=repeats)
        res["times_s"] = times
        res["median_s"] = M.median(times)
    import torch
    res["torch_threads"] = torch.get_num_threads()
    return res


def time_all(repeats: int, threads: int | None) -> dict:
    """Median forward+backward time of every side, measured in one process with the
    repeats interleaved (ours, unfold, ours, ...): on a shared machine the
    load then hits every side alike, and the ratios stay meaningful."""
    import time

    import torch

    from benchmarks import _measure as M
    runs = {"ours": _setup("ours", threads), "unfold": _setup("unfold", threads)}
    for fn in runs.values():  # warm-up
        fn()
    times = {name: [] for name in runs}
    load = [os.getloadavg()[0]]
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        load.append(os.getloadavg()[0])
    return {name: dict(times_s=t, median_s=M.median(t), torch_threads=torch.get_num_threads(),
                       loadavg_1min=load) for name, t in times.items()}


def check_equal() -> dict:
    """Both sides on the same inputs: output and every gradient, max relative error."""
    from benchmarks import baselines as bl
    ours_out, ours_g = _setup("ours", None)()
    theirs_out, theirs_g = _setup("unfold", None)()
    errs = {"out": bl.rel_error(theirs_out.detach(), ours_out),
            "grad x (v)": bl.rel_error(theirs_g["x"], ours_g.v),
            "grad key (k)": bl.rel_error(theirs_g["key"], ours_g.k),
            "grad query (q)": bl.rel_error(theirs_g["query"], ours_g.q),
            "grad geometry (bias)": bl.rel_error(theirs_g["geometry"], ours_g.bias)}
    return errs


def _spawn(side: str, what: str, repeats: int, threads: int | None) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.reference_memory", "--child", side, "--what", what,
           "--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spawn_time_all(repeats: int, threads: int | None) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.reference_memory", "--time-all",
           "--repeats", str(repeats)] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(ours: dict, unfold: dict, errs: dict) -> str:
    from benchmarks._measure import fmt_bytes, fmt_time
    mem_ratio = ours["rss_peak_bytes"] / unfold["rss_peak_bytes"]
    time_ratio = ours["median_s"] / unfold["median_s"]
    lines = [
        f"forward+backward, B={SHAPE['B']} C={SHAPE['C']} {SHAPE['H']}x{SHAPE['W']} "
        f"k={SHAPE['k']} heads=8 Dqk=1 Dv=8, float32, border=zeros, CPU "
        f"(torch threads: {unfold['torch_threads']})",
        "",
        "| implementation | peak extra memory (RSS) | peak extra memory (tracemalloc) | time (median) |",
        "|---|---|---|---|",
        f"| ours (NumPy reference) | {fmt_bytes(ours['rss_peak_bytes'])} | "
        f"{fmt_bytes(ours.get('traced_peak_bytes'))} | {fmt_time(ours['median_s'])} |",
        f"| torch unfold (autograd) | {fmt_bytes(unfold['rss_peak_bytes'])} | "
        f"not seen by tracemalloc | {fmt_time(unfold['median_s'])} |",
        "",
        f"memory ratio ours/unfold (RSS): {mem_ratio:.3f}  (target <= 0.200: "
        f"{'met' if mem_ratio <= 0.2 else 'MISSED'})",
        f"time ratio ours/unfold: {time_ratio:.2f}x  (target <= 1.5x: "
        f"{'met' if time_ratio <= 1.5 else 'MISSED'}; 1-min load average during timing "
        f"{min(ours['loadavg_1min']):.1f}-{max(ours['loadavg_1min']):.1f} on "
        f"{os.cpu_count()} CPUs)",
        "agreement (max |diff| / max(1, max|ours|)): "
        + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()),
    ]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--child", choices=("ours", "unfold"), help=argparse.SUPPRESS)
    p.add_argument("--what", choices=("mem", "time"), default="mem", help=argparse.SUPPRESS)
    p.add_argument("--time-all", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.time_all:
        print(json.dumps(time_all(args.repeats, args.threads)))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.what, args.repeats, args.threads)))
        return 0
    errs = check_equal()
    bad = {k: v for k, v in errs.items() if not v <= 4e-5}
    if bad:
        raise SystemExit(f"ours and unfold disagree: {bad}")
    times = _spawn_time_all(args.repeats, args.threads)
    ours, unfold = ({**_spawn(side, "mem", args.repeats, args.threads), **times[side]}
                    for side in ("ours", "unfold"))
    text = table(ours, unfold, errs)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=SHAPE, ours=ours, unfold=unfold,
                           agreement=errs,
                           memory_ratio=ours["rss_peak_bytes"] / unfold["rss_peak_bytes"],
                           time_ratio=ours["median_s"] / unfold["median_s"]), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
