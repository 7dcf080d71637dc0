# Sourced by the stage scripts and eval.sh: `launch SCRIPT.py ARGS...` runs it in one process, or
# under torchrun (python -m torch.distributed.run) with one process per GPU when
# CUDA_VISIBLE_DEVICES lists several. NPROC=N sets the number of processes per machine instead
# (NPROC=2 with --device cpu: two CPU processes over gloo). TORCHRUN_ARGS replaces the one-machine
# default "--standalone", e.g. on each machine of a cluster:
#   TORCHRUN_ARGS="--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB"
launch() {
    local gpus n
    IFS=, read -ra gpus <<< "${CUDA_VISIBLE_DEVICES:-}"
    n="${NPROC:-${#gpus[@]}}"
    [ "$n" != 0 ] || n=1  # CUDA_VISIBLE_DEVICES="" (no GPU): one process
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: NPROC must be a positive integer, got '$n'" >&2
        exit 2
    fi
    if [ "$n" -gt 1 ] || [ -n "${TORCHRUN_ARGS:-}" ]; then
        # shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
        exec "$PYTHON" -m torch.distributed.run ${TORCHRUN_ARGS:---standalone} --nproc-per-node "$n" "$@"
    fi
    exec "$PYTHON" "$@"
}
