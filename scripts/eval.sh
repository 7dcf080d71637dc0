#!/usr/bin/env bash
# Evaluate the stage-2 run and the stage-3 run of every target: accuracy-vs-computation table, JSON and plots.
# Usage: [TARGETS="50 40 30 20"] [DATASET=cifar10] [DEPTH=38] [SAVE=save_checkpoints] [CUDA_VISIBLE_DEVICES=0[,1...]] [NPROC=N] scripts/eval.sh [extra args]
# Writes $SAVE/eval/{results.json,accuracy_vs_computation.png,decision_distribution.png}
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TARGETS:=50 40 30 20}" "${DATASET:=cifar10}" "${DEPTH:=38}" "${SAVE:=save_checkpoints}"
. scripts/lib.sh
pick_python
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
source scripts/launch.sh  # one process, or torchrun with one per GPU (NPROC=N)
ckpts=()
# the stage-2 network (gate trained to full execution) as the 100 % reference, when present
ref="$SAVE/full_execution/dfs_resnet$DEPTH/model_best.pth.tar"
[ -f "$ref" ] && ckpts+=("$ref")
for t in $TARGETS; do ckpts+=("$SAVE/DFS_cp$t/dfs_resnet$DEPTH/model_best.pth.tar"); done
mkdir -p "$SAVE/eval"
launch eval.py "${ckpts[@]}" --dataset "$DATASET" --json "$SAVE/eval/results.json" \
    --plot-dir "$SAVE/eval" "$@"
