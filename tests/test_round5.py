"""Round 5's runner and analysis (study/round5.py, study/round5_analysis.py): the plan's runs and
flags, and tier A's rule on hand-made differences."""
import pytest

from study import round5, round5_analysis
from study.round4 import ORACLE as ROUND4_ORACLE


def test_tier_a_is_the_round_4_oracle_with_the_parents_shared_bn():
    runs = round5.plan()
    assert [name for _, name, *_ in runs] == [f"a_oracle_shared_{n}_s{s}" for n in (300, 3000) for s in (0, 1, 2)]
    assert round5_analysis.ORACLE == ROUND4_ORACLE
    flags = round5.oracle_shared_flags(1, 3000)
    assert "--bn" not in flags  # the parent gate_marked_s1 has the shared BN
    assert flags[flags.index("--route-unmarked") + 1] == "skip,skip,8,8,8,8,8,8"
    assert flags[flags.index("--iters") + 1] == "3000" and flags[flags.index("--lr-steps") + 1] == "2250"
    assert flags[flags.index("--seed") + 1] == "1" and flags[flags.index("--beta") + 1] == "0"


def test_tier_a_rule_pays_loses_or_neither():
    verdicts = round5_analysis.pays_or_loses({300: [-12.0, -11.5, -12.4], 3000: [0.5, -0.2, 0.4]})
    assert verdicts[300][3] == "loses" and verdicts[3000][3] == "neither shown"
    assert round5_analysis.pays_or_loses({300: [1.3, 1.6, 1.4], 3000: [0.6, 0.7, 1.0]})[300][3] == "pays"
    # Holm: the larger p of two is compared unadjusted, the smaller doubled
    v = round5_analysis.pays_or_loses({300: [1.3, 1.6, 1.4], 3000: [0.6, 0.7, 1.0]})
    assert v[300][2] == pytest.approx(2 * v[300][1]) and v[3000][2] == pytest.approx(v[3000][1])
    assert round5_analysis.pays_or_loses({300: [1.0, 2.0]})[300][3] == "2 of 3 seeds: not complete"


def test_results_md_is_written_before_any_run(tmp_path):
    round5_analysis.write({}, str(tmp_path))
    text = (tmp_path / "results.md").read_text()
    assert "| 300 | 0 | not run |" in text and "Not run yet" in text

