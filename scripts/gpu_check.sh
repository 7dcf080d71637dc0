#!/usr/bin/env bash
# The prepared GPU check (issue 18): every CUDA question in one run, about 5-8 minutes on one GPU.
# Usage: [CUDA_VISIBLE_DEVICES=0[,1]] bash scripts/gpu_check.sh [OUT]   (default OUT: gpu_check_out)
# Writes OUT/gpu_check.json and OUT/gpu_check.md. Without a GPU it says so and exits 0.
# On a machine with only torch (no internet): copy the repository, then PYTHON=python3 bash scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
pick_python
exec "$PYTHON" scripts/gpu_check.py --out "${1:-gpu_check_out}"
