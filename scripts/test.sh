#!/usr/bin/env bash
# Set up .venv and run the test suite (CPU): two pytest workers, one file per worker at a time
# (module fixtures such as the DDP launches run once), one thread each. Extra args go to pytest;
# `bash scripts/test.sh -n 0` runs it in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
