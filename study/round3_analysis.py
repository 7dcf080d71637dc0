"""The analysis fixed in results/fashion-mnist-round3/PLAN.md, from results.json alone (and round 2's
records, which tier 0 and the separation of causes pair against).

    python study/round3.py --analyse-only      # writes OUT/results.md
"""
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from study import significance  # noqa: E402
from study.round2_analysis import fmt_p, fmt_policy, paired  # noqa: E402

R2 = os.path.join(ROOT, "results", "fashion-mnist-dynamic")
SEEDS, BUDGETS, PAPER_BUDGET = (0, 1, 2), (0.5, 0.8, 1.2), 3.0


def t_test_p(diffs):
    """Two-sided one-sample t-test p of mean 0 (len(diffs) - 1 degrees of freedom)."""
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:
        return 0.0 if mean else 1.0
    return 2 * (1 - significance.student_t_cdf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm(ps):
    """Holm-adjusted p-values, in the order given."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def family(groups):
    """groups: {label: [per-seed differences]} -> {label: (interval, p, Holm p, verdict)} (the plan's rule)."""
    full = {k: d for k, d in groups.items() if len(d) == len(SEEDS)}
    adjusted = dict(zip(full, holm([t_test_p(d) for d in full.values()]))) if full else {}
    out = {}
    for label, diffs in groups.items():
        if label not in full:
            out[label] = (None, None, None, f"{len(diffs)} of {len(SEEDS)} seeds: not complete")
            continue
        iv, p, hp = significance.t_interval(diffs), t_test_p(diffs), adjusted[label]
        same = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
        text = ("DFS better" if iv[0] > 0 else "static better") if hp < 0.05 and same else "no difference shown"
        out[label] = (iv, p, hp, text)
    return out


def fmt_iv(iv):
    return "-" if iv is None else f"{iv[0]:+.2f} [{iv[1]:+.2f}, {iv[2]:+.2f}]"


def fmt_num(p):
    return "-" if p is None else fmt_p(p)


def comparison(runs, pairs, title, family_title):
    """Per-seed rows and the per-group verdicts of DFS - static. pairs: [(group, seed, dfs name)]."""
    rows = [f"### {title}", "",
            "| group | seed | DFS cp % (val / test) | static cp % (test) | DFS top-1 | static top-1 | DFS - static | "
            "McNemar p | static policy |", "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    groups = {}
    for group, seed, name in pairs:
        dfs, static = runs.get(name), runs.get(f"static_of_{name}")
        if not dfs:
            rows.append(f"| {group} | {seed} | not run | | | | | | |")
            continue
        cps = f"{dfs['val']['computation_percentage']:.3f} / {dfs['test']['computation_percentage']:.3f}"
        if not static or "failed" in static:
            why = static["failed"].splitlines()[-1] if static else "not run"
            rows.append(f"| {group} | {seed} | {cps} | - | {dfs['test']['accuracy']:.2f} | - | - | - | {why} |")
            continue
        diff, p = paired(dfs["test"], static["test"])
        groups.setdefault(group, []).append(diff)
        rows.append(f"| {group} | {seed} | {cps} | {static['test']['computation_percentage']:.3f} | "
                    f"{dfs['test']['accuracy']:.2f} | {static['test']['accuracy']:.2f} | {diff:+.2f} | {fmt_p(p)} | "
                    f"{fmt_policy(static['test']['policy'])}{' (= ' + static['same_as'] + ')' if 'same_as' in static else ''} |")
    rows += ["", f"{family_title}", "", "| group | seeds' DFS - static | mean [95 % t-interval] | t-test p | Holm p | verdict |",
             "|---|---|---|---:|---:|---|"]
    for group, (iv, p, hp, text) in family(groups).items():
        rows.append(f"| {group} | {', '.join(f'{d:+.2f}' for d in groups[group])} | {fmt_iv(iv)} | {fmt_num(p)} | "
                    f"{fmt_num(hp)} | {text} |")
    return rows


def controls(runs, names, title):
    rows = [f"### {title}", "", "| run | DFS top-1 | control | top-1 | DFS - control | McNemar p | cost difference (pt) |",
            "|---|---:|---|---:|---:|---:|---:|"]
    by_group = {}
    for name in names:
        r = runs.get(name)
        if not r or "test" not in r:
            continue
        for c in ("row_shuffled", "shuffled", "matched_majority", "majority"):
            if c not in r["test"].get("controls", {}):
                continue
            ctl = r["test"]["controls"][c]
            diff, p = paired(r["test"], ctl)
            rows.append(f"| {name} | {r['test']['accuracy']:.2f} | {c} | {ctl['accuracy']:.2f} | {diff:+.2f} | {fmt_p(p)} | "
                        f"{ctl['cost_difference']:+.3f} |")
            group = name.rsplit("_s", 1)[0]  # the run without its seed
            by_group.setdefault((group, c), []).append((diff, ctl["cost_difference"]))
    rows += ["", "Over the seeds (descriptive):", "",
             "| runs | control | seeds' DFS - control | mean [95 % t-interval] | cost differences (pt) |",
             "|---|---|---|---|---|"]
    for (group, c), values in by_group.items():
        diffs = [d for d, _ in values]
        rows.append(f"| {group} | {c} | {', '.join(f'{d:+.2f}' for d in diffs)} | "
                    f"{fmt_iv(significance.t_interval(diffs)) if len(diffs) > 1 else '-'} | "
                    f"{', '.join(f'{x:+.3f}' for _, x in values)} |")
    return rows


def tier0(runs):
    with open(os.path.join(R2, "results.json")) as f:
        r2 = json.load(f)["runs"]
    with open(os.path.join(R2, "posthoc.json")) as f:
        posthoc = json.load(f)
    rows = ["### Tier 0: round 2's DFS networks, BN re-estimated with the pooled estimator", "",
            "| round-2 run | DFS top-1 | call-weighted recal. (round 2) | pooled recal. | pooled recal. cp % | "
            "static top-1 | pooled - static | McNemar p |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups = {}
    for name, r in sorted(runs.items()):
        if r.get("kind") != "reeval":
            continue
        src, rec = r["round2"], r["test"]["recalibrated"]
        static = r2.get(f"static_of_{src}")
        line = (f"| {src} | {r['test']['accuracy']:.2f} | {posthoc[src]['accuracy']:.2f} | {rec['accuracy']:.2f} | "
                f"{rec['computation_percentage']:.3f} |")
        if static and "test" in static:
            diff, p = paired(rec, static["test"])
            budget = src.split("_cp")[1].split("_")[0]
            groups.setdefault(f"{src.split('_')[1]} {budget} %", []).append(diff)
            rows.append(f"{line} {static['test']['accuracy']:.2f} | {diff:+.2f} | {fmt_p(p)} |")
        else:
            rows.append(f"{line} - | - | - |")
    rows += ["", "Over the seeds (descriptive: tier 0 is post hoc; no claim):", "",
             "| options, budget | pooled recal. - static per seed | mean [95 % t-interval] |", "|---|---|---|"]
    for g, d in groups.items():
        rows.append(f"| {g} | {', '.join(f'{x:+.2f}' for x in d)} | "
                    f"{fmt_iv(significance.t_interval(d)) if len(d) > 1 else '-'} |")
    return rows + [""] + controls(runs, [n for n, r in sorted(runs.items()) if r.get("kind") == "reeval"],
                                  "Tier 0 controls (row_shuffled is new; each control's cost difference to the gate)")


def pilots(runs, kind):
    rows = [f"### beta pilot, {kind} (validation split; the rule of PLAN.md)", "",
            "| run | beta | target % | val cp % | val top-1 | test top-1 |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in sorted(runs.items()):
        if name.startswith(f"pilot_{kind}_"):
            rows.append(f"| {name} | {r['beta']} | {r['target']} | {r['val']['computation_percentage']:.3f} | "
                        f"{r['val']['acc']:.2f} | {r['test']['accuracy']:.2f} |")
    chosen = {r["beta_selected_by"] for r in runs.values()  # None: a run given its beta (a pilot itself)
              if (r.get("beta_selected_by") or "").startswith(f"pilot_{kind}")}
    rows.append("")
    rows.append(f"Chosen: {', '.join(sorted(chosen)) or 'not yet'}.")
    return rows


def separation(runs):
    """Per-option-BN DFS (tier 1) minus round 2's shared-BN DFS, same budget and seed (descriptive)."""
    with open(os.path.join(R2, "results.json")) as f:
        r2 = json.load(f)["runs"]
    rows = ["### Separating the causes: per-option-BN DFS minus round 2's shared-BN DFS (descriptive)", "",
            "| budget % | seeds' per-option - shared | mean [95 % t-interval] |", "|---:|---|---|"]
    for b in BUDGETS:
        d = [paired(runs[f"dfs_po_lowbit_cp{b}_s{s}"]["test"], r2[f"dfs_lowbit_cp{b}_s{s}"]["test"])[0]
             for s in SEEDS if f"dfs_po_lowbit_cp{b}_s{s}" in runs]
        rows.append(f"| {b} | {', '.join(f'{x:+.2f}' for x in d) or 'not run'} | "
                    f"{fmt_iv(significance.t_interval(d)) if len(d) > 1 else '-'} |")
    return rows


def halves(runs):
    rows = ["### Tier 3 by test half (marked = easy, unmarked = hard)", "",
            "| run | marked top-1 | unmarked top-1 | marked cp % | unmarked cp % |", "|---|---:|---:|---:|---:|"]
    for name, r in sorted(runs.items()):
        h = (r.get("test") or {}).get("halves")
        if h and r.get("tier") == 3:
            rows.append(f"| {name} | {h['marked']['accuracy']:.2f} | {h['unmarked']['accuracy']:.2f} | "
                        f"{h['marked']['computation_percentage']:.3f} | {h['unmarked']['computation_percentage']:.3f} |")
    return rows


def write(runs, out):
    """OUT/results.md: every table of round 3, from the records."""
    tier1 = [(f"{b} %", s, f"dfs_po_lowbit_cp{b}_s{s}") for b in BUDGETS for s in SEEDS]
    tier2 = [(bn, s, f"dfs_{tag}paper_cp{PAPER_BUDGET}_s{s}") for bn, tag in (("shared BN", ""), ("per-option BN", "po_"))
             for s in SEEDS]
    tier3 = [(bn, s, f"dfs_{tag}marked_cp{PAPER_BUDGET}_s{s}") for bn, tag in (("shared BN", ""), ("per-option BN", "po_"))
             for s in SEEDS]
    parts = ["# Round 3 results (generated by study/round3_analysis.py from results.json)", "",
             "The plan is PLAN.md. Differences are in points of test top-1 on the same 10,000 images.", ""]
    parts += tier0(runs) + [""] + pilots(runs, "lowbit") + [""]
    parts += comparison(runs, tier1, "Tier 1 (primary): per-option-BN DFS {skip, 2, 3, 4} against static",
                        "Per budget (Holm over the three budgets):") + [""]
    parts += separation(runs) + [""]
    parts += controls(runs, [n for _, _, n in tier1], "Tier 1 controls") + [""]
    parts += pilots(runs, "paper") + [""]
    parts += comparison(runs, tier3, f"Tier 3 (positive control, fashion-mnist-marked, {PAPER_BUDGET} %)",
                        "Per BN mode (Holm over the two):") + [""] + halves(runs) + [""]
    parts += controls(runs, [n for _, _, n in tier3], "Tier 3 controls") + [""]
    parts += comparison(runs, tier2, f"Tier 2 (the paper's options at {PAPER_BUDGET} %)",
                        "Per BN mode (Holm over the two):") + [""]
    parts += controls(runs, [n for _, _, n in tier2], "Tier 2 controls")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(parts) + "\n")
    print(f"{os.path.join(out, 'results.md')}: {len(runs)} runs")
