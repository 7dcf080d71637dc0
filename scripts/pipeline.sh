#!/usr/bin/env bash
# All three stages and the evaluation for one dataset, depth and list of targets.
# Usage: [DATASET=cifar10] [DEPTH=38] [TARGETS="50 40 30 20"] [SAVE=save_checkpoints] \
#        [BASE_ARGS=...] [GATE_ARGS=...] [DFS_ARGS=...] [EVAL_ARGS=...] scripts/pipeline.sh
# *_ARGS are passed to the matching stage (e.g. BASE_ARGS="--iters 2000 --lr-steps 1000 1500").
# Run again over the same SAVE (after a crash or Ctrl-C, say), it continues each unfinished stage
# and skips each finished one: nothing is redone or rewritten.
set -euo pipefail
here="$(dirname "$0")"
: "${TARGETS:=50 40 30 20}"
export DATASET="${DATASET:-cifar10}" DEPTH="${DEPTH:-38}" SAVE="${SAVE:-save_checkpoints}" TARGETS
"$here/train_base.sh" ${BASE_ARGS:-}
"$here/train_gate_init.sh" ${GATE_ARGS:-}
for t in $TARGETS; do TARGET="$t" "$here/train_dfs.sh" ${DFS_ARGS:-}; done
"$here/eval.sh" ${EVAL_ARGS:-}
