#!/usr/bin/env bash
# The main job, end to end at a small scale: set up .venv, get Fashion-MNIST, train the three
# stages (DFS-ResNet-20, options skip/8/16/full) for two targets, and evaluate them.
# About 15 minutes on 2 CPU cores. Results: demo/eval/{results.json,*.png}; the table is printed.
# Settings can be overridden: DEPTH, TARGETS, SAVE, DATA_DIR, DEVICE, and the *_ITERS below.
# Run again (after a crash or Ctrl-C, say), it continues each unfinished stage and skips the finished.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
: "${DEPTH:=20}" "${TARGETS:=60 30}" "${SAVE:=demo}" "${DATA_DIR:=data}" "${DEVICE:=cpu}"
: "${BASE_ITERS:=600}" "${GATE_ITERS:=60}" "${DFS_ITERS:=200}"

# Fashion-MNIST: files already present, else Debian's package, else torchvision's download.
have_fashion() {  # data.py's own search (data dir, its fashion-mnist/, Debian's folder)
    .venv/bin/python -c "import data, sys; data.load_arrays('fashion-mnist', sys.argv[1])" "$DATA_DIR" 2>/dev/null
}
download=()
if ! have_fashion; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Debian's dataset-fashion-mnist ..."
        { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 || true
    fi
    have_fashion || download=(--download)  # data.py says where to put the files if this fails too
fi

export PYTHON=.venv/bin/python DATASET=fashion-mnist DEPTH SAVE TARGETS
common=(--data-dir "$DATA_DIR" "${download[@]}" --device "$DEVICE" --val-size 5000 --print-freq 50)
export BASE_ARGS="${common[*]} --iters $BASE_ITERS --lr-steps $((BASE_ITERS * 2 / 3)) $((BASE_ITERS * 5 / 6)) --eval-every $((BASE_ITERS / 2))"
export GATE_ARGS="${common[*]} --iters $GATE_ITERS --eval-every $GATE_ITERS --batch-size 64 --options paper --beta 1e-3"
export DFS_ARGS="${common[*]} --iters $DFS_ITERS --lr-steps $((DFS_ITERS * 3 / 4)) --eval-every $((DFS_ITERS / 2)) --batch-size 64 --beta 1e-3"
export EVAL_ARGS="--data-dir $DATA_DIR ${download[*]} --device $DEVICE"
start=$(date +%s)
bash scripts/pipeline.sh
echo "demo finished in $(( $(date +%s) - start )) s (training and evaluation; results in $SAVE/eval)"
