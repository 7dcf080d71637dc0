"""The analysis fixed in results/fashion-mnist-round4/PLAN.md, from results.json (and round 3's records,
whose 300-iteration static counterparts tier A pairs against).

    python study/round4.py --analyse-only      # writes OUT/results.md

It also holds the plan's definitions that the runner decides by (the target, the pilots' weight grids
and the rule that selects one, the arms and their pass criterion): study/round4.py imports them from
here, and this module imports no runner.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from study import significance  # noqa: E402
from study.round2_analysis import fmt_p, paired  # noqa: E402
from study.round3_analysis import family, fmt_iv, fmt_num, holm, t_test_p  # noqa: E402

R3 = os.path.join(ROOT, "results", "fashion-mnist-round3")
SEEDS, LENGTHS = (0, 1, 2), (300, 3000)


def round3_runs():
    with open(os.path.join(R3, "results.json")) as f:
        return json.load(f)["runs"]


def static_of(runs, r3, length, seed):
    """Tier A's static counterpart: round 3's at 300 iterations (same parent, seed, schedule), ours at 3,000."""
    return r3.get(f"static_of_dfs_marked_cp3.0_s{seed}") if length == 300 else runs.get(f"static_3000_s{seed}")


def halves(test):
    """{half: (top-1, computation %)} of a test record (eval.py's routing diagnostics, or round 3's `halves`)."""
    h = (test.get("routing") or {}).get("halves") or test.get("halves") or {}
    return {k: (v.get("acc", v.get("accuracy")), v["computation_percentage"]) for k, v in h.items()}


def certificate(diffs_by_length):
    """The plan's rule per length: Holm over the lengths with three seeds; holds if Holm p < 0.05 and
    every seed is positive. -> {length: (interval, p, Holm p, verdict)}."""
    full = {k: d for k, d in diffs_by_length.items() if len(d) == len(SEEDS)}
    adjusted = dict(zip(full, holm([t_test_p(d) for d in full.values()])))
    out = {}
    for length, diffs in diffs_by_length.items():
        if length not in full:
            out[length] = (None, None, None, f"{len(diffs)} of {len(SEEDS)} seeds: not complete")
            continue
        hp = adjusted[length]
        holds = hp < 0.05 and all(d > 0 for d in diffs)
        out[length] = (significance.t_interval(diffs), t_test_p(diffs), hp, "holds" if holds else "fails")
    return out


def tier_a(runs, r3):
    rows = ["## Tier A: the certificate (oracle routing against the static policy, both 2.344 %)", "",
            "| length | seed | oracle top-1 | static top-1 | oracle - static | McNemar p | oracle cp % | static cp % | "
            "oracle marked / unmarked top-1 | static marked / unmarked top-1 | oracle marked / unmarked cp % |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    diffs = {length: [] for length in LENGTHS}
    for length in LENGTHS:
        for seed in SEEDS:
            oracle, static = runs.get(f"oracle_{length}_s{seed}"), static_of(runs, r3, length, seed)
            if not oracle or not static:
                missing = " and ".join(n for n, r in (("oracle", oracle), ("static", static)) if not r)
                rows.append(f"| {length} | {seed} | {missing} not run | | | | | | | | |")
                continue
            diff, p = paired(oracle["test"], static["test"])
            diffs[length].append(diff)
            ho, hs = halves(oracle["test"]), halves(static["test"])
            rows.append(f"| {length} | {seed} | {oracle['test']['accuracy']:.2f} | {static['test']['accuracy']:.2f} | "
                        f"{diff:+.2f} | {fmt_p(p)} | {oracle['test']['computation_percentage']:.3f} | "
                        f"{static['test']['computation_percentage']:.3f} | "
                        f"{ho['marked'][0]:.2f} / {ho['unmarked'][0]:.2f} | {hs['marked'][0]:.2f} / {hs['unmarked'][0]:.2f} | "
                        f"{ho['marked'][1]:.3f} / {ho['unmarked'][1]:.3f} |")
    rows += ["", "Per length (Holm over the two lengths; the certificate holds if Holm p < 0.05 and all three "
             "seeds are positive):", "",
             "| length | seeds' oracle - static | mean [95 % t-interval] | t-test p | Holm p | certificate |",
             "|---:|---|---|---:|---:|---|"]
    verdicts = certificate(diffs)
    for length, (iv, p, hp, text) in verdicts.items():
        rows.append(f"| {length} | {', '.join(f'{d:+.2f}' for d in diffs[length]) or '-'} | {fmt_iv(iv)} | "
                    f"{fmt_num(p)} | {fmt_num(hp)} | {text} |")
    return rows, verdicts


TERMS = ("signed", "squared", "deadband")
ARMS = tuple(f"b_{t}_s0" for t in TERMS) + ("c_gumbel_s0",)
GAP, BITS, MIN_BLOCKS = 3.0, 0.5, 4  # the pass criterion: points, bits, blocks
TARGET = "2.34375"  # tiers B-C's target, the static policy's cost, as --minimum is given it
GRIDS = {"signed": ("0.001", "0.01", "0.1"), "squared": ("10", "100", "1000"), "deadband": ("0.001", "0.01", "0.1")}


def pilot_name(term, weight):
    return f"pilot_{term}_w{weight}_s0"


def select_weight(records, term):
    """The plan's rule: the smallest weight whose validation cost at iteration 1,000 is at most 1.1 x the
    target; if none, the largest. Returns the pilot's name."""
    binding = [w for w in GRIDS[term]
               if records[pilot_name(term, w)]["val"]["computation_percentage"] <= 1.1 * float(TARGET)]
    return pilot_name(term, min(binding, key=float) if binding else max(GRIDS[term], key=float))


def pilots(runs):
    rows = ["## Tier B weight pilots (validation, seed 0, first 1,000 of 3,000 iterations; target 2.344 %)", "",
            "| term | weight | val cp % at 250 / 500 / 750 / 1,000 | marked / unmarked cp % at 1,000 | val top-1 at 1,000 |",
            "|---|---:|---|---|---:|"]
    for name, r in sorted(runs.items(), key=lambda kv: (kv[0].split("_")[1], float(kv[1].get("weight", 0)))):
        if r.get("kind") != "pilot":
            continue
        cps = " / ".join(f"{v['computation_percentage']:.2f}" for v in r.get("val_history", [r["val"]]))
        h = r["val"]["routing"]["halves"]
        rows.append(f"| {r['term']} | {r['weight']} | {cps} | {h['marked']['computation_percentage']:.2f} / "
                    f"{h['unmarked']['computation_percentage']:.2f} | {r['val']['acc']:.2f} |")
    chosen = [f"{term}: {select_weight(runs, term)}" for term in TERMS  # the rule itself, as the study applies it
              if all(pilot_name(term, w) in runs for w in GRIDS[term])]
    return rows + ["", f"Selected (smallest weight with val cp at 1,000 at most 1.1 x the target, else the largest): "
                   f"{'; '.join(chosen) or 'not yet'}."]


def verdict(arm, static):
    """The plan's pass criterion on the test set: (gap, blocks with >= 0.5 bit, top-1 difference, McNemar p, passes)."""
    t = arm["test"]
    h = t["routing"]["halves"]
    gap = h["unmarked"]["computation_percentage"] - h["marked"]["computation_percentage"]
    blocks = sum(b >= BITS for b in t["routing"]["mark_information_bits"])
    if not static or "test" not in static:
        return gap, blocks, None, None, None
    diff, p = paired(t, static["test"])
    return gap, blocks, diff, p, gap >= GAP and blocks >= MIN_BLOCKS and diff >= 0


def arms(runs, r3):
    rows = ["## Tiers B-C: the arms (seed 0, final state, test set)", "",
            f"Pass: unmarked minus marked cost at least {GAP:g} points, mutual information at least {BITS} bit on at "
            f"least {MIN_BLOCKS} of 8 blocks, top-1 at least the static counterpart's (searched on validation in "
            "[arm's val cost - 1, its cost], trained as long); where that search finds no policy in the window, "
            "criterion 3 cannot be judged and the arm is shown without a verdict (-).", "",
            "| arm | term, weight | val cp % | test cp % | marked / unmarked cp % | gap (pt) | blocks >= 0.5 bit | "
            "MI per block (bits) | top-1 | static top-1 (policy) | arm - static | McNemar p | passes |",
            "|---|---|---:|---:|---|---:|---:|---|---:|---|---:|---:|---|"]
    ref = r3.get("dfs_po_marked_cp3.0_s0")
    if ref:
        h = halves(ref["test"])
        rows.append(f"| round 3 `dfs_po_marked_cp3.0_s0` (reference, 300 iterations, target 3 %) | signed, 0.32 | "
                    f"{ref['val']['computation_percentage']:.3f} | {ref['test']['computation_percentage']:.3f} | "
                    f"{h['marked'][1]:.3f} / {h['unmarked'][1]:.3f} | {h['unmarked'][1] - h['marked'][1]:+.2f} | - | - | "
                    f"{ref['test']['accuracy']:.2f} | - | - | - | - |")
    for name in ARMS:
        r = runs.get(name)
        if not r:
            rows.append(f"| {name} | not run | | | | | | | | | | | |")
            continue
        static = runs.get(f"static_of_{name}")
        gap, blocks, diff, p, passes = verdict(r, static)
        h = halves(r["test"])
        mi = ", ".join(f"{b:.2f}" for b in r["test"]["routing"]["mark_information_bits"])
        if static and "test" in static:
            st = f"{static['test']['accuracy']:.2f} ({static['policy']}{', = ' + static['same_as'] if 'same_as' in static else ''})"
        else:
            st = static["failed"].splitlines()[-1] if static else "not run"
        rows.append(f"| {name} | {r['term']}{' + gumbel' if r['estimator'] == 'gumbel' else ''}, {r['weight']} | "
                    f"{r['val']['computation_percentage']:.3f} | {r['test']['computation_percentage']:.3f} | "
                    f"{h['marked'][1]:.3f} / {h['unmarked'][1]:.3f} | {gap:+.2f} | {blocks} | {mi} | "
                    f"{r['test']['accuracy']:.2f} | {st} | {'-' if diff is None else f'{diff:+.2f}'} | "
                    f"{'-' if p is None else fmt_p(p)} | {'-' if passes is None else 'yes' if passes else 'no'} |")
    return rows


def figure(runs, out):
    """Per arm, each half's validation cost over training, with the oracle's and the static costs marked."""
    done = [n for n in ARMS if n in runs and runs[n].get("val_history")]
    if not done:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(done), figsize=(3.6 * len(done), 3.2), squeeze=False)  # each its own scale
    for ax, name in zip(axes[0], done):
        hist = runs[name]["val_history"]
        steps = [v["step"] for v in hist]
        for half, style in (("marked", "-o"), ("unmarked", "-s")):
            ax.plot(steps, [v["halves"][half]["computation_percentage"] for v in hist], style, ms=3, label=half)
        ax.axhline(4.6875, color="grey", ls="--", lw=0.8, label="oracle, unmarked")
        ax.axhline(0.0, color="grey", ls=":", lw=0.8, label="oracle, marked")
        ax.axhline(2.34375, color="black", lw=0.8, label="static (both halves)")
        top = max(v["halves"][h]["computation_percentage"] for v in hist for h in ("marked", "unmarked"))
        ax.set_ylim(-0.2, max(6.0, 1.05 * top))
        ax.set_title(f"{name} ({runs[name]['term']}, {runs[name]['weight']})", fontsize=8)
        ax.set_xlabel("iteration")
    axes[0][0].set_ylabel("validation computation %")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = os.path.join(out, "per_half_computation.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def seeds(runs):
    """Passing arms over seeds 0-2: per seed the criteria and arm minus static; per arm the t-interval,
    Holm over the arms that reach this stage, a difference claimed only if Holm p < 0.05 and every seed
    agrees in sign (round3_analysis.family)."""
    arms = sorted({r["recipe_of"] for r in runs.values() if r.get("kind") == "seed"})
    if not arms:
        return []
    rows = ["## Seeds 0-2 of the arms that pass on seed 0", "",
            "| arm | seed | top-1 | static top-1 | arm - static | McNemar p | gap (pt) | blocks >= 0.5 bit |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups = {}
    for arm in arms:
        for seed in (0, 1, 2):
            name = arm if seed == 0 else f"{arm[:-3]}_s{seed}"
            r, static = runs.get(name), runs.get(f"static_of_{name}")
            if not r or not static or "test" not in static:
                rows.append(f"| {arm} | {seed} | not run | | | | | |")
                continue
            gap, blocks, diff, p, _ = verdict(r, static)
            groups.setdefault(arm, []).append(diff)
            rows.append(f"| {arm} | {seed} | {r['test']['accuracy']:.2f} | {static['test']['accuracy']:.2f} | "
                        f"{diff:+.2f} | {fmt_p(p)} | {gap:+.2f} | {blocks} |")
    rows += ["", "Per arm (Holm over the arms that reach this stage):", "",
             "| arm | seeds' arm - static | mean [95 % t-interval] | t-test p | Holm p | verdict |", "|---|---|---|---:|---:|---|"]
    for arm, (iv, p, hp, text) in family(groups).items():
        rows.append(f"| {arm} | {', '.join(f'{d:+.2f}' for d in groups[arm])} | {fmt_iv(iv)} | {fmt_num(p)} | "
                    f"{fmt_num(hp)} | {text.replace('DFS', 'arm')} |")
    return rows


def negative_control(runs):
    """Tier D, descriptive: each passing arm's recipe on fashion-mnist-marked-random, per half."""
    done = [r for r in runs.values() if r.get("kind") == "negative"]
    if not done:
        return []
    rows = ["## Tier D: the negative control (fashion-mnist-marked-random, seed 0; descriptive)", "",
            "| recipe of | top-1 | marked / unmarked top-1 | marked / unmarked cp % | gap (pt) | blocks >= 0.5 bit |",
            "|---|---:|---|---|---:|---:|"]
    for r in sorted(done, key=lambda r: r["recipe_of"]):
        h = halves(r["test"])
        blocks = sum(b >= BITS for b in r["test"]["routing"]["mark_information_bits"])
        rows.append(f"| {r['recipe_of']} | {r['test']['accuracy']:.2f} | {h['marked'][0]:.2f} / {h['unmarked'][0]:.2f} | "
                    f"{h['marked'][1]:.3f} / {h['unmarked'][1]:.3f} | {h['unmarked'][1] - h['marked'][1]:+.2f} | {blocks} |")
    return rows


def later_tiers(verdicts, runs):
    """What the plan's decision rule says about the tiers after A, given tier A and the arms."""
    done = [v[3] for v in verdicts.values()]
    if all(v == "fails" for v in done):
        return ["## Tiers B-E", "", "Not run: the certificate fails at both lengths. By the plan's decision rule the "
                "control is changed first and the change is written into PLAN.md as a dated amendment."]
    if not any(v == "holds" for v in done):
        return ["## Tiers B-E", "", "Not run: tier A is not complete."]
    missing = [n for n in ARMS if n not in runs or f"static_of_{n}" not in runs]
    if missing:
        return ["## Tiers D-E and seeds 1-2", "", f"Not run yet: tiers B-C are not complete ({', '.join(missing)} "
                "or their static counterparts have no record)."]
    passing = [n for n in ARMS if verdict(runs[n], runs[f"static_of_{n}"])[4]]
    if not passing:
        return ["## Tiers D-E and seeds 1-2", "", "Not run: no arm passes on seed 0 (the plan runs them only for "
                "passing arms)."]
    rows = seeds(runs) + [""] + negative_control(runs)
    return rows + ["", "## Not run yet", "", f"Passing on seed 0: {', '.join(passing)}. Tier E (plain Fashion-MNIST, "
                   "{skip, 2, 3, 4} at 0.8 %) has no code yet; seeds 1-2 and tier D are listed above as far as they ran."]


def write(runs, out):
    """OUT/results.md: every table of round 4, from the records."""
    r3 = round3_runs()
    rows, verdicts = tier_a(runs, r3)
    parts = ["# Round 4 results (generated by study/round4_analysis.py from results.json)", "",
             "The plan is PLAN.md. Differences are in points of test top-1 on the same 10,000 images "
             "(5,000 marked, 5,000 unmarked). The 300-iteration static counterparts are round 3's "
             "`static_of_dfs_marked_cp3.0_s{seed}` (results/fashion-mnist-round3/results.json).", ""]
    parts += rows + [""]
    if any(r.get("kind") in ("pilot", "arm", "gumbel") for r in runs.values()):
        parts += pilots(runs) + [""] + arms(runs, r3) + [""]
        path = figure(runs, out)
        if path:
            parts += [f"![per-half computation]({os.path.basename(path)})", "",
                      "Each half's validation computation over training (every 250 iterations); grey: the oracle's "
                      "per-half costs (marked 0 %, unmarked 4.69 %); black: 2.344 %, the cost of the oracle and of tier "
                      "A's static network (the searched counterparts of the B and C arms ran at 1.56 %).", ""]
    parts += later_tiers(verdicts, runs)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(parts) + "\n")
    print(f"{os.path.join(out, 'results.md')}: {len(runs)} runs")
