"""The Fashion-MNIST study: DFS vs SkipNet-style skipping vs static quantization (README "Results").

    python study/round1.py [--runs runs/study] [--out results/fashion-mnist]

Trains, through the real stage scripts, one ResNet-20 backbone, a stage-2 gate for each option
set and a stage-3 run for each (method, target, seed) below, then evaluates every model_best on
the 10,000 test images. A finished run is skipped, a cut-off one resumed from its
checkpoint_latest, so running the command again after an interruption only does what is left.
`model_best` is chosen on 5,000 held-out training images (--val-size), never on the test set.

For each run it writes a weights-only release checkpoint (OUT/checkpoints/NAME.pth, about 1 MB),
evaluates that file with eval.py, and collects the records in OUT/results.json (and the table in
OUT/results.md), with the plots
OUT/accuracy_vs_computation.png and OUT/decision_distribution.png. Once every run is finished,
running it again only redoes the release, the evaluation and the plots.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core import runfolder  # noqa: E402

DEPTH, SEED = 20, 0
COMMON = ["--dataset", "fashion-mnist", "--val-size", "5000", "--batch-size", "128", "--print-freq", "50"]
# Stage schedules (iterations at batch 128; an epoch of the 55,000 training images is 430).
BASE = dict(iters=5000, extra=["--lr-steps", "3000", "4250", "--eval-every", "500"])
GATE = dict(iters=100, extra=["--beta", "1e-3", "--eval-every", "100"])
# Stage 3's beta: 5e-3. At 1e-3 the two-option (SkipNet-style) gate, saturated on "full" after
# stage 2, only started to skip after ~150 iterations and ended at 66 % for a 20 % target.
DFS = dict(iters=300, extra=["--lr-steps", "225", "--beta", "5e-3", "--eval-every", "300"])
OPTION_SETS = {"dfs": "paper", "skipnet": "skipnet", "dfs-released": "default",
               "static-8": "8", "static-16": "16"}
# (method, target, seed), in the order they run: the comparisons that matter most come first.
RUNS = [("skipnet", 20, 0), ("dfs", 20, 0), ("dfs", 30, 0), ("skipnet", 30, 0), ("dfs", 50, 0),
        ("skipnet", 50, 0), ("dfs", 10, 0), ("static-8", None, 0), ("static-16", None, 0),
        ("dfs-released", 20, 0), ("dfs", 20, 1), ("skipnet", 20, 1), ("skipnet", 10, 0)]


def sh(cmd, log):
    """Run a command, appending its output to `log`; exit the study on failure."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"error: {' '.join(cmd[:4])} ... exited with {code}; see {log}")


def stage(runs, script, arch, folder, parent, schedule, args, wall):
    """Run (or resume, or skip) one training run; returns its folder SAVE/ARCH."""
    run = os.path.join(runs, folder, arch)
    latest = os.path.join(run, runfolder.LATEST)
    start_from = latest if os.path.exists(latest) else parent
    cmd = [sys.executable, script, "train", arch, *COMMON, "--iters", str(schedule["iters"]),
           "--save-folder", os.path.join(runs, folder), "--seed", str(args.get("seed", SEED)),
           *schedule["extra"], *args.get("flags", [])]
    if start_from:
        cmd += ["--resume", start_from]
    t = time.time()
    sh(cmd, os.path.join(runs, f"{folder}.log"))
    wall[folder] = wall.get(folder, 0.0) + time.time() - t
    return run


def train_all(runs):
    """Every training run of the study; returns {name: (run folder, record fields)}."""
    os.makedirs(runs, exist_ok=True)
    wall_path = os.path.join(runs, "wall_seconds.json")
    wall = json.load(open(wall_path)) if os.path.exists(wall_path) else {}
    done = {}

    def save_wall():
        with open(wall_path, "w") as f:
            json.dump(wall, f, indent=1)

    base = stage(runs, "train_base.py", f"resnet{DEPTH}", "backbone", None, BASE, {}, wall)
    save_wall()
    done["backbone"] = (base, dict(method="backbone", options=["full"], target=None, seed=SEED,
                                   iterations={"base": BASE["iters"]}))
    arch = f"dfs_resnet{DEPTH}"
    for method, target, seed in RUNS:
        options = OPTION_SETS[method]
        gate = stage(runs, "train_gate_init.py", arch, f"gate_init_{method}",
                     os.path.join(base, runfolder.BEST), GATE,
                     {"flags": ["--options", options, "--minimum", "100"]}, wall)
        name = f"{method}_cp{target}_s{seed}" if target else f"{method}_s{seed}"
        run = stage(runs, "train_dfs.py", arch, name, os.path.join(gate, runfolder.LATEST),
                    DFS, {"seed": seed, "flags": ["--options", options, "--minimum", str(target or 100)]}, wall)
        save_wall()
        done[name] = (run, dict(method=method, options=options, target=target, seed=seed,
                                iterations={"base": BASE["iters"], "gate_init": GATE["iters"],
                                            "dfs": DFS["iters"]}))
    return done, wall


def release_and_evaluate(done, wall, out):
    """Weights-only checkpoints, their test-set evaluation, results.json and the plots."""
    from core.checkpoint import export_weights
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    records = []
    for name, (run, fields) in done.items():
        path = os.path.join(out, "checkpoints", f"{name}.pth")
        export_weights(os.path.join(run, runfolder.BEST), path)
        result_path = os.path.join(out, "eval", f"{name}.json")
        os.makedirs(os.path.dirname(result_path), exist_ok=True)
        sh([sys.executable, "eval.py", os.path.relpath(path, ROOT), "--device", "cpu",
            "--json", result_path], os.path.join(out, "eval", "eval.log"))
        r = json.load(open(result_path))
        records.append({**fields, "name": name, "options": r["option_names"],
                        "computation_percentage": r["computation_percentage"],
                        "bitops_percentage": r["bitops_percentage"], "accuracy": r["accuracy"],
                        "num_test_images": r["num_samples"], "checkpoint": os.path.relpath(path, ROOT),
                        "decision_distribution": r["decision_distribution"],
                        "train_wall_seconds": round(wall.get(os.path.basename(os.path.dirname(run)), 0.0))})
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown_table(records) + "\n")
    draw(records, out)
    return records


def draw(records, out):
    """The two plots of the round from its records."""
    from core import plots
    plot_methods(records, os.path.join(out, "accuracy_vs_computation.png"))
    dfs = sorted((r for r in records if r["method"].startswith("dfs") and r["seed"] == SEED),
                 key=lambda r: (r["method"], r["target"]))
    plots.plot_decisions([dict(r, arch=f"{r['method']} target {r['target']} %", option_names=r["options"])
                          for r in dfs], os.path.join(out, "decision_distribution.png"))


def markdown_table(records):
    """The README's results table, from the records."""
    rows = ["| method | options | seed | target % | computation % | whole-network BitOPs % | top-1 % | checkpoint |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in records:
        target = "-" if r["target"] is None else r["target"]
        rows.append(f"| {r['method']} | {', '.join(r['options'])} | {r['seed']} | {target} | "
                    f"{r['computation_percentage']:.2f} | {r['bitops_percentage']:.2f} | {r['accuracy']:.2f} | "
                    f"[{os.path.basename(r['checkpoint'])}]({os.path.relpath(r['checkpoint'], 'results/fashion-mnist')}) |")
    return "\n".join(rows)


def plot_methods(records, path):
    """Accuracy against computation percentage: one marker per run (filled: seed 0, open: seed 1),
    never a line across runs; a second panel zooms on the runs within a point of the backbone."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"dfs": ("o", "tab:blue", "DFS (skip, 8, 16, full)"), "skipnet": ("s", "tab:orange", "SkipNet-style (skip, full)"),
              "dfs-released": ("D", "tab:green", "DFS, released options (7)"), "static-8": ("^", "tab:red", "static 8-bit"),
              "static-16": ("v", "tab:purple", "static 16-bit"), "backbone": ("*", "black", "full-precision backbone")}
    best = max(r["accuracy"] for r in records)
    for ax, zoom in zip(axes, (False, True)):
        for method, (marker, colour, label) in styles.items():
            for seed in (0, 1):
                rs = [r for r in records if r["method"] == method and r["seed"] == seed and (not zoom or r["accuracy"] > best - 1)]
                if rs:
                    ax.scatter([r["computation_percentage"] for r in rs], [r["accuracy"] for r in rs], marker=marker,
                               s=80 if method == "backbone" else 36, label=f"{label}, seed {seed}",
                               facecolors=colour if seed == 0 else "none", edgecolors=colour)
        ax.set(xlabel="computation percentage (%)", ylabel="top-1 test accuracy (%)",
               title="zoom: within 1 point of the best" if zoom else "ResNet-20, Fashion-MNIST, round 1")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "study"))
    p.add_argument("--out", default=os.path.join(ROOT, "results", "fashion-mnist"))
    p.add_argument("--plot-only", action="store_true", help="redraw the plots from OUT/results.json")
    args = p.parse_args()
    if args.plot_only:
        draw(json.load(open(os.path.join(args.out, "results.json"))), args.out)
        return
    t = time.time()
    done, wall = train_all(args.runs)
    records = release_and_evaluate(done, wall, args.out)
    for r in records:
        print(f"{r['name']:<22} cp {r['computation_percentage']:6.2f}  acc {r['accuracy']:.2f}")
    print(f"study finished in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
