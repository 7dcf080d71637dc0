"""Evaluate checkpoints: top-1 accuracy, computation percentage, per-block decisions (docs/spec.md §6).

    python eval.py save_checkpoints/DFS/cifar10_rnn_gate_38/model_best.pth.tar --dataset cifar10
    python eval.py run50/model_best.pth.tar run40/model_best.pth.tar --json results.json --plot-dir plots

Architecture and options are read from each checkpoint. Under `torchrun --nproc_per_node N`
the test set is shared out over the processes and the counts added up: the same figures. With several checkpoints it also
prints the accuracy-vs-computation table and writes two PNGs: accuracy against computation
percentage, and each checkpoint's decision distribution per block (as the paper's figures). The
table and the first plot give each top-1 its 95 % Wilson score interval on the number of test images.
"""
import json
import os
import sys
import time

import torch

import data
from core import cli, distributed, int8
from core.correct_bits import pack_bits
from core.errors import CheckpointError, DFSError, UserError, value_error
from core.evaluation import (ESTIMATORS, counterfactuals, evaluate, format_counterfactuals, format_report, load_model,
                             recalibrate_bn)
from core.intervals import accuracy_interval
from core.plots import plot
from core.policy_cost import UNITS, knapsack, option_units
from core.provenance import cpu
from core.settings import read_policy
from models import build_model
from models.cost import option_costs


def evaluate_checkpoint(path, args):
    """The JSON record of one checkpoint on args.dataset (default: the dataset it was trained on)."""
    model, ckpt = load_model(path, args.device)
    if args.int8:
        try:
            int8.enable(model, fused=args.int8_fused)
        except int8.InexactKernel as e:  # a CPU whose int8 kernel saturates along both paths
            raise UserError(str(e))
        except ValueError as e:  # e.g. a checkpoint trained with dithered rounding
            raise UserError(f"{path}: {e}")
        if distributed.is_main():
            print(f"--int8: {int8.describe(int8.path_of(model))}")
    trained_on = (ckpt.get("args") or {}).get("dataset")
    dataset = args.dataset or trained_on or "cifar10"
    if trained_on and dataset != trained_on and distributed.is_main():
        print(f"warning: {path} was trained on {trained_on}, not {dataset}: its figures here are on images of "
              f"another data set (leave out --dataset to test it on its own)", file=sys.stderr)
    if data.NUM_CLASSES.get(dataset, ckpt["num_classes"]) != ckpt["num_classes"]:
        raise CheckpointError(f"{path} has {ckpt['num_classes']} classes, {dataset} has {data.NUM_CLASSES[dataset]}")
    batches = data.test_batches(dataset, args.data_dir, args.batch_size, download=args.download,
                                device=args.device, rank=distributed.rank(), world_size=distributed.world_size())
    if args.route_marked is not None:
        apply_routes(model, path, dataset, args)
    per_image = args.per_image or args.controls or bool(args.recalibrate)
    stats = evaluate(model, progress(batches, path), per_image=per_image, marked=dataset in data.MARKED)
    low, high = accuracy_interval(stats["acc"], stats["num_samples"])
    if distributed.is_main():
        print(f"== {path} ({ckpt['arch']}, {dataset})\n{format_report(stats, getattr(model, 'option_names', None))}\n"
              f"95 % interval of the top-1 (Wilson score on the {stats['num_samples']} test images): "
              f"[{low:.2f}, {high:.2f}] %")
    record = {"accuracy": stats["acc"], "interval_95": [round(low, 4), round(high, 4)],
              "computation_percentage": stats.get("computation_percentage", 100.0),
            "option_names": getattr(model, "option_names", ["full"]),
            "decision_distribution": stats.get("decision_distribution"),
            "bitops_percentage": stats.get("bitops_percentage", 100.0),
            "num_samples": stats["num_samples"], "checkpoint": path, "arch": ckpt["arch"],
            "dataset": dataset, "stage": ckpt["stage"], "step": ckpt["step"]}
    if args.int8:
        record["int8"] = int8.steps_of(model)
        if record["int8"] != ("fused" if args.int8_fused else "eager") and distributed.is_main():
            print(f"--int8: torch.compile's fused steps disagreed with the eager ones on this CPU, "
                  f"so the eager steps ran (core/int8.py, Int8Conv._steps)")
        record["int8_path"] = int8.path_of(model)
        record["cpu"] = cpu()
    if getattr(model, "policy", None) is not None:
        record["policy"] = model.policy_names()
    if getattr(model, "routes", None) is not None:
        record["routes"] = model.route_names()
    if "routing" in stats:
        record["routing"] = stats["routing"]
    if args.time and hasattr(model, "options"):
        from core.timing import time_against_plain
        x, _ = next(iter(batches))
        record["timing"] = time_against_plain(model, plain_resnet(model), x, torch.device(args.device),
                                              args.time_repeats)
        t = record["timing"]
        print("measured eval time vs the plain ResNet with the same weights: " + ", ".join(
            f"batch {k.split('_')[1]} {v['time_percentage']:.1f} % ({v['gated_ms']:.2f} vs {v['plain_ms']:.2f} ms; "
            f"{v['time_percentage_vs_channels_last']:.1f} % of its channels_last time)"
            for k, v in t.items() if k.startswith("batch_")) + f"; {t['hardware']['threads']} threads, {t['hardware']['device']}")
    if args.counterfactual and hasattr(model, "options"):
        record["counterfactual"] = counterfactuals(model, batches, marked=dataset in data.MARKED)
        if distributed.is_main():
            print(format_counterfactuals(record["counterfactual"]))
    if per_image:
        record["correct_bits"] = pack_bits(stats["correct"])
    if args.recalibrate:
        record["recalibrated"] = recalibrated_record(model, ckpt, dataset, batches, args)
    if args.controls:
        if "choices" not in stats or model.policy is not None:
            raise UserError(f"--controls needs a gated network; {path} has no gate to control")
        record["control_seed"] = args.control_seed
        record["controls"] = {name: control_record(model, batches, force, name, stats["computation_percentage"])
                              for name, force in controls(stats["choices"], args.control_seed, model).items()}
    return record


def progress(batches, path):
    """`batches`, with a progress bar on a terminal, else a line on stderr at every tenth of them (process 0)."""
    if not distributed.is_main():
        return batches
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(batches, total=len(batches), desc=os.path.basename(path), leave=False, unit="batch")
    return progress_lines(batches, os.path.basename(path))


def progress_lines(batches, name, parts=10):
    """Yield `batches`, printing "NAME: i/n batches, s s" after each `parts`-th of them (for a log or a pipe)."""
    total, start = len(batches), time.perf_counter()
    every = max(1, -(-total // parts))
    for i, batch in enumerate(batches, 1):
        yield batch
        if i % every == 0 or i == total:
            print(f"{name}: {i}/{total} batches, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def apply_routes(model, path, dataset, args):
    """--route-marked/--route-unmarked: evaluate a gated checkpoint under a fixed per-input routing."""
    if not hasattr(model, "options"):
        raise UserError(f"--route-marked: {path} is a plain ResNet; a routing needs a gated network")
    if dataset not in data.MARKED:
        raise UserError(f"--route-marked/--route-unmarked route by the frame of {' or '.join(data.MARKED)}, not {dataset}")
    try:
        model.routes = model.parse_routes({"marked": read_policy(args.route_marked),
                                           "unmarked": read_policy(args.route_unmarked)}).to(model.option_costs.device)
    except ValueError as e:
        raise UserError(f"{path}: {e}")


def plain_resnet(model):
    """The plain ResNet with a gated model's weights: the gate removed, every block at full precision."""
    plain = build_model(f"resnet{6 * (len(model.blocks) // 3) + 2}", model.num_classes)
    own = model.state_dict()
    plain.load_state_dict({k: own[k] for k in plain.state_dict()})
    return plain


def recalibrated_record(model, ckpt, dataset, batches, args):
    """The checkpoint evaluated again after `recalibrate_bn` on --recalibrate training batches (of its
    own training split and seed) under its own decisions; the model is restored afterwards."""
    saved = ckpt.get("args") or {}
    train, _, _ = data.build_batches(dataset, args.data_dir, args.batch_size, val_size=saved.get("val_size", 0),
                                     download=args.download, seed=saved.get("seed", 0), device=args.device)
    stream = data.infinite(train)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrate_bn(model, [next(stream) for _ in range(args.recalibrate)], args.recalibrate_estimator)
    stats = evaluate(model, batches, per_image=True)
    model.load_state_dict(state)
    print(f"-- BN recalibrated under its own decisions ({args.recalibrate} training batches, "
          f"{args.recalibrate_estimator} estimator): "
          f"top-1 {stats['acc']:.2f} %, computation {stats.get('computation_percentage', 100.0):.2f} %")
    return {"accuracy": stats["acc"], "computation_percentage": stats.get("computation_percentage", 100.0),
            "decision_distribution": stats.get("decision_distribution"), "batches": args.recalibrate,
            "estimator": args.recalibrate_estimator,
            "correct_bits": pack_bits(stats["correct"]), "num_samples": stats["num_samples"]}


def controls(choices, seed, model=None):
    """Decisions without the input dependence, from the gate's own [N, G] choices.

    shuffled: each block's decisions permuted across the images (its own seeded permutation),
    so every block keeps its option counts and the computation percentage is exactly the same;
    this also breaks the coordination between an image's blocks.
    row_shuffled: each image takes another image's whole decision vector (one seeded permutation of
    the images): the same per-block counts and cost, the blocks' coordination kept.
    majority: every image takes each block's most frequent option (ties: the cheaper, earlier one);
    its cost differs from the gate's.
    matched_majority (`model` given, the paper's costs): the static policy that agrees with the most
    of the gate's decisions among those costing at most the gate's computation percentage and at
    least that minus `matched_window` (absent where none exists).
    """
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([col[torch.randperm(len(col), generator=g)] for col in choices.T], 1)
    rows = choices[torch.randperm(len(choices), generator=g)]
    num_options = len(model.options) if model is not None else int(choices.max()) + 1
    counts = torch.stack([torch.bincount(col, minlength=num_options) for col in choices.T])
    majority = counts.argmax(1)
    out = {"shuffled": shuffled, "row_shuffled": rows, "majority": majority.expand_as(choices).contiguous()}
    if model is not None and model.option_costs.dim() == 1 and torch.equal(model.option_costs,
                                                                           option_costs(model.options)):
        policy = matched_majority(counts, option_units(model.options), len(choices))
        if policy is not None:
            out["matched_majority"] = torch.tensor(policy).expand_as(choices).contiguous()
    return out


def matched_window(units, num_blocks):
    """The cost window of matched_majority, in units: one step between two options' costs, and at
    least 0.1 % of the network."""
    steps = [abs(a - b) for a in units for b in units if a != b]
    return max(min(steps), round(UNITS * num_blocks / 1000))


def matched_majority(counts, units, num_images):
    """The policy of most agreeing decisions whose cost lies in the window below the gate's ([G, O] counts)."""
    num_blocks = counts.shape[0]
    units_used = sum(int(counts[b, k]) * units[k] for b in range(num_blocks) for k in range(len(units)))
    hi = units_used // num_images  # the gate's cost, rounded down to whole units
    lo = hi - matched_window(units, num_blocks)
    drops = [[-int(c) for c in row[:len(units)]] for row in counts.tolist()]
    found = knapsack(drops, units, lo, hi)
    if not found:
        return None
    return min((entries[0][0], -total, entries[0][1]) for total, entries in found.items())[2]


def control_record(model, batches, force, name, gate_cp):
    """Evaluate with forced per-image decisions; the record of one control (cost_difference: its
    computation percentage minus the gate's)."""
    stats = evaluate(model, batches, force=force, per_image=True)
    print(f"-- control {name}: top-1 {stats['acc']:.2f} %, computation {stats['computation_percentage']:.2f} % "
          f"({stats['computation_percentage'] - gate_cp:+.3f} against the gate's)")
    record = {"accuracy": stats["acc"], "computation_percentage": stats["computation_percentage"],
              "cost_difference": stats["computation_percentage"] - gate_cp,
              "bitops_percentage": stats["bitops_percentage"], "decision_distribution": stats["decision_distribution"],
              "correct_bits": pack_bits(stats["correct"]), "num_samples": stats["num_samples"]}
    if "majority" in name:
        record["policy"] = [model.option_names[k] for k in force[0].tolist()]
    return record


def table(records):
    """Accuracy-vs-computation table, sorted by computation percentage (with measured time if --time),
    each top-1 with its 95 % Wilson score interval on the number of test images."""
    timed = any("timing" in r for r in records)
    rows = ["| computation % |" + (" measured time %, eval batch / batch 1 |" if timed else "") +
            " top-1 % | 95 % interval (Wilson score on the test images) | test images | arch | checkpoint |",
            "|---:|" + ("---:|" if timed else "") + "---:|---:|---:|---|---|"]
    for r in sorted(records, key=lambda r: r["computation_percentage"]):
        t = r.get("timing")
        measured = (" / ".join(f"{v['time_percentage']:.1f}" for k, v in t.items() if k.startswith("batch_")) + " |"
                    if t else " - |") if timed else ""
        low, high = accuracy_interval(r["accuracy"], r["num_samples"])
        rows.append(f"| {r['computation_percentage']:.2f} |{measured} {r['accuracy']:.2f} | [{low:.2f}, {high:.2f}] | "
                    f"{r['num_samples']} | {r['arch']} | {r['checkpoint']} |")
    return "\n".join(rows)


def main(argv=None):
    """Command-line entry point; returns the exit status."""
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint files (.pth or .pth.tar; a run's or a released one)")
    p.add_argument("--dataset", choices=data.DATASETS, help="the test set (default: the one the checkpoint was "
                                                            "trained on)")
    p.add_argument("--data-dir", default="data", help="where the data set is (or is downloaded to)")
    p.add_argument("--download", action="store_true", help="let torchvision download the data set")
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size (the figures do not depend on it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--json", help="write the results here (a list when several checkpoints)")
    p.add_argument("--plot-dir", help="write the PNG plots here (with several checkpoints, default eval_plots)")
    p.add_argument("--per-image", action="store_true",
                   help="store which images each model got right (for study/significance.py), one process")
    p.add_argument("--controls", action="store_true",
                   help="also evaluate the gate's decisions shuffled across images per block (shuffled) and as "
                        "whole rows (row_shuffled), each block's majority option for every image (majority), and "
                        "the static policy closest to the gate's decisions at its cost (matched_majority); "
                        "implies --per-image")
    p.add_argument("--control-seed", type=int, default=0, help="seed of the shuffled control")
    p.add_argument("--recalibrate", type=int, default=0, metavar="N",
                   help="also evaluate after re-estimating BN statistics on N training batches under the "
                        "model's own decisions (a diagnostic; implies --per-image)")
    p.add_argument("--recalibrate-estimator", choices=ESTIMATORS, default="pooled",
                   help="pooled: each BN's mean and variance over every image routed through it in the N "
                        "batches, each image weighted the same; call: each call's batch statistics averaged "
                        "with equal weight, however few images it saw (round 2's posthoc figures)")
    p.add_argument("--route-marked", metavar="POLICY",
                   help="with --route-unmarked, on a fashion-mnist-marked* data set: run framed images through this "
                        "fixed policy (syntax of train_dfs.py --policy) and the others through --route-unmarked's, "
                        "instead of the gate (an oracle routing)")
    p.add_argument("--route-unmarked", metavar="POLICY", help="see --route-marked")
    p.add_argument("--time", action="store_true",
                   help="also measure eval time with the gate's decisions on the first test batch against the "
                        "plain ResNet with the same weights (NCHW and channels_last), at that batch size and at 1 "
                        "(round-robin medians)")
    p.add_argument("--time-repeats", type=int, default=5, help="--time: timed repetitions per configuration")
    p.add_argument("--counterfactual", action="store_true",
                   help="a gated network: per block (and per half of a marked data set) the mean change of each "
                        "image's cross entropy and top-1 when that block alone is forced to each option, the others "
                        "as the gate decided (G x O extra passes over the test set; one process)")
    p.add_argument("--int8", action="store_true",
                   help="run the 8-bit option through oneDNN's int8 convolution (CPU; core/int8.py): the same codes, "
                        "results equal to the fake-quantized ones up to fp32 rounding (a departure, off by default)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        value_error(p, "--batch-size must be positive")
    if (args.route_marked is None) != (args.route_unmarked is None):
        value_error(p, "--route-marked and --route-unmarked go together: one policy for each half")
    if args.int8 and int8.unavailable(args.device):
        value_error(p, int8.unavailable(args.device))
    if distributed.unusable(args.device):  # e.g. --device cuda without a GPU: one line, exit 2
        value_error(p, distributed.unusable(args.device))
    args.int8_fused = args.int8 and int8.can_compile()
    if args.int8 and not args.int8_fused:
        print("--int8: no C++ compiler for torch.compile, so its elementwise steps run unfused (slower)")
    args.plot_dir = args.plot_dir or ("eval_plots" if len(args.checkpoints) > 1 else None)
    fallback = None if any(a == "--device" or a.startswith("--device=") for a in argv or sys.argv[1:]) \
        else distributed.cpu_fallback_warning(args.device)
    if fallback:
        print(fallback, file=sys.stderr)
    prepare_outputs(p, args)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with distributed.session():
        try:
            args.device = distributed.init(args.device)  # this process's own GPU under torchrun
        except ValueError as e:
            value_error(p, str(e))
        try:
            records = [evaluate_checkpoint(path, args) for path in args.checkpoints]
        except DFSError as e:  # CheckpointError, DatasetError, UserError
            print(f"error: {distributed.error_prefix()}{e}", file=sys.stderr)
            return e.status
        if not distributed.is_main():  # process 0 alone prints the table and writes
            return 0
    if len(records) > 1:
        print("\n" + table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records[0] if len(records) == 1 else records, f, indent=2)
    if args.json:
        print(f"wrote {args.json}")
    if args.plot_dir:
        plot(records, args.plot_dir)
        print(f"wrote the plots to {args.plot_dir}/")
    return 0


def prepare_outputs(p, args):
    """Create the folders of --json and --plot-dir before a long evaluation; usage error if they cannot be."""
    if args.json and os.path.isdir(args.json):
        value_error(p, f"--json {args.json} is a folder, not a file name")
    for flag, folder in (("--json", os.path.dirname(args.json or "")), ("--plot-dir", args.plot_dir)):
        try:
            os.makedirs(folder or ".", exist_ok=True)
        except OSError as e:
            value_error(p, f"{flag}: cannot create the folder {folder}: {e.strerror or e}")


if __name__ == "__main__":
    sys.exit(main())
