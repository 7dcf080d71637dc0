# Helpers shared by the stage scripts (sourced, not run).

# resume_from OWN PARENT ARGS...: sets RESUME, the --resume a stage script passes. OWN is the stage's
# own checkpoint_latest: when it exists the run continues (or, finished, does nothing), so running a
# script again redoes nothing; unless ARGS hold --overwrite (start over). Otherwise PARENT, the
# previous stage's checkpoint (none for stage 1).
resume_from() {
    local own="$1" parent="$2" arg
    shift 2
    RESUME=()
    if [ -f "$own" ]; then
        RESUME=(--resume "$own")
        for arg in "$@"; do [ "$arg" = --overwrite ] && RESUME=(); done
    fi
    if [ ${#RESUME[@]} -eq 0 ] && [ -n "$parent" ]; then RESUME=(--resume "$parent"); fi
}

# pick_python: PYTHON if set, else the project's .venv when it exists, else python3; a Python without
# torch gets one line saying how to create the environment (exit 2).
pick_python() {
    if [ -z "${PYTHON:-}" ]; then
        if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
    fi
    if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" >/dev/null 2>&1; then
        echo "error: $PYTHON has no torch; create the environment with: bash scripts/setup.sh" >&2
        exit 2
    fi
}

# run_folder SAVE/STAGE KIND: the run folder of a stage, under either spelling of the architecture:
# the canonical one the scripts use (resnet38, dfs_resnet38) or the authors' (cifar10_resnet_38,
# cifar10_rnn_gate_38) that a hand-typed command uses; the canonical one when neither exists.
run_folder() {
    local base="$1" kind="$2" canonical alias
    if [ "$kind" = plain ]; then canonical="resnet$DEPTH"; alias="${DATASET}_resnet_$DEPTH"
    else canonical="dfs_resnet$DEPTH"; alias="${DATASET}_rnn_gate_$DEPTH"; fi
    if [ ! -d "$base/$canonical" ] && [ -d "$base/$alias" ]; then echo "$base/$alias"; else echo "$base/$canonical"; fi
}

# need_parent: when RESUME is the previous stage's checkpoint and that file is missing, say which
# script makes it (exit 2).
need_parent() {
    local file="$1" maker="$2" arg
    shift 2
    for arg in "$@"; do case "$arg" in --resume|--resume=*) return 0 ;; esac; done  # the user's own --resume
    if [ "${RESUME[1]:-}" = "$file" ] && [ ! -f "$file" ]; then
        echo "error: $file is missing; it is made by $maker" >&2
        exit 2
    fi
}
