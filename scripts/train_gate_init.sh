#!/usr/bin/env bash
# Stage 2: train the gate toward full execution (backbone frozen; 2k iterations, lr 0.01, target 100 %).
# Usage: [DATASET=cifar10] [DEPTH=38] [SAVE=save_checkpoints] [CUDA_VISIBLE_DEVICES=0[,1...]] [NPROC=N] scripts/train_gate_init.sh [extra args]
# Reads $SAVE/backbone/resnet$DEPTH/model_best.pth.tar; writes $SAVE/full_execution/dfs_resnet$DEPTH/;
# run again, it continues its own run there (or, finished, does nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
: "${DATASET:=cifar10}" "${DEPTH:=38}" "${SAVE:=save_checkpoints}"
pick_python
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
source scripts/launch.sh  # one process, or torchrun with one per GPU (NPROC=N)
parent="$(run_folder "$SAVE/backbone" plain)/model_best.pth.tar"
resume_from "$SAVE/full_execution/dfs_resnet$DEPTH/checkpoint_latest.pth.tar" "$parent" "$@"
need_parent "$parent" "scripts/train_base.sh (stage 1)" "$@"
launch train_gate_init.py train "dfs_resnet$DEPTH" --dataset "$DATASET" --minimum 100 --lr 0.01 \
    "${RESUME[@]}" --save-folder "$SAVE/full_execution" "$@"
