"""A/B of kernel variants on a GPU: the changes the model could not decide, kept as patches.

The model's issue estimate scales the engine's dynamic requests by the kernel's *static*
instruction mix, so a change that only moves the compiler's unrolling can swing a modelled
time by 10% either way (kernels/PROFILING.md, "Limits"). Changes it rejected on that ground
are kept as patches (``git diff`` output) in their results folders; this script measures
them against the tree as it is, on one GPU in one run:

    python -m benchmarks.gpu_variants --out DIR [PATCH ...]   # default: benchmarks/results/*/*.patch
    python -m benchmarks.gpu_variants --dry-run --out DIR      # no GPU: apply and plan only
    python -m benchmarks.gpu_variants --check-sim --out DIR    # no GPU: each patched copy's
                                                               # sim kernel tests

Each patch is applied to a copy of the package (``git apply``, or ``patch -p1`` where git is
missing); a patch that no longer applies is reported as stale and skipped. Then, in rounds
(base, every variant, base, every variant, ...), every kernel of the profiled ops is timed
with CUDA events by ``benchmarks.gpu_profile time`` in a fresh process on the copy; each
kernel keeps its fastest round. Writes ``variants.json`` and ``variants.md``: per variant,
op and kernel, base and variant microseconds and their ratio. The first round of each tree
compiles its kernels (NVRTC, about 25 s); ``--time-limit`` stops starting new runs.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_profile import latest_model  # noqa: E402

# What a copy needs to run `benchmarks.gpu_profile` (and, --check-sim, the kernel tests).
COPIED = ("cupy_localrel", "benchmarks", "tests")
SIM_CHECK = ("tests/test_kernels.py", "-k", "sim and float32")
SKIPPED = shutil.ignore_patterns("results", "__pycache__", "*.pyc", "build")


def default_patches() -> list[str]:
    return sorted(glob.glob(str(ROOT / "benchmarks" / "results" / "*" / "*.patch")))


def variant_name(patch: str) -> str:
    return f"{Path(patch).parent.name}/{Path(patch).stem}"


def copy_tree(dest: Path) -> Path:
    """The parts of this tree a timing run needs, under ``dest``."""
    for part in COPIED:
        shutil.copytree(ROOT / part, dest / part, ignore=SKIPPED)
    return dest


def apply_patch(patch: str, tree: Path) -> tuple[bool, str]:
    """Apply ``patch`` (paths relative to the repository root) inside ``tree``; (ok, message)."""
    text = Path(patch).read_bytes()
    tools = []
    if shutil.which("git"):
        tools.append(["git", "apply", "--whitespace=nowarn", "-"])
    if shutil.which("patch"):
        tools.append(["patch", "-p1", "--forward", "--batch", "--silent"])
    if not tools:
        return False, "neither git nor patch is installed"
    messages = []
    for cmd in tools:
        r = subprocess.run(cmd, input=text, cwd=tree, capture_output=True, timeout=60)
        if r.returncode == 0:
            return True, " ".join(cmd[:2])
        messages.append(f"{cmd[0]}: {(r.stderr or r.stdout).decode(errors='replace').strip()[:300]}")
    return False, "stale (does not apply): " + "; ".join(messages)


def time_tree(tree: Path, model: str, out_json: Path, repeat: int, timeout: float, dry_run: bool) -> dict:
    """One `benchmarks.gpu_profile time` run on ``tree`` in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    mode = ["dry-run"] if dry_run else ["time", "--out", str(out_json), "--repeat", str(repeat)]
    cmd = [sys.executable, "-m", "benchmarks.gpu_profile", *mode, "--model", model]
    start = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        rc, log = r.returncode, (r.stdout + r.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        rc, log = "timeout", f"no result within {timeout:.0f} s"
    result = {"rc": rc, "seconds": round(time.monotonic() - start, 1), "log": log}
    if rc == 0 and not dry_run:
        result["times"] = json.loads(out_json.read_text())
    return result


def check_sim(tree: Path, timeout: float) -> dict:
    """The sim kernel tests (float32) on ``tree``: does the patched copy still compute the
    reference's values? No GPU needed."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SIM_CHECK]
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        return {"rc": r.returncode, "log": (r.stdout + r.stderr)[-1500:]}
    except subprocess.TimeoutExpired:
        return {"rc": "timeout", "log": f"no result within {timeout:.0f} s"}


def fastest(runs: list[dict]) -> dict[tuple[str, int], tuple[str, float]]:
    """(op, launch index) -> (kernel, fastest measured us) over the runs that gave times."""
    best: dict = {}
    for run in runs:
        for op in run.get("times", {}).get("ops", []):
            for i, launch in enumerate(op.get("launches", [])):
                key, us = (op["name"], i), launch["measured_us"]
                if key not in best or us < best[key][1]:
                    best[key] = (launch["kernel"], us)
    return best


def compare(base_runs: list[dict], variant_runs: list[dict]) -> list[dict]:
    base, var = fastest(base_runs), fastest(variant_runs)
    rows = []
    for key in sorted(base.keys() & var.keys()):
        (kernel, b), (_, v) = base[key], var[key]
        rows.append({"op": key[0], "launch": key[1], "kernel": kernel, "base_us": b, "variant_us": v,
                     "variant_over_base": v / b if b else None})
    return rows


def to_markdown(report: dict) -> str:
    lines = [f"Kernel variants measured against the tree as it is (CUDA events, fastest of "
             f"{report['rounds']} rounds), model shapes from {report['model']}", ""]
    if report["dry_run"]:
        lines += ["DRY RUN without a GPU: patches applied and runs planned, nothing timed.", ""]
    lines += ["| variant | applied | op | kernel | base us | variant us | variant / base |",
              "|---|---|---|---|---:|---:|---:|"]
    for v in report["variants"]:
        if not v["rows"]:
            lines.append(f"| {v['name']} | {v['applied']} | - | - | - | - | - |")
        for r in v["rows"]:
            lines.append(f"| {v['name']} | yes | {r['op']} | {r['kernel']} | {r['base_us']:.1f} | "
                         f"{r['variant_us']:.1f} | {r['variant_over_base']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_variants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("patches", nargs="*", help="patch files (default: benchmarks/results/*/*.patch)")
    ap.add_argument("--out", required=True, help="folder for variants.json and variants.md")
    ap.add_argument("--model", default=None, help="profile JSON whose ops and shape are timed "
                                                  "(default: the newest benchmarks/results/profile-*)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10, help="timed launches per kernel and run")
    ap.add_argument("--time-limit", type=float, default=300, help="seconds; no run starts after it")
    ap.add_argument("--run-timeout", type=float, default=120, help="seconds per timing run")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: apply the patches, plan the runs")
    ap.add_argument("--check-sim", action="store_true",
                    help="no GPU: run the sim kernel tests on each patched copy instead of timing")
    args = ap.parse_args(argv)
    model = args.model or latest_model()
    if not model:
        print("error: no profile JSON (python -m cupy_localrel profile --json ...)", file=sys.stderr)
        return 2
    patches = args.patches or default_patches()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.time_limit
    with tempfile.TemporaryDirectory(prefix="gpu_variants_") as tmp:
        trees = {"base": copy_tree(Path(tmp) / "base")}
        variants = []
        for patch in patches:
            name = variant_name(patch)
            tree = copy_tree(Path(tmp) / f"v{len(variants)}")
            ok, message = apply_patch(patch, tree)
            variants.append({"name": name, "patch": os.path.relpath(patch, ROOT), "applied": message,
                             "ok": ok, "runs": []})
            if ok:
                trees[name] = tree
                if args.check_sim:
                    variants[-1]["sim_check"] = check_sim(tree, args.run_timeout * 5)
                    message += f"; sim tests rc={variants[-1]['sim_check']['rc']}"
            print(f"{name}: {message}", flush=True)
        if args.check_sim:
            failed = [v["name"] for v in variants if v.get("sim_check", {}).get("rc") != 0]
            (out / "variants-sim-check.json").write_text(json.dumps(variants, indent=1, default=str) + "\n")
            print("sim tests failed or not run: " + (", ".join(failed) or "none"))
            return 1 if failed else 0
        base_runs: list[dict] = []
        for rnd in range(args.rounds):
            for i, (name, tree) in enumerate(trees.items()):
                if time.monotonic() > deadline:
                    break
                run = time_tree(tree, model, Path(tmp) / f"times-{rnd}-{i}.json", args.repeat,
                                args.run_timeout, args.dry_run)
                run["round"] = rnd
                print(f"round {rnd} {name}: rc={run['rc']} ({run['seconds']} s)", flush=True)
                if name == "base":
                    base_runs.append(run)
                else:
                    next(v for v in variants if v["name"] == name)["runs"].append(run)
    for v in variants:
        v["rows"] = compare(base_runs, v["runs"])
    report = {"model": os.path.relpath(model, ROOT), "rounds": args.rounds, "dry_run": args.dry_run,
              "base_runs": base_runs, "variants": variants}
    (out / "variants.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "variants.md").write_text(to_markdown(report))
    print(to_markdown(report))
    failed = [r for r in base_runs + [r for v in variants for r in v["runs"]] if r["rc"] != 0]
    return 1 if failed or not base_runs else 0


if __name__ == "__main__":
    sys.exit(main())
