"""The analysis fixed in results/fashion-mnist-dynamic/PLAN.md, from results.json alone.

Writes OUT/results.md (every table of the README's round-2 section) and the plots. Run by
study/round2.py after each session of runs, or alone: `python study/round2.py --analyse-only`.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from study import significance  # noqa: E402

ROUND1 = os.path.join(ROOT, "results", "fashion-mnist", "results.json")


def correct(record, n):
    return significance.unpack_bits(record["correct_bits"], record.get("num_samples", n))


def paired(a, b):
    """(A - B in points, McNemar p) for two test records (or a record and its control) on the same images."""
    ca, cb = correct(a, a["num_samples"]), correct(b, a["num_samples"])
    return significance.paired_difference(ca, cb)[0], significance.mcnemar_exact(ca, cb)


def fmt_p(p):
    """A p-value for the tables (exact ones below the float range print as a bound)."""
    return f"{p:.3g}" if p > 0 else "< 1e-300"


def fmt_policy(policy):
    """A static policy as a short comma list: skip,8,8,..."""
    return ",".join(o.replace("-bit", "") for o in policy)


def verdict(diffs):
    """The plan's rule: a gain is claimed only if the 95 % t-interval excludes 0 and every seed agrees."""
    if len(diffs) < 2:
        return None, f"{len(diffs)} seed(s): no interval yet"
    mean, lo, hi = significance.t_interval(diffs)
    if lo > 0 and all(d > 0 for d in diffs):
        text = "DFS better"
    elif hi < 0 and all(d < 0 for d in diffs):
        text = "static better"
    else:
        text = "no difference shown"
    return (mean, lo, hi), text


def fmt_interval(iv):
    return "-" if iv is None else f"{iv[0]:+.2f} [{iv[1]:+.2f}, {iv[2]:+.2f}]"


def primary(runs):
    """DFS minus its static counterpart, per option set and budget."""
    rows = ["| DFS options | budget % | seed | DFS cp % (val / test) | static cp % | DFS top-1 | static top-1 | "
            "DFS - static | McNemar p | static policy |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    summary = ["| DFS options | budget % | seeds | DFS - static, mean [95 % t-interval] | verdict |",
               "|---|---:|---:|---|---|"]
    out = {}
    for method in ("dfs-lowbit", "dfs-paper"):
        budgets = sorted({r["target"] for r in runs.values() if r.get("method") == method})
        for budget in budgets:
            diffs = []
            for r in sorted((r for r in runs.values() if r.get("method") == method and r["target"] == budget),
                            key=lambda r: r["seed"]):
                s = runs.get(f"static_of_{r['name']}")
                if s is None or "test" not in s:
                    reason = s["failed"] if s else "not run yet"
                    rows.append(f"| {method} | {budget} | {r['seed']} | {r['val']['computation_percentage']:.2f} / "
                                f"{r['test']['computation_percentage']:.2f} | - | {r['test']['accuracy']:.2f} | - | - | - | "
                                f"{reason} |")
                    continue
                diff, p = paired(r["test"], s["test"])
                diffs.append(diff)
                rows.append(f"| {method} | {budget} | {r['seed']} | {r['val']['computation_percentage']:.2f} / "
                            f"{r['test']['computation_percentage']:.2f} | {s['test']['computation_percentage']:.2f} | "
                            f"{r['test']['accuracy']:.2f} | {s['test']['accuracy']:.2f} | {diff:+.2f} | {fmt_p(p)} | "
                            f"{fmt_policy(s['test']['policy'])} |")
            iv, text = verdict(diffs)
            failed = [r for r in runs.values() if r.get("method") == "static-counterpart" and "failed" in r
                      and runs.get(r["match"], {}).get("method") == method and runs[r["match"]]["target"] == budget]
            if not diffs and failed:
                reached = sorted({f"{runs[r['match']]['val']['computation_percentage']:.2f}" for r in failed})
                text = (f"no comparison: DFS ended at {' / '.join(reached)} % (val), where no static policy of "
                        f"the counterparts' options exists")
            out[(method, budget)] = (diffs, iv, text)
            summary.append(f"| {method} | {budget} | {len(diffs)} | {fmt_interval(iv)} | {text} |")
    return "\n".join(summary), "\n".join(rows), out


def budgets(runs):
    """Did budget control reach the target? Every DFS run's target against its computation percentage,
    and the options its gate used (share of all block decisions)."""
    rows = ["| run | target % | val cp % | test cp % | top-1 | options used (share of decisions) |",
            "|---|---:|---:|---:|---:|---|"]
    for r in sorted((r for r in runs.values() if r.get("method", "").startswith("dfs") and "test" in r),
                    key=lambda r: (r["method"], r["target"], r["seed"])):
        t = r["test"]
        shares = [sum(block[k] for block in t["decision_distribution"]) / len(t["decision_distribution"])
                  for k in range(len(t["option_names"]))]
        used = ", ".join(f"{n} {v:.2f}" for n, v in zip(t["option_names"], shares) if v >= 0.005)
        rows.append(f"| {r['name']} | {r['target']} | {r['val']['computation_percentage']:.2f} | "
                    f"{t['computation_percentage']:.2f} | {t['accuracy']:.2f} | {used} |")
    return "\n".join(rows)


def controls(runs):
    """Each DFS run against its own decisions shuffled across images, and against its majority policy."""
    rows = ["| run | top-1 | cp % | shuffled top-1 (cp %) | DFS - shuffled (p) | majority top-1 (cp %) | "
            "DFS - majority (p) |", "|---|---:|---:|---|---|---|---|"]
    by_group = {}
    for r in sorted((r for r in runs.values() if r.get("method", "").startswith("dfs") and "test" in r),
                    key=lambda r: r["name"]):  # every run record but the pilot has a name
        t, c = r["test"], r["test"]["controls"]
        ds, ps = paired(t, c["shuffled"])
        dm, pm = paired(t, c["majority"])
        by_group.setdefault((r["method"], r["target"]), []).append((ds, dm))
        rows.append(f"| {r['name']} | {t['accuracy']:.2f} | {t['computation_percentage']:.2f} | "
                    f"{c['shuffled']['accuracy']:.2f} ({c['shuffled']['computation_percentage']:.2f}) | "
                    f"{ds:+.2f} ({fmt_p(ps)}) | {c['majority']['accuracy']:.2f} ({c['majority']['computation_percentage']:.2f}) | "
                    f"{dm:+.2f} ({fmt_p(pm)}) |")
    summary = ["| DFS options | budget % | seeds | DFS - shuffled [95 %] | DFS - majority [95 %] |",
               "|---|---:|---:|---|---|"]
    for (method, budget), pairs in sorted(by_group.items()):
        ivs = [verdict([p[i] for p in pairs]) for i in (0, 1)]
        summary.append(f"| {method} | {budget} | {len(pairs)} | {fmt_interval(ivs[0][0])} ({ivs[0][1]}) | "
                       f"{fmt_interval(ivs[1][0])} ({ivs[1][1]}) |")
    return "\n".join(summary), "\n".join(rows)


def uniform(runs):
    rows = ["| static network | seeds | test cp % | top-1 per seed | mean [95 % t-interval] |", "|---|---:|---:|---|---|"]
    for bits in (2, 3):
        rs = sorted((r for r in runs.values() if r.get("method") == f"static-uniform-{bits}" and "test" in r),
                    key=lambda r: r["seed"])
        if rs:
            accs = [r["test"]["accuracy"] for r in rs]
            iv = significance.t_interval(accs) if len(accs) > 1 else None
            rows.append(f"| {bits}-bit everywhere | {len(rs)} | {rs[0]['test']['computation_percentage']:.2f} | "
                        f"{', '.join(f'{a:.2f}' for a in accs)} | "
                        f"{'-' if iv is None else f'{iv[0]:.2f} [{iv[1]:.2f}, {iv[2]:.2f}]'} |")
    return "\n".join(rows)


def schedule(runs):
    rows = ["| method | stage-3 iterations | seed | test cp % | top-1 | source |", "|---|---:|---:|---:|---:|---|"]
    round1 = json.load(open(ROUND1)) if os.path.exists(ROUND1) else []
    for r in round1:
        if r["method"] in ("dfs", "skipnet") and r["target"] == 20:
            rows.append(f"| {r['method']} | 300 | {r['seed']} | {r['computation_percentage']:.2f} | {r['accuracy']:.2f} | round 1 |")
    for r in runs.values():
        if r.get("method", "").endswith("-long") and "test" in r:
            rows.append(f"| {r['method'].replace('dfs-', '').replace('-long', '').replace('paper', 'dfs')} | 1200 | "
                        f"{r['seed']} | {r['test']['computation_percentage']:.2f} | {r['test']['accuracy']:.2f} | round 2 |")
    return "\n".join(rows)


def pilot(runs):
    p = runs.get("pilot")
    if not p:
        return "not run yet"
    return ("| bits everywhere | " + " | ".join(p["val_accuracy"]) + " |\n|---|" + "---:|" * len(p["val_accuracy"])
            + "\n| val top-1 % | " + " | ".join(f"{v:.2f}" for v in p["val_accuracy"].values()) + " |")


def recalibrated(runs, extra):
    """The amendment: DFS with BN re-estimated under its own decisions, against the same counterpart."""
    rows = ["| run | DFS top-1 | recalibrated top-1 (cp %) | static counterpart top-1 | recalibrated - static (p) |",
            "|---|---:|---|---:|---|"]
    by_group = {}
    for name, rec in sorted(extra.items()):
        r, s = runs.get(name), runs.get(f"static_of_{name}")
        if r is None:
            continue
        rec = dict(rec, num_samples=r["test"]["num_samples"])
        if s is None or "test" not in s:
            rows.append(f"| {name} | {r['test']['accuracy']:.2f} | {rec['accuracy']:.2f} ({rec['computation_percentage']:.2f}) | - | - |")
            continue
        diff, p = paired(rec, s["test"])
        by_group.setdefault((r["method"], r["target"]), []).append(diff)
        rows.append(f"| {name} | {r['test']['accuracy']:.2f} | {rec['accuracy']:.2f} ({rec['computation_percentage']:.2f}) | "
                    f"{s['test']['accuracy']:.2f} | {diff:+.2f} ({fmt_p(p)}) |")
    summary = ["| DFS options | budget % | seeds | recalibrated DFS - static [95 %] |", "|---|---:|---:|---|"]
    for (method, budget), diffs in sorted(by_group.items()):
        iv, text = verdict(diffs)
        summary.append(f"| {method} | {budget} | {len(diffs)} | {fmt_interval(iv)} ({text}) |")
    return "\n".join(summary) + "\n\n" + "\n".join(rows)


def amended(runs, amendment):
    """Amendment 2: paper-option DFS against a static counterpart with its own options, at or below its cost."""
    rows = ["| DFS run | DFS cp % (test) | DFS top-1 | static policy | static cp % | static top-1 | DFS - static (p) |",
            "|---|---:|---:|---|---:|---:|---|"]
    for name, s in sorted(amendment.items()):
        r = runs[s["match"]]
        if "test" not in s:
            rows.append(f"| {s['match']} | {r['test']['computation_percentage']:.2f} | {r['test']['accuracy']:.2f} | "
                        f"{s.get('failed', 'not run')} | - | - | - |")
            continue
        diff, p = paired(r["test"], s["test"])
        rows.append(f"| {s['match']} | {r['test']['computation_percentage']:.2f} | {r['test']['accuracy']:.2f} | "
                    f"{fmt_policy(s['test']['policy'])} | "
                    f"{s['test']['computation_percentage']:.2f} | {s['test']['accuracy']:.2f} | {diff:+.2f} ({fmt_p(p)}) |")
    return "\n".join(rows) if amendment else "(not run: `python study/round2.py --amendment`)"


def write(results, out):
    runs = results["runs"]
    extra_path = os.path.join(out, "posthoc.json")
    extra = json.load(open(extra_path)) if os.path.exists(extra_path) else {}
    amendment_path = os.path.join(out, "amendment.json")
    amendment = json.load(open(amendment_path)) if os.path.exists(amendment_path) else {}
    summary, rows, _ = primary(runs)
    csum, crows = controls(runs)
    text = f"""# Round 2 results (generated by study/round2_analysis.py from results.json)

## Pilot (validation split, backbone with BN recalibrated per bitwidth)

{pilot(runs)}

## Primary comparison: DFS minus its static counterpart (test set, paired)

{summary}

{rows}

## Budget control: where each DFS run ended

{budgets(runs)}

## Controls: the DFS runs' own decisions without the input dependence (test set, paired)

{csum}

{crows}

## Amendment (added after the first results, not in the plan's rule): DFS with BN re-estimated under its own decisions

DFS training runs every option of a block in train mode, so its BN statistics mix all bitwidths;
the static networks have statistics of their own option. This control re-estimates the DFS
checkpoint's BN statistics (10 training batches, plain average) with each sample routed through
the option its gate chooses, then evaluates; activation ranges are left as trained.

{recalibrated(runs, extra)}

## Amendment 2 (added after tiers 3 and 2, descriptive only): paper-option DFS against a static network with its own options

The paper-option DFS runs that skip per input never reached a budget where a {{skip, 2, 3, 4}}
counterpart exists. Each gets a static counterpart with the paper's options, searched on the
validation split at or below its validation cost (window 1 point), fine-tuned like every static run.

{amended(runs, amendment)}

## Static uniform networks (fine-tuned like every run)

{uniform(runs)}

## The schedule question (target 20 %, paper option set vs SkipNet-style)

{schedule(runs)}
"""
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    plot(runs, os.path.join(out, "accuracy_vs_computation.png"))
    plot_decisions(runs, os.path.join(out, "decision_distribution.png"))


COLOURS = {"dfs-lowbit": "tab:blue", "static-counterpart": "tab:orange", "dfs-paper": "tab:green",
           "static-uniform-2": "tab:red", "static-uniform-3": "tab:purple"}


def backbone_accuracy():
    """Round 1's backbone, the starting point of every round-2 run (test top-1, from its record)."""
    return next(r["accuracy"] for r in json.load(open(ROUND1)) if r["method"] == "backbone")


def plot(runs, path):
    """One marker per run; per method and budget the mean with its 95 % t-interval; no lines across runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    backbone = backbone_accuracy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, zoom in zip(axes, (False, True)):
        for method, colour in COLOURS.items():
            rs = [r for r in runs.values() if r.get("method") == method and "test" in r]
            if not rs:
                continue
            ax.scatter([r["test"]["computation_percentage"] for r in rs], [r["test"]["accuracy"] for r in rs],
                       s=14, color=colour, alpha=0.5, label=method)
            groups = {}  # one mean per method and budget: a counterpart by its DFS run's option set and budget
            for r in rs:
                groups.setdefault(r.get("target") or (r.get("match") or r["method"]).rsplit("_s", 1)[0], []).append(r)
            for g in groups.values():
                if len(g) > 1:
                    cp = sum(r["test"]["computation_percentage"] for r in g) / len(g)
                    mean, lo, hi = significance.t_interval([r["test"]["accuracy"] for r in g])
                    ax.errorbar([cp], [mean], yerr=[[mean - lo], [hi - mean]], fmt="D", color=colour, capsize=3, ms=5)
        ax.axhline(backbone, color="black", linestyle=":", linewidth=1,
                   label=f"full-precision backbone ({backbone:.2f} %, 100 % computation)")
        ax.set(xlabel="computation percentage (test, %)", ylabel="top-1 test accuracy (%)",
               title="zoom: within 3 points of the best run" if zoom else "ResNet-20, Fashion-MNIST, round 2")
        ax.grid(alpha=0.3)
        if zoom:
            best = [r["test"]["accuracy"] for r in runs.values() if "test" in r]
            if best:
                ax.set_ylim(max(best) - 3, max(best) + 0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_decisions(runs, path):
    from core import plots
    gated = [dict(r["test"], arch=name) for name, r in sorted(runs.items())
             if r.get("method", "").startswith("dfs") and "test" in r and r["seed"] == 0]
    plots.plot_decisions(gated, path)
