"""Calibrate the profile model on a real GPU (issue 9): every kernel of the profiled ops timed
with CUDA events, Nsight Compute's sectors and bank conflicts where ncu works, written next
to the model's prediction (``python -m cupy_localrel profile --json``).

    python -m benchmarks.gpu_profile time --model MODEL.json --out times.json     # CuPy + GPU
    ncu --csv ... python -m benchmarks.gpu_profile ncu-run --model MODEL.json     # one launch each
    python -m benchmarks.gpu_profile merge --model MODEL.json [--times T] [--ncu CSV] --out DIR
    python -m benchmarks.gpu_profile dry-run --model MODEL.json --out DIR         # no GPU: plan + merge

The ops run through the package's own launch code (``_backends/_kernel_ops.py``) on a CuPy
target whose kernels record an event pair around each launch, so each kernel of an op's
launch sequence is timed at the model's shape, on random inputs (never zeros). `merge`
matches launches by their order in the op's sequence (the same code launches them on both
sides) and checks the kernel names agree.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cupy_localrel import _profile as P  # noqa: E402
from cupy_localrel._backends import _kernel_ops as K  # noqa: E402

# Nsight Compute metrics (sm_80/sm_90 names) read per kernel.
NCU_METRICS = {
    "global_load_sectors": "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "global_load_requests": "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
    "global_store_sectors": "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
    "global_store_requests": "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",
    "shared_load_wavefronts": "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
    "shared_store_wavefronts": "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
    "shared_load_conflicts": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "shared_store_conflicts": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
    "warp_instructions": "smsp__inst_executed.sum",
    "dram_read_bytes": "dram__bytes_read.sum",
    "dram_write_bytes": "dram__bytes_write.sum",
    "duration_ns": "gpu__time_duration.sum",
}
KERNEL_REGEX = "regex:attention_forward|query_grad|key_grad|table_reduce"


def latest_model(pattern: str = "benchmarks/results/profile-*/profile-h200.json") -> str | None:
    """The newest model: the one whose folder name sorts last. (Sorting whole paths put
    ``profile-2026-12-01/...`` after ``profile-2026-12-01-issue10-tiles/...``, as "/" > "-".)"""
    found = sorted(glob.glob(str(ROOT / pattern)), key=lambda p: Path(p).parent.name)
    return found[-1] if found else None


def load_model(path: str) -> dict:
    rep = json.loads(Path(path).read_text())
    for key in ("ops", "launches", "shape", "kernel_size", "dtype", "border"):
        if key not in rep:
            raise ValueError(f"{path}: not a profile report (no {key!r}); make it with "
                             "python -m cupy_localrel profile --json")
    return rep


# ---------------------------------------------------------------------------------------
# On the GPU
# ---------------------------------------------------------------------------------------
class _TimedKernel:
    def __init__(self, target, kernel, name):
        self.target, self.kernel, self.name = target, kernel, name

    def __call__(self, grid, block, args, shared_mem=0, **kw):
        cp = self.target.xp
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        self.kernel(grid, block, args, shared_mem=shared_mem, **kw)
        stop.record()
        self.target.events.append((self.name, start, stop))


class TimingTarget(K.Target):
    """The ``cupy`` target with an event pair recorded around every launch."""

    def __init__(self):
        super().__init__("cupy")
        self.events: list = []

    def function(self, filename, name):
        return _TimedKernel(self, super().function(filename, name), name)


def _gpu_case(op_name: str, rep: dict, cp):
    """The op's arrays on the GPU with random values (the model's shape and layout)."""
    op, direction = op_name.split("_")
    case = P.op_case(op, direction, rep["shape"], rep["kernel_size"], rep["dtype"], rep["border"])
    rng = cp.random.default_rng(0)

    def rand(a):
        if a is None:
            return None
        x = rng.standard_normal(a.shape, dtype=cp.float32)
        return (x * 0.1 if a.ndim == 3 or a.ndim == 4 and a.shape[0] == case.geo.heads else x).astype(a.dtype)

    inputs = {n: rand(a) for n, a in case.inputs.items()}
    if "lse" in inputs:   # a plausible log-sum-exp: log of the window size
        inputs["lse"] = cp.full(case.inputs["lse"].shape, float(case.geo.slots), case.inputs["lse"].dtype)
        inputs["lse"] = cp.log(inputs["lse"])
    return case, inputs


def _run_op(t, case, a, cp):
    if case.name.endswith("forward"):
        K.attention_forward(t, case.geo, a["q"], a["k"], a["v"], a["bias"], a["rel"])
    else:
        out = cp.zeros(case.geo.out_shape, case.geo.dtype)
        K.attention_backward(t, case.geo, a["grad_out"], a["q"], a["k"], a["v"], out, a["lse"], a["bias"], a["rel"])


def time_ops(rep: dict, repeat: int = 10, warmup: int = 2) -> dict:
    """Median event time of every launch of every op of the model (ms -> us)."""
    import cupy as cp
    t = TimingTarget()
    out = {"ops": []}
    for o in rep["ops"]:
        case, a = _gpu_case(o["name"], rep, cp)
        per_launch: list[list[float]] = []
        names: list[str] = []
        totals = []
        for i in range(warmup + repeat):
            t.events = []
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            _run_op(t, case, a, cp)
            stop.record()
            stop.synchronize()
            if i < warmup:
                continue
            totals.append(cp.cuda.get_elapsed_time(start, stop) * 1e3)
            names = [n for n, _, _ in t.events]
            for j, (_, s, e) in enumerate(t.events):
                if len(per_launch) <= j:
                    per_launch.append([])
                per_launch[j].append(cp.cuda.get_elapsed_time(s, e) * 1e3)
        out["ops"].append({"name": o["name"], "measured_us": statistics.median(totals),
                           "launches": [{"kernel": n, "measured_us": statistics.median(v)}
                                        for n, v in zip(names, per_launch)]})
        print(f"{o['name']}: {statistics.median(totals):.1f} us measured, {o['predicted_us']:.1f} us modelled",
              flush=True)
    return out


def ncu_run(rep: dict) -> None:
    """Run every op once (ncu profiles the launches; it replays each, so no repetition)."""
    import cupy as cp
    t = K.Target("cupy")
    for o in rep["ops"]:
        case, a = _gpu_case(o["name"], rep, cp)
        _run_op(t, case, a, cp)
        cp.cuda.get_current_stream().synchronize()
        print(f"{o['name']}: ran once", flush=True)


# ---------------------------------------------------------------------------------------
# Anywhere: read ncu's CSV and merge
# ---------------------------------------------------------------------------------------
def parse_ncu_csv(text: str) -> list[dict]:
    """[{kernel, <metric key>: value}] in launch order from ``ncu --csv`` (one row per metric)."""
    start = text.find('"ID"')
    if start < 0:
        return []
    rows = csv.DictReader(io.StringIO(text[start:]))
    by_metric = {v: k for k, v in NCU_METRICS.items()}
    launches: dict[int, dict] = {}
    for r in rows:
        try:
            i = int(r["ID"])
        except (KeyError, ValueError):
            continue
        entry = launches.setdefault(i, {"kernel": r.get("Kernel Name", "")})
        key = by_metric.get(r.get("Metric Name", ""))
        if key:
            try:
                entry[key] = float(str(r.get("Metric Value", "")).replace(",", ""))
            except ValueError:
                pass
    return [launches[i] for i in sorted(launches)]


def merge(rep: dict, times: dict | None, ncu: list[dict] | None) -> dict:
    """The model's launches and ops with measured times (and ncu's counters) beside them."""
    rows, ncu = [], list(ncu or [])
    measured_ops = {o["name"]: o for o in (times or {}).get("ops", [])}
    for o in rep["ops"]:
        launches = [r for r in rep["launches"] if r["op"] == o["name"]]
        measured = measured_ops.get(o["name"], {}).get("launches", [])
        for i, r in enumerate(launches):
            row = {"op": o["name"], "kernel": r["kernel"], "modelled_us": r["model"]["predicted_us"],
                   "modelled_bound": r["model"]["bound"],
                   # both issue estimates, so a measured issue-bound kernel tells which is closer
                   "modelled_issue_us": r["model"]["times_us"]["issue"],
                   "modelled_issue_per_block_us": r["model"].get("issue_per_block_us"),
                   "engine_global_load_sectors_per_request":
                       r["global_load"]["sectors"] / max(1, r["global_load"]["requests"]),
                   "engine_shared_load_wavefronts": r["shared_load"]["wavefronts"],
                   "engine_shared_store_wavefronts": r["shared_store"]["wavefronts"]}
            if i < len(measured):
                if P.kernel_base(measured[i]["kernel"]) != P.kernel_base(r["kernel"]):
                    raise ValueError(f"{o['name']} launch {i}: measured {measured[i]['kernel']} vs "
                                     f"modelled {r['kernel']}")
                row["measured_us"] = measured[i]["measured_us"]
                row["measured_over_modelled"] = row["measured_us"] / row["modelled_us"]
            if ncu:
                n = ncu.pop(0)
                if P.kernel_base(r["kernel"]) not in n["kernel"]:
                    raise ValueError(f"ncu launch {n['kernel']!r} does not match {r['kernel']!r}")
                row["ncu"] = {k: v for k, v in n.items() if k != "kernel"}
                if n.get("global_load_requests"):
                    row["ncu_global_load_sectors_per_request"] = n["global_load_sectors"] / n["global_load_requests"]
            rows.append(row)
    ops = []
    for o in rep["ops"]:
        m = measured_ops.get(o["name"], {})
        ops.append({"name": o["name"], "modelled_us": o["predicted_us"], "floor_us": o["floor_us"],
                    "modelled_bound": o["bound"], "measured_us": m.get("measured_us"),
                    "measured_share": o["floor_us"] / m["measured_us"] if m.get("measured_us") else None})
    return {"device_model": rep["device"], "shape": rep["shape"], "kernel_size": rep["kernel_size"],
            "dtype": rep["dtype"], "ops": ops, "launches": rows}


def to_markdown(m: dict) -> str:
    lines = [f"Measured (CUDA events, ncu) vs modelled ({m['device_model']}), shape {tuple(m['shape'])}, "
             f"k={m['kernel_size']}, {m['dtype']}", ""]
    if m.get("dry_run"):
        lines += ["DRY RUN without a GPU: the 'measured' columns repeat the modelled figures.", ""]
    lines += [
             "| op | modelled us | measured us | floor us | measured share | modelled bound |",
             "|---|---:|---:|---:|---:|---|"]
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)   # noqa: E731
    for o in m["ops"]:
        lines.append(f"| {o['name']} | {o['modelled_us']:.1f} | {fmt(o['measured_us'])} | {o['floor_us']:.1f} | "
                     f"{fmt(o['measured_share'], '{:.1%}')} | {o['modelled_bound']} |")
    lines += ["", "| op | kernel | modelled us | issue us: static / per block | measured us | measured/modelled | "
              "sectors/req ld engine | ncu | shared wavefronts engine | ncu |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in m["launches"]:
        n = r.get("ncu", {})
        wf_ncu = (n.get("shared_load_wavefronts", 0) + n.get("shared_store_wavefronts", 0)) if n else None
        lines.append(f"| {r['op']} | {r['kernel']} | {r['modelled_us']:.1f} | {fmt(r.get('modelled_issue_us'))} / "
                     f"{fmt(r.get('modelled_issue_per_block_us'))} | {fmt(r.get('measured_us'))} | "
                     f"{fmt(r.get('measured_over_modelled'), '{:.2f}')} | "
                     f"{r['engine_global_load_sectors_per_request']:.2f} | "
                     f"{fmt(r.get('ncu_global_load_sectors_per_request'), '{:.2f}')} | "
                     f"{r['engine_shared_load_wavefronts'] + r['engine_shared_store_wavefronts']:.3g} | "
                     f"{fmt(wf_ncu, '{:.3g}')} |")
    return "\n".join(lines) + "\n"


def _write(out: str, merged: dict) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "gpu-profile.json").write_text(json.dumps(merged, indent=1) + "\n")
    (d / "gpu-profile.md").write_text(to_markdown(merged))
    print(to_markdown(merged))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("time", "ncu-run", "merge", "dry-run"))
    ap.add_argument("--model", default=None, help="profile JSON (default: the newest benchmarks/results/profile-*)")
    ap.add_argument("--times", help="merge: the JSON written by `time`")
    ap.add_argument("--ncu", help="merge: ncu's CSV output")
    ap.add_argument("--out", help="time: JSON path; merge/dry-run: folder")
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args(argv)
    model_path = args.model or latest_model()
    if not model_path:
        print("error: no profile JSON (python -m cupy_localrel profile --json ...)", file=sys.stderr)
        return 2
    rep = load_model(model_path)
    if args.mode == "time":
        times = time_ops(rep, repeat=args.repeat)
        if args.out:
            Path(args.out).write_text(json.dumps(times, indent=1) + "\n")
        return 0
    if args.mode == "ncu-run":
        ncu_run(rep)
        return 0
    if args.mode == "merge":
        times = json.loads(Path(args.times).read_text()) if args.times and os.path.exists(args.times) else None
        ncu = parse_ncu_csv(Path(args.ncu).read_text()) if args.ncu and os.path.exists(args.ncu) else None
        _write(args.out or ".", merge(rep, times, ncu))
        return 0
    # dry-run: what would be timed, and the merge on the model's own numbers (no GPU)
    fake = {"ops": [{"name": o["name"], "measured_us": o["predicted_us"],
                     "launches": [{"kernel": r["kernel"], "measured_us": r["model"]["predicted_us"]}
                                  for r in rep["launches"] if r["op"] == o["name"]]} for o in rep["ops"]]}
    for o in rep["ops"]:
        print(f"would time {o['name']}: {[r['kernel'] for r in rep['launches'] if r['op'] == o['name']]}")
    if args.out:
        _write(args.out, dict(merge(rep, fake, None), dry_run=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
