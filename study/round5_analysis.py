"""The analysis fixed in results/fashion-mnist-round5/PLAN.md, from results.json and the records of
rounds 3-4 (tier A pairs the shared-BN oracle with their static networks). The runner (round5.py)
imports its definitions from here; this module imports no runner.

    python study/round5.py --analyse-only      # writes OUT/results.md
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from study import significance  # noqa: E402
from study.round2_analysis import fmt_p, paired  # noqa: E402
from study.round3_analysis import fmt_iv, fmt_num, holm, t_test_p  # noqa: E402

R3, R4 = "results/fashion-mnist-round3", "results/fashion-mnist-round4"
SEEDS, LENGTHS = (0, 1, 2), (300, 3000)
ORACLE = {"marked": "skip", "unmarked": "skip,skip,8,8,8,8,8,8"}  # round 4's: 0 and 4.6875 %, 2.344 % overall
TARGET = "2.34375"
ESTIMATORS = ("argmax", "gumbel", "reinforce")  # tier B's arms B1-B3
GAP, BITS, MIN_BLOCKS = 3.0, 0.5, 4  # round 4's criteria 1-2: points, bits, blocks
STEP = 100 / 128  # a static policy's cost is a multiple of this: 8 blocks, 8 bits costing 1/16 (0.78125 %)
EQUAL = 0.1  # an arm and its static counterpart are of equal cost when their test costs are this close (points)


def grid_cost(cp):
    """The static cost nearest to a computation percentage (feature 6: the counterpart's search target)."""
    return round(cp / STEP) * STEP


def comparison_label(arm_cp, static_cp):
    """'equal-cost' when the two test costs are within EQUAL points, else 'descriptive' (PLAN.md)."""
    return "equal-cost" if abs(arm_cp - static_cp) <= EQUAL + 1e-9 else "descriptive"


def records(study):
    with open(os.path.join(ROOT, study, "results.json")) as f:
        return json.load(f)["runs"]


def static_of(length, seed, r3, r4):
    """Tier A's static counterpart, round 4's: round 3's at 300 iterations, round 4's at 3,000."""
    return r3.get(f"static_of_dfs_marked_cp3.0_s{seed}") if length == 300 else r4.get(f"static_3000_s{seed}")


def halves(test):
    """{half: (top-1, computation %)} of a test record."""
    return {k: (v["acc"], v["computation_percentage"]) for k, v in test["routing"]["halves"].items()}


def pays_or_loses(diffs_by_length):
    """The plan's tier-A rule per length, Holm over the lengths with three seeds: 'pays' if Holm p < 0.05
    and every seed is positive, 'loses' if Holm p < 0.05 and every seed is negative, else 'neither shown'.
    -> {length: (interval, p, Holm p, verdict)}."""
    full = {k: d for k, d in diffs_by_length.items() if len(d) == len(SEEDS)}
    adjusted = dict(zip(full, holm([t_test_p(d) for d in full.values()])))
    out = {}
    for length, diffs in diffs_by_length.items():
        if length not in full:
            out[length] = (None, None, None, f"{len(diffs)} of {len(SEEDS)} seeds: not complete")
            continue
        hp = adjusted[length]
        verdict = "neither shown"
        if hp < 0.05 and all(d > 0 for d in diffs):
            verdict = "pays"
        elif hp < 0.05 and all(d < 0 for d in diffs):
            verdict = "loses"
        out[length] = (significance.t_interval(diffs), t_test_p(diffs), hp, verdict)
    return out


def tier_a(runs, r3, r4):
    rows = ["## Tier A: the oracle with the paper's shared BN against the static network (both 2.344 %)", "",
            "| length | seed | oracle (shared BN) top-1 | static top-1 | oracle - static | McNemar p | "
            "oracle marked / unmarked top-1 | oracle marked / unmarked cp % | per-option-BN oracle (round 4) | "
            "shared - per-option |",
            "|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    diffs = {length: [] for length in LENGTHS}
    for length in LENGTHS:
        for seed in SEEDS:
            oracle, static = runs.get(f"a_oracle_shared_{length}_s{seed}"), static_of(length, seed, r3, r4)
            if not oracle:
                rows.append(f"| {length} | {seed} | not run | | | | | | | |")
                continue
            diff, p = paired(oracle["test"], static["test"])
            diffs[length].append(diff)
            po = r4[f"oracle_{length}_s{seed}"]["test"]
            h = halves(oracle["test"])
            rows.append(f"| {length} | {seed} | {oracle['test']['accuracy']:.2f} | {static['test']['accuracy']:.2f} | "
                        f"{diff:+.2f} | {fmt_p(p)} | {h['marked'][0]:.2f} / {h['unmarked'][0]:.2f} | "
                        f"{h['marked'][1]:.3f} / {h['unmarked'][1]:.3f} | {po['accuracy']:.2f} | "
                        f"{oracle['test']['accuracy'] - po['accuracy']:+.2f} |")
    rows += ["", "Per length (Holm over the two lengths; routing pays if Holm p < 0.05 and all three seeds are "
             "positive, loses if Holm p < 0.05 and all three are negative):", "",
             "| length | seeds' oracle - static | mean [95 % t-interval] | t-test p | Holm p | shared-BN routing |",
             "|---:|---|---|---:|---:|---|"]
    verdicts = pays_or_loses(diffs)
    for length, (iv, p, hp, text) in verdicts.items():
        rows.append(f"| {length} | {', '.join(f'{d:+.2f}' for d in diffs[length]) or '-'} | {fmt_iv(iv)} | "
                    f"{fmt_num(p)} | {fmt_num(hp)} | {text} |")
    return rows, verdicts


def routes_by_frame(test):
    """(marked cp, unmarked cp, gap, blocks with >= 0.5 bit, passes criteria 1-2) of a test record."""
    h = test["routing"]["halves"]
    marked, unmarked = h["marked"]["computation_percentage"], h["unmarked"]["computation_percentage"]
    blocks = sum(b >= BITS for b in test["routing"]["mark_information_bits"])
    return marked, unmarked, unmarked - marked, blocks, unmarked - marked >= GAP and blocks >= MIN_BLOCKS


def tier_b(runs):
    rows = ["## Tier B: the gate alone on the oracle's weights (seed 0, final state, test set)", "",
            f"Start: round 4's `oracle_3000_s0` (backbone, per-option BNs, ranges; its routing dropped) with round 3's "
            f"`gate_po_marked_s0` gate. Pass = criteria 1-2: unframed minus framed computation at least {GAP:g} points "
            f"and at least {BITS} bit of decision-frame information on at least {MIN_BLOCKS} of 8 blocks. Top-1 is "
            "descriptive (the backbone had 3,000 oracle iterations first).", "",
            "| run | estimator | top-1 | cp % | framed / unframed cp % | gap (pt) | blocks >= 0.5 bit | MI per block (bits) | "
            "framed / unframed top-1 | passes 1-2 |",
            "|---|---|---:|---:|---|---:|---:|---|---|---|"]
    names = [("b0_distill_s0", "distilled to the oracle (control B0)")] + \
        [(f"b{i}_{e}_s0", e) for i, e in enumerate(ESTIMATORS, 1)]
    for name, what in names:
        r = runs.get(name)
        if not r:
            rows.append(f"| {name} | {what} | not run | | | | | | | |")
            continue
        t = r["test"]
        marked, unmarked, gap, blocks, passes = routes_by_frame(t)
        h = halves(t)
        bits = ", ".join(f"{b:.2f}" for b in t["routing"]["mark_information_bits"])
        rows.append(f"| {name} | {what} | {t['accuracy']:.2f} | {t['computation_percentage']:.3f} | "
                    f"{marked:.3f} / {unmarked:.3f} | {gap:+.2f} | {blocks} | {bits} | "
                    f"{h['marked'][0]:.2f} / {h['unmarked'][0]:.2f} | {'yes' if passes else 'no'} |")
    return rows


def stability(test):
    """Tier C's verdict on a final test record: 'persists' if it passes criteria 1-2, 'collapses' if the
    per-half gap is below 1 point, else 'decays' (PLAN.md)."""
    _, _, gap, _, passes = routes_by_frame(test)
    return "persists" if passes else "collapses" if gap < 1 else "decays"


def tier_c(runs):
    rows = ["## Tier C: joint training from the distilled routing (B0's final state; seed 0, final state, test set)", "",
            "The whole network trains (squared term, lambda 1000, 3,000 iterations) from the gate distilled to the oracle's "
            "routing on the oracle's weights. The routing persists if the final state passes criteria 1-2, collapses if "
            "the per-half gap falls below 1 point, else decays. Criterion 3 (top-1 at least the equal-cost static "
            "network's) is reported with its label.", "",
            "| run | estimator | top-1 | cp % | framed / unframed cp % | gap (pt) | blocks >= 0.5 bit | validation gap "
            "every 250 iterations | routing |",
            "|---|---|---:|---:|---|---:|---:|---|---|"]
    names = sorted(n for n in runs if n.startswith("c_")) or ["c_argmax_s0"]
    for name in names:
        r = runs.get(name)
        if not r:
            rows.append(f"| {name} | | not run | | | | | | |")
            continue
        t = r["test"]
        marked, unmarked, gap, blocks, _ = routes_by_frame(t)
        history = ", ".join(f"{v['halves']['unmarked']['computation_percentage'] - v['halves']['marked']['computation_percentage']:+.1f}"
                            for v in r.get("val_history", []))
        rows.append(f"| {name} | {r['estimator']} | {t['accuracy']:.2f} | {t['computation_percentage']:.3f} | "
                    f"{marked:.3f} / {unmarked:.3f} | {gap:+.2f} | {blocks} | {history or '-'} | {stability(t)} |")
    return rows


def write(runs, out):
    """OUT/results.md: every table of round 5 so far, from the records."""
    rows, _ = tier_a(runs, records(R3), records(R4))
    parts = ["# Round 5 results (generated by study/round5_analysis.py from results.json)", "",
             "The plan is PLAN.md. Differences are in points of test top-1 on the same 10,000 images "
             "(5,000 framed, 5,000 unframed). Static networks: round 3's `static_of_dfs_marked_cp3.0_s{seed}` "
             "(300 iterations) and round 4's `static_3000_s{seed}`.", ""]
    parts += rows + [""] + tier_b(runs) + [""]
    if any(n.startswith("c_") for n in runs):
        parts += tier_c(runs) + ["", "## Tiers D-E", "", "Not run yet (PLAN.md's order)."]
    else:
        parts += ["## Tiers C-E", "", "Not run yet (PLAN.md's order)."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(parts) + "\n")
    print(f"{os.path.join(out, 'results.md')}: {len(runs)} runs")
