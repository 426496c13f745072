"""A/B of kernel variants on a GPU: the changes the model could not decide, kept as patches.

The model's issue estimate scales the engine's dynamic requests by the kernel's *static*
instruction mix, so a change that only moves the compiler's unrolling can swing a modelled
time by 10% either way (kernels/PROFILING.md, "Limits"). Changes it rejected on that ground
are kept as patches (``git diff`` output) in their results folders; this script measures
them against the tree as it is, on one GPU in one run:

    python -m benchmarks.gpu_variants --out DIR [PATCH ...]   # default: benchmarks/results/*/*.patch
    python -m benchmarks.gpu_variants --dry-run --out DIR      # no GPU: apply, import, plan
    python -m benchmarks.gpu_variants --check-sim --out DIR    # no GPU: each patched copy's
                                                               # sim kernel tests

Each patch is applied to a copy of the tree (``git apply``; ``patch -p1 --fuzz=0`` only where
git is missing); a patch that no longer applies exactly is reported as stale. Then, in
rounds (base, every variant, base, every variant, ...), every kernel of the profiled ops is
timed with CUDA events by ``benchmarks.gpu_profile time`` in a fresh process on the copy
(``--model`` picks the ops and the shape, e.g. a k=3 profile); each kernel keeps its
fastest run. ``variants.json`` and ``variants.md`` are rewritten after every run, so a
lease that ends early still returns what was measured: per variant, op and kernel, base
and variant microseconds and their ratio. The first run of each tree compiles its kernels
(NVRTC, about 25 s). No run starts after ``--time-limit`` and none outlasts it. The exit
status is non-zero when a patch is stale, a run fails, or an applied variant is left
without a time.
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
from cupy_localrel._profile import kernel_base  # noqa: E402

# What a copy needs for `benchmarks.gpu_profile` and (--check-sim) the kernel tests with
# the project's pytest configuration; a patch may touch any of it.
COPIED = ("cupy_localrel", "adapters", "benchmarks", "tests", "pyproject.toml")
SIM_CHECK = ("tests/test_kernels.py", "-k", "sim and float32")
SKIPPED = shutil.ignore_patterns("results", "__pycache__", "*.pyc", "build")


def default_patches() -> list[str]:
    return sorted(glob.glob(str(ROOT / "benchmarks" / "results" / "*" / "*.patch")))


def variant_name(patch: str) -> str:
    return f"{Path(patch).parent.name}/{Path(patch).stem}"


def copy_tree(dest: Path) -> Path:
    """The parts of this tree a run needs, under ``dest``."""
    for part in COPIED:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=SKIPPED)
        elif src.exists():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    return dest


def _env(tree: Path, **extra) -> dict:
    """The environment of a run on ``tree``: its package first on the path."""
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1", **extra)


def apply_patch(patch: str, tree: Path) -> tuple[bool, str]:
    """Apply ``patch`` (paths relative to the repository root) inside ``tree``, exactly (no
    fuzz); (ok, message)."""
    try:
        text = Path(patch).read_bytes()
    except OSError as exc:
        return False, f"unreadable: {exc}"
    if shutil.which("git"):
        # A copy inside another work tree (TMPDIR under a checkout) would make git apply the
        # patch relative to that repository, i.e. not at all: stop git's search at the copy.
        cmd = ["git", "apply", "--whitespace=nowarn", "-"]
        env = _env(tree, GIT_CEILING_DIRECTORIES=str(tree.parent))
    elif shutil.which("patch"):
        cmd, env = ["patch", "-p1", "--forward", "--batch", "--silent", "--fuzz=0", "--no-backup-if-mismatch"], None
    else:
        return False, "neither git nor patch is installed"
    r = subprocess.run(cmd, input=text, cwd=tree, env=env, capture_output=True, timeout=60)
    if r.returncode == 0:
        return True, " ".join(cmd[:2])
    return False, f"stale (does not apply): {cmd[0]}: {(r.stderr or r.stdout).decode(errors='replace').strip()[:300]}"


def _run(cmd: list[str], tree: Path, timeout: float) -> dict:
    start = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=max(1.0, timeout))
        rc, log = r.returncode, (r.stdout + r.stderr)[-2000:]
    except subprocess.TimeoutExpired as exc:
        partial = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                          for x in (exc.stdout, exc.stderr))
        rc, log = "timeout", f"no result within {timeout:.0f} s; last output: {partial[-1500:]}"
    return {"rc": rc, "seconds": round(time.monotonic() - start, 1), "log": log}


def time_tree(tree: Path, model: str, out_json: Path, repeat: int, timeout: float, dry_run: bool) -> dict:
    """One `benchmarks.gpu_profile time` run on ``tree`` in a fresh process (``dry-run``: it
    imports the copy's package and plans, without a GPU)."""
    mode = ["dry-run"] if dry_run else ["time", "--out", str(out_json), "--repeat", str(repeat)]
    result = _run([sys.executable, "-m", "benchmarks.gpu_profile", *mode, "--model", model], tree, timeout)
    if result["rc"] == 0 and not dry_run:
        result["times"] = json.loads(out_json.read_text())
    return result


def check_sim(tree: Path, timeout: float) -> dict:
    """The sim kernel tests (float32) on ``tree``: does the patched copy still compute the
    reference's values? No GPU needed."""
    return _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SIM_CHECK], tree, timeout)


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
    """Per (op, launch): base and variant times. A launch on one side only, or whose kernels
    differ (by base name, as benchmarks.gpu_profile.merge checks), is a row with a problem."""
    base, var = fastest(base_runs), fastest(variant_runs)
    rows = []
    for key in sorted(base.keys() | var.keys()):
        (kb, b), (kv, v) = base.get(key, (None, None)), var.get(key, (None, None))
        row = {"op": key[0], "launch": key[1], "kernel": kb or kv, "base_us": b, "variant_us": v,
               "variant_over_base": v / b if b and v is not None else None}
        if kb is None or kv is None:
            row["problem"] = "timed on one side only"
        elif kernel_base(kb) != kernel_base(kv):
            row["problem"] = f"kernels differ: {kb} vs {kv}"
        rows.append(row)
    return rows


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "/")


def to_markdown(report: dict) -> str:
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)   # noqa: E731
    lines = [f"Kernel variants measured against the tree as it is (CUDA events, fastest run of each kernel; "
             f"timing runs done: {report['runs_done']}), ops and shape of {report['model']}", ""]
    if report["dry_run"]:
        lines += ["DRY RUN without a GPU: patches applied, copies imported, runs planned; nothing timed.", ""]
    lines += ["| variant | applied | op | kernel | base us | variant us | variant / base |",
              "|---|---|---|---|---:|---:|---:|"]
    for v in report["variants"]:
        applied = _cell(v["applied"])
        if not v["rows"]:
            what = "not timed" if v["ok"] else "-"
            lines.append(f"| {v['name']} | {applied} | {what} | - | - | - | - |")
        for r in v["rows"]:
            ratio = fmt(r["variant_over_base"], "{:.3f}") + (f" ({_cell(r['problem'])})" if r.get("problem") else "")
            lines.append(f"| {v['name']} | {applied} | {r['op']} | {r['kernel']} | {fmt(r['base_us'])} | "
                         f"{fmt(r['variant_us'])} | {ratio} |")
    return "\n".join(lines) + "\n"


def _write(out: Path, report: dict) -> None:
    for v in report["variants"]:
        v["rows"] = compare(report["base_runs"], v["runs"])
    (out / "variants.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "variants.md").write_text(to_markdown(report))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_variants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("patches", nargs="*", help="patch files (default: benchmarks/results/*/*.patch)")
    ap.add_argument("--out", required=True, help="folder for variants.json and variants.md")
    ap.add_argument("--model", default=None, help="profile JSON whose ops and shape are timed "
                                                  "(default: the newest benchmarks/results/profile-*)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10, help="timed launches per kernel and run")
    ap.add_argument("--time-limit", type=float, default=150, help="seconds for all the runs together")
    ap.add_argument("--run-timeout", type=float, default=90, help="seconds per run at most")
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
    report = {"model": os.path.relpath(model, ROOT), "dry_run": args.dry_run, "runs_done": 0,
              "base_runs": [], "variants": []}
    with tempfile.TemporaryDirectory(prefix="gpu_variants_") as tmp:
        trees = {"base": copy_tree(Path(tmp) / "base")}
        for patch in patches:
            name = variant_name(patch)
            tree = copy_tree(Path(tmp) / f"v{len(report['variants'])}")
            ok, message = apply_patch(patch, tree)
            report["variants"].append({"name": name, "patch": os.path.relpath(patch, ROOT), "applied": message,
                                       "ok": ok, "runs": []})
            if ok:
                trees[name] = tree
                if args.check_sim:
                    report["variants"][-1]["sim_check"] = check_sim(tree, args.run_timeout * 5)
                    message += f"; sim tests rc={report['variants'][-1]['sim_check']['rc']}"
            print(f"{name}: {message}", flush=True)
        if args.check_sim:
            failed = [v["name"] for v in report["variants"] if v.get("sim_check", {}).get("rc") != 0]
            (out / "variants-sim-check.json").write_text(json.dumps(report["variants"], indent=1, default=str) + "\n")
            print("sim tests failed or not run: " + (", ".join(failed) or "none"))
            return 1 if failed else 0
        for rnd in range(args.rounds):
            for i, (name, tree) in enumerate(trees.items()):
                left = deadline - time.monotonic()
                if left < 5:
                    break
                run = time_tree(tree, model, Path(tmp) / f"times-{rnd}-{i}.json", args.repeat,
                                min(args.run_timeout, left), args.dry_run)
                run["round"] = rnd
                print(f"round {rnd} {name}: rc={run['rc']} ({run['seconds']} s)", flush=True)
                runs = report["base_runs"] if name == "base" else \
                    next(v for v in report["variants"] if v["name"] == name)["runs"]
                runs.append(run)
                report["runs_done"] += 1
                _write(out, report)
    _write(out, report)
    print(to_markdown(report))
    runs = report["base_runs"] + [r for v in report["variants"] for r in v["runs"]]
    problems = [v["name"] for v in report["variants"] if not v["ok"]]
    problems += [f"run rc={r['rc']}" for r in runs if r["rc"] != 0]
    if not args.dry_run:
        problems += [v["name"] + " not timed" for v in report["variants"]
                     if v["ok"] and not any(r.get("variant_us") is not None for r in v["rows"])]
        problems += [f"{v['name']} {r['op']}[{r['launch']}]: {r['problem']}" for v in report["variants"]
                     for r in v["rows"] if r.get("problem")]
    if problems or not report["base_runs"]:
        print("problems: " + ("; ".join(problems) or "no base run"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
