"""Plots: accuracy against computation (each point's 95 % Wilson interval on the test images as a
bar), per-block decisions (a fixed colour per option name in every panel), and a run's training
curves (computation percentage against its target, option shares per block).

    python -m core.plots SAVE_FOLDER/ARCH     # writes SAVE_FOLDER/ARCH/training.png from its train.jsonl
    python core/plots.py SAVE_FOLDER/ARCH     # the same
"""
import json
import os
import sys

import torch

if __name__ == "__main__":  # run as `python core/plots.py`: the packages are at the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core import runfolder  # noqa: E402
from core.intervals import accuracy_interval  # noqa: E402


def run_label(record):
    """A short name for a checkpoint: its run folder (SAVE/ARCH/file -> SAVE), else the file name."""
    path = os.path.normpath(record.get("checkpoint") or "")
    parts = path.split(os.sep)
    return parts[-3] if len(parts) >= 3 and parts[-1].endswith(".pth.tar") else os.path.basename(path)


def plot(records, folder):
    """accuracy_vs_computation.png and decision_distribution.png in `folder`."""
    os.makedirs(folder, exist_ok=True)
    plot_accuracy(records, os.path.join(folder, "accuracy_vs_computation.png"))
    plot_decisions([r for r in records if r["decision_distribution"]],
                   os.path.join(folder, "decision_distribution.png"))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


MIN_SPAN_INTERVALS = 4  # the accuracy axis spans at least this many of the widest interval


def accuracy_bounds(record):
    """(low, high) top-1 %: the record's 95 % Wilson interval on its test images, or (accuracy,
    accuracy) for a record without the number of images."""
    n = record.get("num_samples") or record.get("num_test_images")
    return accuracy_interval(record["accuracy"], n) if n else (record["accuracy"],) * 2


def accuracy_ylim(bounds, margin=0.08):
    """(bottom, top) of an accuracy axis showing every (low, high) in `bounds`, at least
    MIN_SPAN_INTERVALS times the widest interval tall (so that a gap smaller than the intervals never
    fills the plot like a cliff), within [0, 100] where it fits; None without intervals."""
    lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
    widest = max(b[1] - b[0] for b in bounds)
    if widest <= 0:
        return None
    span = max(hi - lo, MIN_SPAN_INTERVALS * widest)
    span += 2 * margin * span
    bottom = (lo + hi - span) / 2
    bottom = max(0.0, min(bottom, 100.0 - span)) if span <= 100 else bottom
    return bottom, bottom + span


def plot_accuracy(records, path):
    """Top-1 accuracy against computation percentage: a point per checkpoint with its 95 % Wilson
    interval on the test images as a bar, labelled with its run folder; a line joins only checkpoints
    with the same option set (a set's accuracy-cost curve). The full-precision network (option set
    "full"), where present, is also a dashed line across; the y range holds every bar (see
    `accuracy_ylim`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    by_options, bounds = {}, []
    for r in records:
        by_options.setdefault(tuple(r.get("option_names") or ["full"]), []).append(r)
    for options, rs in by_options.items():
        rs = sorted(rs, key=lambda r: r["computation_percentage"])
        x, y = [r["computation_percentage"] for r in rs], [r["accuracy"] for r in rs]
        ci = [accuracy_bounds(r) for r in rs]
        reference = options == ("full",)
        line = ax.errorbar(x, y, yerr=[[a - b[0] for a, b in zip(y, ci)], [b[1] - a for a, b in zip(y, ci)]],
                           fmt="o-" if len(rs) > 1 else "o", capsize=3, elinewidth=1,
                           label="full (reference, dashed)" if reference else
                           ", ".join(o.replace("-bit", "") for o in options))
        if reference:
            for a in y:
                ax.axhline(a, color=line[0].get_color(), linestyle="--", linewidth=0.8)
        bounds += ci
        for r in rs:
            ax.annotate(run_label(r), (r["computation_percentage"], r["accuracy"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ylim = accuracy_ylim(bounds)
    if ylim:
        ax.set_ylim(*ylim)
    counts = sorted({n for r in records if (n := r.get("num_samples") or r.get("num_test_images"))})
    images = "the test images" if len(counts) != 1 else f"the {counts[0]:,} test images"
    ax.set(xlabel="computation percentage (%)", ylabel="top-1 accuracy (%)", title="accuracy vs computation")
    ax.legend(fontsize=7, title=f"options; bars: 95 % Wilson score\ninterval on {images}" if counts else "options",
              title_fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def option_colour(name):
    """One fixed colour per option name in every plot: skip light grey, full black, b bits by b."""
    import matplotlib
    if name == "skip":
        return "#c8c8c8"
    if name == "full":
        return "#000000"
    bits = int(name.removesuffix("-bit"))
    return matplotlib.colormaps["viridis_r"](min(bits, 16) / 16 * 0.9)


def plot_decisions(gated, path):
    """Per gated record, the share of images choosing each option in every block (stacked bars)."""
    if not gated:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(len(gated), 1, figsize=(8, 2.2 * len(gated) + 0.6), squeeze=False)
    for ax, r in zip(axes[:, 0], gated):
        dist = torch.tensor(r["decision_distribution"]) * 100  # [blocks, options]
        blocks = range(2, len(dist) + 2)  # paper numbering: block 1 is never gated
        bottom = torch.zeros(len(dist))
        for k, name in enumerate(r["option_names"]):
            ax.bar(blocks, dist[:, k], bottom=bottom, label=name, width=0.8, color=option_colour(name))
            bottom += dist[:, k]
        ax.set(ylabel="% of images", ylim=(0, 100), xticks=list(blocks),
               title=f"{r['arch']}: {r['computation_percentage']:.1f} % computation, {r['accuracy']:.2f} % top-1")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1, 0].set_xlabel("block")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)




def plot_training(folder, path=None):
    """training.png of a gated run: computation percentage per logging interval with the target, and
    each gated block's option shares over iterations (the last batch of each interval). Returns the path."""
    records = []
    with open(os.path.join(folder, runfolder.TRAIN_LOG)) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:  # a line torn by a failed write
                pass
    records = [r for r in records if "block_shares" in r]
    if not records:
        raise ValueError(f"{folder} has no training records of a gated run")
    plt = _pyplot()
    steps = [r["step"] for r in records]
    shares = torch.tensor([r["block_shares"] for r in records])  # [T, G, O]
    names, blocks = records[-1]["option_names"], shares.shape[1]
    cols = min(blocks, 6)
    rows = 1 + -(-blocks // cols)
    fig = plt.figure(figsize=(2.4 * cols, 2.0 * rows + 0.6))
    ax = fig.add_subplot(rows, 1, 1)
    ax.plot(steps, [r["computation_percentage"] for r in records], label="training batch")
    ax.axhline(records[-1]["target"], color="red", linestyle="--", label=f"target {records[-1]['target']:g} %")
    ax.set(xlabel="iteration", ylabel="computation %")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for g in range(blocks):
        bx = fig.add_subplot(rows, cols, cols + g + 1)
        bx.stackplot(steps, *(100 * shares[:, g, k] for k in range(len(names))),
                     colors=[option_colour(n) for n in names], labels=names)
        bx.set(title=f"block {g + 2}", ylim=(0, 100))
        bx.tick_params(labelsize=6)
    bx.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = path or os.path.join(folder, runfolder.PLOT)
    with runfolder.writing(path):
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    folders = argv if argv is not None else sys.argv[1:]
    if not folders:
        print("usage: python -m core.plots SAVE_FOLDER/ARCH [...]", file=sys.stderr)
        return 2
    for folder in folders:
        try:
            print(plot_training(folder))
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {folder}: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
