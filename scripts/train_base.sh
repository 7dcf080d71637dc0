#!/usr/bin/env bash
# Stage 1: train the plain ResNet backbone (64k iterations, lr 0.1, steps at 32k/48k).
# Usage: [DATASET=cifar10] [DEPTH=38] [SAVE=save_checkpoints] [CUDA_VISIBLE_DEVICES=0[,1...]] [NPROC=N] scripts/train_base.sh [extra args]
# Writes $SAVE/backbone/resnet$DEPTH/{checkpoint_latest,model_best}.pth.tar; run again, it continues
# that run (or, finished, does nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
: "${DATASET:=cifar10}" "${DEPTH:=38}" "${SAVE:=save_checkpoints}"
pick_python
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
source scripts/launch.sh  # one process, or torchrun with one per GPU (NPROC=N)
resume_from "$SAVE/backbone/resnet$DEPTH/checkpoint_latest.pth.tar" "" "$@"
launch train_base.py train "resnet$DEPTH" --dataset "$DATASET" \
    --save-folder "$SAVE/backbone" "${RESUME[@]}" "$@"
