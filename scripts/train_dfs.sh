#!/usr/bin/env bash
# Stage 3: joint training toward a computation percentage (64k iterations, lr 0.01, beta 1e-5).
# Usage: [TARGET=50] [DATASET=cifar10] [DEPTH=38] [SAVE=save_checkpoints] [CUDA_VISIBLE_DEVICES=0[,1...]] [NPROC=N] scripts/train_dfs.sh [extra args]
# Reads $SAVE/full_execution/dfs_resnet$DEPTH/checkpoint_latest.pth.tar; writes $SAVE/DFS_cp$TARGET/dfs_resnet$DEPTH/;
# run again, it continues its own run there (or, finished, does nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
: "${TARGET:=50}" "${DATASET:=cifar10}" "${DEPTH:=38}" "${SAVE:=save_checkpoints}"
pick_python
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
source scripts/launch.sh  # one process, or torchrun with one per GPU (NPROC=N)
parent="$(run_folder "$SAVE/full_execution" gated)/checkpoint_latest.pth.tar"
resume_from "$SAVE/DFS_cp$TARGET/dfs_resnet$DEPTH/checkpoint_latest.pth.tar" "$parent" "$@"
need_parent "$parent" "scripts/train_gate_init.sh (stage 2)" "$@"
launch train_dfs.py train "dfs_resnet$DEPTH" --dataset "$DATASET" --minimum "$TARGET" --lr 0.01 \
    "${RESUME[@]}" --save-folder "$SAVE/DFS_cp$TARGET" "$@"
