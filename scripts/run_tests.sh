#!/usr/bin/env bash
# Installs AutoSculpt into .venv and runs the test suite (GPU tests skip cleanly without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest tests "$@"
