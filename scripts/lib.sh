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
