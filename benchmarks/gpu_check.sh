#!/usr/bin/env bash
# One GPU check of the CUDA kernels (issue 4), <= 8 minutes on an H100, no network:
#   1. environment record (device, commit, date, versions)         -> env.json
#   2. the GPU test suites: pytest on the cupy backend and the torch adapter's CUDA path
#                                                                    -> pytest.log, torch-cuda.log
#   3. compute-sanitizer memcheck on a small case of every kernel, racecheck on float32
#                                                                    -> memcheck.log, racecheck.log
#   4. kernel benchmarks (LR-Net fp32 forward, SASA fp16 fwd+bwd)   -> bench.json, bench.log
#   5. side-by-side suite vs unfold/FlexAttention (quick GPU sweep) -> suite/ (JSON, Markdown, PNG)
#   6. profile calibration (issue 9): every kernel of LR-Net/SASA fwd+bwd at the profiled shape
#      timed with CUDA events; ncu's sectors and bank conflicts where ncu works; both next to
#      the model's prediction (the newest benchmarks/results/profile-*/profile-h200.json)
#                                                                    -> gpu-profile.{json,md}
# Worst case (every step at its limit plus 5 s of grace) is 8 minutes: steps 1-5 have fixed
# limits (440 s); step 6 only gets what is left of the 8 minutes when it starts (skipped
# under 20 s), so it never stretches the plan.
# Usage: benchmarks/gpu_check.sh [OUT_DIR]   (default benchmarks/results/gpu-<UTC date>)
# On a lent device machine (at most 8 files come back from $OUT), pack the folder:
#   GPU_CHECK_COMMIT=<hash> bash benchmarks/gpu_check.sh /tmp/gpu_check; tar czf "$OUT/gpu_check.tgz" -C /tmp gpu_check
# (GPU_CHECK_COMMIT: the commit under test, for env.json, when .git does not travel)
# After it, with about 3 minutes of the lease left: the kernel variants the model could not
# decide, measured against this tree (python -m benchmarks.gpu_variants --out "$OUT/variants",
# all runs within --time-limit, default 150 s).
# Every step runs under its own timeout; a failing step does not stop the others. The exit
# codes of all steps are in steps.tsv and summary.json; the script exits non-zero if any
# step failed.
set -u

cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY="$(command -v python3 || command -v python)"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
# Kernels compile once (NVRTC) into CuPy's cache; keep it with the results' machine.
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-$HOME/.cupy/kernel_cache}"

SANITIZER="$(command -v compute-sanitizer || true)"
for cand in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
            /opt/nvidia/compute-sanitizer/compute-sanitizer; do
  if [ -z "$SANITIZER" ] && [ -x "$cand" ]; then SANITIZER="$cand"; fi
done

printf 'step\trc\tseconds\tlimit_s\n' > "$OUT/steps.tsv"
FAILED=0
PLAN_S=475                      # 8 minutes minus the last steps' grace
T0=$(date +%s)
left() { echo $(( PLAN_S - ($(date +%s) - T0) )); }
# step NAME LIMIT_SECONDS LOGFILE CMD...: run with a timeout, record rc and duration.
step() {
  local name="$1" limit="$2" log="$3"; shift 3
  local start rc
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/progress.log"
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" >> "$OUT/steps.tsv"
  echo "   $name: rc=$rc ($(( $(date +%s) - start ))s)" | tee -a "$OUT/progress.log"
  [ "$rc" -eq 0 ] || FAILED=1
  return 0
}

# 1. environment ---------------------------------------------------------------------------
step env 15 env.log "$PY" - "$OUT/env.json" <<'EOF'
import json, os, platform, subprocess, sys, time
out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": sys.version,
       "platform": platform.platform()}
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        return f"unavailable: {exc}"
out["commit"] = os.environ.get("GPU_CHECK_COMMIT") or run("git", "rev-parse", "HEAD")
out["git_status"] = run("git", "status", "--short")
out["nvidia_smi"] = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.memory",
                        "--format=csv,noheader")
for mod in ("numpy", "cupy", "torch", "ml_dtypes", "pytest"):
    try:
        out[mod] = __import__(mod).__version__
    except Exception as exc:
        out[mod] = f"unavailable: {exc}"
try:
    from benchmarks.bench_kernels import device_info
    out["device"] = device_info()
except Exception as exc:
    out["device"] = f"unavailable: {type(exc).__name__}: {exc}"
try:
    import cupy_localrel._backends as b
    out["backends"] = {n: b.backend_status(n) for n in ("numpy", "sim", "cupy")}
except Exception as exc:
    out["backends"] = f"unavailable: {exc}"
json.dump(out, open(sys.argv[1], "w"), indent=2, default=str)
print(json.dumps(out, indent=2, default=str))
EOF

# 2. GPU test suites (the first test compiles the kernels with NVRTC: about 25 s) ----------
step pytest 140 pytest.log "$PY" -m pytest tests/test_kernels.py -k cupy -q -rs -p no:cacheprovider \
  --junitxml="$OUT/pytest.xml"
# The torch adapter's CUDA path: CuPy on torch's stream and device, DLPack both ways, autocast.
step torch-cuda 40 torch-cuda.log "$PY" -m pytest tests/test_torch_adapter.py -m gpu -q -rs \
  -p no:cacheprovider --junitxml="$OUT/torch-cuda.xml"

# All-skipped is not a pass here: the point of this script is the GPU.
step tests-ran 10 tests-ran.log "$PY" - "$OUT/pytest.xml" "$OUT/torch-cuda.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
ok = True
for path in sys.argv[1:]:
    try:
        suite = ET.parse(path).getroot()
    except Exception as exc:
        print(f"{path}: unreadable ({exc})"); ok = False; continue
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    ran = int(suite.get("tests", 0)) - int(suite.get("skipped", 0))
    print(f"{path}: {ran} tests ran ({suite.get('skipped')} skipped, {suite.get('failures')} "
          f"failed, {suite.get('errors')} errors)")
    ok = ok and ran > 0
sys.exit(0 if ok else 1)
EOF

# 3. compute-sanitizer: memcheck on every kernel (CuPy's pool off), racecheck on float32 ---
if [ -n "$SANITIZER" ]; then
  step memcheck 85 memcheck.log "$SANITIZER" --tool memcheck --error-exitcode 99 --leak-check no \
    "$PY" -m benchmarks.memcheck_driver
  step racecheck 40 racecheck.log "$SANITIZER" --tool racecheck --error-exitcode 99 \
    "$PY" -m benchmarks.memcheck_driver --dtypes float32
else
  echo "compute-sanitizer not found" > "$OUT/memcheck.log"
  printf 'memcheck\tnot-found\t0\t0\n' >> "$OUT/steps.tsv"
  FAILED=1
fi

# 4. benchmarks ----------------------------------------------------------------------------
step bench 75 bench.log "$PY" -m benchmarks.bench_kernels --out "$OUT/bench.json"

# 5. side-by-side suite (issue 6), needs torch with CUDA ----------------------------------
step suite 35 suite.log "$PY" -m benchmarks.run --gpu --quick --time-budget 25 --no-progress --out "$OUT/suite"

# 6. profile calibration: measured vs modelled, in what is left of the plan ----------------
NCU="$(command -v ncu || true)"
for cand in /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do
  if [ -z "$NCU" ] && [ -x "$cand" ]; then NCU="$cand"; fi
done
# The newest model: the folder name that sorts last, byte by byte (whole paths would put
# "profile-X/" after "profile-X-more/", since "/" > "-"); gpu_profile.latest_model picks
# the same. Tab-separated, so that a path with spaces survives.
MODEL="$(for f in benchmarks/results/profile-*/profile-h200.json; do [ -f "$f" ] && printf '%s\t%s\n' "$(basename "$(dirname "$f")")" "$f"; done | LC_ALL=C sort | tail -n 1 | cut -f2-)"
if [ -z "$MODEL" ]; then
  echo "no profile model JSON (python -m cupy_localrel profile --json)" > "$OUT/gpu-profile.log"
elif [ "$(left)" -ge 20 ]; then
  LIM=$(( $(left) - 10 )); [ "$LIM" -gt 60 ] && LIM=60
  step profile-time "$LIM" profile-time.log "$PY" -m benchmarks.gpu_profile time --model "$MODEL" \
    --out "$OUT/profile-times.json"
  if [ -n "$NCU" ] && [ "$(left)" -ge 30 ]; then
    LIM=$(( $(left) - 10 )); [ "$LIM" -gt 120 ] && LIM=120
    # ncu replays each launch per metric pass: one run of each op; clocks left alone
    step ncu "$LIM" ncu.log "$NCU" --clock-control none --csv -k "regex:attention_forward|query_grad|key_grad|table_reduce" \
      --metrics "$("$PY" -c 'from benchmarks.gpu_profile import NCU_METRICS as M; print(",".join(M.values()))')" \
      "$PY" -m benchmarks.gpu_profile ncu-run --model "$MODEL"
    cp "$OUT/ncu.log" "$OUT/ncu.csv" 2>/dev/null || true
  else
    echo "ncu not found or no time left" > "$OUT/ncu.log"
  fi
  step profile-merge 10 gpu-profile.log "$PY" -m benchmarks.gpu_profile merge --model "$MODEL" \
    --times "$OUT/profile-times.json" --ncu "$OUT/ncu.csv" --out "$OUT"
else
  echo "no time left in the plan for the profile calibration" > "$OUT/gpu-profile.log"
fi

# summary ----------------------------------------------------------------------------------
"$PY" - "$OUT" <<'EOF' || true
import csv, json, os, sys
out = sys.argv[1]
steps = list(csv.DictReader(open(os.path.join(out, "steps.tsv")), delimiter="\t"))
json.dump({"steps": steps, "ok": all(s["rc"] == "0" for s in steps)},
          open(os.path.join(out, "summary.json"), "w"), indent=2)
EOF
echo "results in $OUT"
cat "$OUT/steps.tsv"
exit "$FAILED"
