#!/usr/bin/env bash
# Mutation testing of the spec's code (optional, for developers; not in CI: far too slow for 2 cores).
# mutmut (setup.cfg [mutmut]) injects small bugs one at a time into quantize.py, models/ and the
# losses and schedule (core/losses.py, core/engine.py), runs the fast in-process tests on each, and reports the survivors.
#
#   .venv/bin/pip install -r requirements-dev.txt     # once
#   bash scripts/mutation.sh            # the core scope (636 mutants; tests/README.md has the last score)
#   bash scripts/mutation.sh full       # quantize.py, every function of models/, the engine's loss and schedule
#   bash scripts/mutation.sh 'models.gate.*'   # any mutmut name globs
#   bash scripts/mutation.sh score [SCOPE]     # only print the score of what has been run
#
# Results are cached in mutants/ (git-ignored): a run that is stopped continues where it left off.
# Runs nice'd on one worker (JOBS=2 for two: faster, but it reported a few spurious kills, see tests/README.md); `.venv/bin/mutmut show NAME` shows a survivor's diff.
set -euo pipefail
cd "$(dirname "$0")/.."
MUTMUT=.venv/bin/mutmut
[ -x "$MUTMUT" ] || { echo "mutmut is not installed: .venv/bin/pip install -r requirements-dev.txt" >&2; exit 2; }

ENGINE=('core.losses.x_budget_loss__*' 'core.losses.x_cross_entropy_loss__*' 'core.engine.x_learning_rate__*'
        'core.engine.x_train_step__*')
# The spec's rules: quantizer, cost model, gate, blocks and init, the gated forward, loss and schedule.
# Left out of the core: constructors, the option-list parser, the registry, load_backbone and the
# MACs/BitOPs report (mostly error messages and bookkeeping; `full` includes them).
CORE=('quantize.*' 'models.cost.x_option_costs__*' 'models.cost.x_option_bits__*'
      'models.cost.x_computation_percentage__*' 'models.cost.x_cost_penalty__*'
      'models.gate.xǁGateEmbeddingǁforward__*' 'models.gate.xǁLSTMGateǁforward__*'
      'models.gate.xǁLSTMGateǁinit_state__*' 'models.resnet.x_init_weights__*'
      'models.resnet.xǁBasicBlockǁforward__*' 'models.resnet.xǁBasicBlockǁshortcut__*'
      'models.resnet.xǁCifarResNetǁ[sfh]*' 'models.dfs_resnet.x_mix__*'
      'models.dfs_resnet.xǁDFSResNetǁforward__*' 'models.dfs_resnet.xǁDFSResNetǁrun_*'
      'models.dfs_resnet.xǁDFSResNetǁcomputation_percentage__*' "${ENGINE[@]}")
FULL=('quantize.*' 'models.*' "${ENGINE[@]}")

score_only=0
if [ "${1:-}" = score ]; then score_only=1; shift; fi
case "${1:-core}" in
  core) set -- "${CORE[@]}" ;;
  full) set -- "${FULL[@]}" ;;
esac

if [ "$score_only" = 0 ]; then
  nice -n "${NICE:-15}" env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    "$MUTMUT" run --max-children "${JOBS:-1}" "$@" || true  # a stopped run keeps its results
fi

# The score over the chosen scope: killed (and timed out) / mutants checked.
.venv/bin/python - "$@" <<'PY'
import collections, fnmatch, glob, json, sys
from mutmut.stats import status_by_exit_code
patterns, counts, survivors = sys.argv[1:], collections.Counter(), []
for meta in glob.glob("mutants/**/*.meta", recursive=True):
    for name, code in json.load(open(meta))["exit_code_by_key"].items():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            status = status_by_exit_code[code]
            counts[status] += 1
            if status in ("survived", "no tests", "suspicious"):
                survivors.append(f"{status:9} {name}")
checked = sum(n for s, n in counts.items() if s not in ("not checked", "skipped"))
killed = counts["killed"] + counts["timeout"]
print("\n".join(sorted(survivors)))
print(dict(counts))
print(f"mutation score: {killed}/{checked} = {100 * killed / max(checked, 1):.1f} % of the mutants checked "
      f"({sum(counts.values())} in scope)")
PY
