#!/usr/bin/env bash
# The prepared GPU check (issue 18): every CUDA question in one run, about 5-8 minutes on one GPU.
# Usage: [CUDA_VISIBLE_DEVICES=0[,1]] bash scripts/gpu_check.sh [OUT] [FLAGS...]
#   Every flag goes to scripts/gpu_check.py (--help lists them): --out OUT (default gpu_check_out;
#   a bare first argument is taken as OUT too), --device, --quick, --only ITEM...
#   bash scripts/gpu_check.sh --device cpu --quick   is the dry run on CPU.
# Writes OUT/gpu_check.json and OUT/gpu_check.md (a relative OUT is under the repository root) and ends
# with one line: how many items passed, and the report's full path. Without a GPU it says so and exits 2.
# On a machine with only torch (no internet): copy the repository, then PYTHON=python3 bash scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
pick_python
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # the older form: OUT first
    set -- --out "$@"
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
