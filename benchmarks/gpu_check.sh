#!/usr/bin/env bash
# One call that checks trainkit's promises on a CUDA GPU; `--device cpu` is its dry run.
# No dataset and no install needed: runs trainkit from src/ (see benchmarks/gpu_check.py).
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec env PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/gpu_check.py "$@"
