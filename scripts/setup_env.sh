#!/usr/bin/env bash
# Creates .venv (if missing) and installs AutoSculpt into it, editable, with its test, triton and all extras.
# torch is pinned to the CPU wheel first so no multi-GB CUDA build is pulled; the C++ extension
# itself builds without torch (CUDA kernels too when nvcc is found; AUTOSCULPT_CUDA=0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${AUTOSCULPT_TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
# test + all extras (search, report, export, bench: torch-pruning, openvino, onnxruntime) and triton;
# the torch spec goes along so no extra can swap the pinned torch for another build.
.venv/bin/python -m pip install -q -e ".[test,triton,all]" "$TORCH_SPEC"
# torchvision's model definitions, for the benchmarks and the tests that run torchvision models through
# bench/tv.py (which stubs its compiled ops); --no-deps, or its wheel would pull a CUDA torch. The
# package never needs it: without it those tests skip.
.venv/bin/python -m pip install -q --no-deps "${AUTOSCULPT_TORCHVISION_SPEC:-torchvision==0.28.0}" \
  || echo "setup: torchvision not installed (its benchmarks and tests are skipped)"
.venv/bin/python -m autosculpt.info
