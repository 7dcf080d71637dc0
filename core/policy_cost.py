"""The cost of a static policy (one option per gated block) in whole units, and the exact knapsack over
such policies: eval.py's matched_majority control and study/search_policy.py's search share them.

A block's cost is counted in 1/1024 of a full-precision block: skip 0, b bits b^2, full 1024 = 32^2
(the paper's (b/32)^2 costs, models/cost.py, in integers so that equal costs compare equal).
"""

UNITS = 1024  # a block's cost in units: skip 0, b bits b^2, full 1024 = 32^2


def option_units(options):
    """Integer cost of each option, in 1/1024 of a full-precision block."""
    return [0 if o == "skip" else UNITS if o == "full" else o * o for o in options]


def policy_units(policy, units):
    return sum(units[k] for k in policy)


def percentage(policy, units):
    """The computation percentage of a static policy."""
    return 100.0 * policy_units(policy, units) / (UNITS * len(policy))


def knapsack(drops, units, lo, hi, keep=1):
    """The `keep` policies of least summed drop for each total cost in [lo, hi]: {total: [(drop, policy)]}.

    drops[g][k]: predicted accuracy drop of option k at block g. Exact: DP over blocks and totals.
    """
    best = {0: [(0.0, ())]}
    for row in drops:
        nxt = {}
        for total, entries in best.items():
            for k, d in enumerate(row):
                if total + units[k] <= hi:
                    nxt.setdefault(total + units[k], []).extend((drop + d, policy + (k,)) for drop, policy in entries)
        best = {t: sorted(entries)[:keep] for t, entries in nxt.items()}
    return {t: v for t, v in best.items() if lo <= t}
