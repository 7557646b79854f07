#!/usr/bin/env bash
# One-command GPU check (fits 8 minutes): build the CUDA extension in place, run the GPU tests, benchmark.
#
#   bench/gpu_check.sh OUTDIR
#
# Uses the Python found first among $PYTHON, <repo>/.venv/bin/python, python3, python that can import
# torch; installs nothing (GPU machines may be offline). Needs torch with CUDA; triton, pytest, and the
# build tools (pybind11, cmake, ninja or make, nvcc) are each optional: what is missing is reported and
# its step skipped. Writes OUTDIR/{build,tests,bench}.log and OUTDIR/gpu-<card>.{md,json}.
# Env: AUTOSCULPT_CUDA_ARCHS (default 90), GPU_CHECK_TOTAL_S (default 470).
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL_S:-470}
elapsed() { echo $(( $(date +%s) - T0 )); }
status=0

PY=""
for cand in "${PYTHON:-}" "$REPO/.venv/bin/python" python3 python; do
  [ -n "$cand" ] || continue
  command -v "$cand" >/dev/null 2>&1 || [ -x "$cand" ] || continue
  if "$cand" -c "import torch" >/dev/null 2>&1; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
  echo "[gpu_check] FAIL: no Python with torch found (tried \$PYTHON, $REPO/.venv/bin/python, python3, python)." >&2
  echo "[gpu_check] This machine is offline: install torch (with CUDA) and triton beforehand." >&2
  exit 2
fi
"$PY" - <<'PYEOF' || exit 2
import sys, importlib.util, torch
print(f"[gpu_check] python {sys.version.split()[0]} at {sys.executable}; torch {torch.__version__} (CUDA {torch.version.cuda})")
if not torch.cuda.is_available():
    sys.exit("[gpu_check] FAIL: torch sees no CUDA device")
print(f"[gpu_check] GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
for mod in ("triton", "pytest", "pybind11", "cmake", "ninja"):
    print(f"[gpu_check]   {mod:9s}: {'yes' if importlib.util.find_spec(mod) else 'MISSING'}")
PYEOF
command -v nvcc >/dev/null 2>&1 && echo "[gpu_check]   nvcc     : $(nvcc --version | tail -1)" || echo "[gpu_check]   nvcc     : MISSING (not on PATH)"

# 1. Build (CPU + CUDA kernels) in place.
echo "[gpu_check] building (AUTOSCULPT_CUDA=1, archs ${AUTOSCULPT_CUDA_ARCHS:-90}) -> $OUT/build.log"
( cd "$REPO" && AUTOSCULPT_CUDA=1 AUTOSCULPT_CUDA_ARCHS="${AUTOSCULPT_CUDA_ARCHS:-90}" \
  AUTOSCULPT_JOBS="$(nproc)" timeout 240 "$PY" setup.py build_ext --inplace ) >"$OUT/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  echo "[gpu_check] BUILD FAILED (rc=$rc): tail of build.log:"; tail -15 "$OUT/build.log"
  echo "[gpu_check] continuing: triton and dense are still measured"; status=1
fi
grep -h "decided" "$OUT/build.log" || true
echo "[gpu_check] build done at $(elapsed)s"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m autosculpt.info || status=1

# 2. GPU tests (and the interpreter tests, which are quick).
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  budget=$(( TOTAL - $(elapsed) - 200 )); [ $budget -gt 180 ] && budget=180; [ $budget -lt 30 ] && budget=30
  echo "[gpu_check] tests (timeout ${budget}s) -> $OUT/tests.log"
  ( cd "$REPO" && timeout "$budget" "$PY" -m pytest tests/ops/test_cuda_conv.py tests/ops/test_triton_conv.py -q -rs \
      -p no:cacheprovider ) >"$OUT/tests.log" 2>&1
  rc=$?
  tail -4 "$OUT/tests.log"
  [ $rc -ne 0 ] && { echo "[gpu_check] TESTS FAILED or timed out (rc=$rc): see tests.log"; status=1; }
else
  echo "[gpu_check] pytest MISSING: tests skipped"; status=1
fi
echo "[gpu_check] tests done at $(elapsed)s"

# 3. Benchmark within what is left (the script stops measuring at its budget and writes what it has).
left=$(( TOTAL - $(elapsed) ))
[ $left -lt 60 ] && left=60  # always leave the benchmark a minute, even if the steps above overran
# 150 s of what is left are kept for the attention cases and the whole-model run that follow.
bench_budget=$(( left - 70 - 150 )); [ $bench_budget -lt 30 ] && bench_budget=30
echo "[gpu_check] benchmark (measuring budget ${bench_budget}s, hard limit $(( left - 155 ))s) -> $OUT/bench.log"
( cd "$REPO" && timeout $(( left - 155 > 60 ? left - 155 : 60 )) "$PY" -m bench.gpu_check "$OUT" --budget-s "$bench_budget" --with-models ) 2>&1 | tee "$OUT/bench.log" | grep -v "^  " 
rc=${PIPESTATUS[0]}
[ $rc -ne 0 ] && { echo "[gpu_check] BENCHMARK FAILED or timed out (rc=$rc): see bench.log"; status=1; }

# 4. Block-sparse attention: Triton vs SDPA vs FlexAttention on the same masks (quick set).
left=$(( TOTAL - $(elapsed) )); [ $left -lt 40 ] && left=40
echo "[gpu_check] attention (hard limit $(( left - 5 ))s) -> $OUT/attention.log"
( cd "$REPO" && timeout $(( left - 5 )) "$PY" -m bench.gpu_attention --quick --out "$OUT/gpu-attention.md" ) >"$OUT/attention.log" 2>&1
rc=$?
tail -6 "$OUT/attention.log"
[ $rc -ne 0 ] && { echo "[gpu_check] ATTENTION CHECK FAILED, missed a target or timed out (rc=$rc): see attention.log"; status=1; }
echo "[gpu_check] finished in $(elapsed)s, status $status; reports: $(ls "$OUT"/gpu-*.md 2>/dev/null | tr '\n' ' ')"
exit $status
