"""The training engine shared by the three DFS stages (spec/dfs.md §5-§6).

A stage script states only what differs: where its weights come from, what trains, the
loss and the schedule (a `Stage`); `main(stage)` does the rest: arguments, data, model,
resume, the iteration loop, evaluation, checkpoints and logs.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import data
import distributed
import runfolder
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models import build_model, is_gated, parse_options, resolve_name
from models.cost import cost_penalty


class UserError(Exception):
    """A problem with the user's input, reported in one line with exit status 2."""


@dataclasses.dataclass
class Stage:
    """What makes a training stage: its name, defaults, parent stage, trainable params and loss."""
    name: str  # "base" | "gate_init" | "dfs", stored in every checkpoint
    gated: bool
    parent: Optional[str]  # the stage whose checkpoint --resume may start this one from
    lr: float
    iters: int
    trainable: Callable  # model -> parameters to optimise
    make_loss: Callable  # args -> loss_fn(logits, decisions, target, model) -> (loss, cp or None)
    target_cp: Optional[float] = None


def global_cross_entropy(logits, target, total=None):
    """Mean cross entropy over the global batch, as this process's share of DDP's gradient average.

    Each of W processes returns W * CE_sum(local) / n_global, so the average of their gradients is
    the gradient of CE_mean over the global batch, even for unequal slices. `total`: n_global if
    known. One process: the plain mean.
    """
    if distributed.world_size() == 1:
        return F.cross_entropy(logits, target)
    if total is None:
        total = distributed.all_sum(logits.new_tensor(float(len(target))))
    return F.cross_entropy(logits, target, reduction="sum") * (distributed.world_size() / total).to(logits.dtype)


def cross_entropy_loss(args):
    """Stage 1: plain cross entropy."""
    return lambda logits, decisions, target, model: (global_cross_entropy(logits, target), None)


def budget_loss(args):
    """Stages 2-3: CE + beta * s * C, s = +1 above the target computation percentage, else -1 (§5).

    All over the global batch: s from its computation percentage, and C = sum of the processes'
    C_local, so each process's share of DDP's gradient average is beta * s * W * C_local.
    """
    def loss_fn(logits, decisions, target, model):
        total, cp = distributed.global_mean(model.computation_percentage(decisions.detach()), len(target))
        sign = torch.where(cp > args.target_cp, 1.0, -1.0)
        penalty = cost_penalty(decisions, model.option_costs) * distributed.world_size()
        return global_cross_entropy(logits, target, total) + args.cost_weight * sign * penalty, cp
    return loss_fn


def build_parser(stage):
    """The authors' command line (`train|test ARCH`, --minimum, --beta, ...) plus our own flags."""
    p = argparse.ArgumentParser(description=f"DFS stage: {stage.name}")
    p.add_argument("cmd", choices=["train", "test"])
    p.add_argument("arch", help="e.g. resnet38, dfs_resnet38, cifar10_resnet_38, cifar10_rnn_gate_38")
    p.add_argument("--dataset", choices=data.DATASETS, help="default: from the arch alias, else cifar10")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--val-size", type=int, default=0,
                   help="hold out this many training images to select model_best (default: test set, as the authors)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=stage.iters)
    p.add_argument("--lr", type=float, default=stage.lr)
    p.add_argument("--lr-steps", type=int, nargs="*", default=[32000, 48000])
    p.add_argument("--step-ratio", type=float, default=0.1)
    p.add_argument("--warm-up", action="store_true", help="lr 0.01 for the first 400 iterations")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--resume", default="", help="checkpoint of this stage (continue) or of the previous one (start)")
    p.add_argument("--save-folder", default="save_checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds a run: delete its checkpoints, log and events")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--print-freq", "--log-interval", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="ignored: data is held and augmented in memory")
    p.add_argument("--tf32", action="store_true", help="allow TF32 (blurs bitwidths above 10; spec §8)")
    p.add_argument("--sync-bn", action="store_true",
                   help="stage 1 under torchrun: batch-norm statistics over the global batch, not per "
                        "process (departs from the authors' DataParallel; CUDA only)")
    if stage.gated:
        p.add_argument("--options", default=None,
                       help="preset (default, paper, skipnet) or list like skip,8,16,full; default: "
                            "the checkpoint's, else 'default'")
        p.add_argument("--target-cp", "--minimum", type=float, default=stage.target_cp,
                       help="target computation percentage in (0, 100]")
        p.add_argument("--cost-weight", "--beta", type=float, default=1e-5)
        p.add_argument("--stochastic-act-rounding", action="store_true",
                       help="the released code's dithered activation rounding (departs from the paper)")
        if stage.name == "dfs":
            p.add_argument("--policy", default=None,
                           help="a static network instead of the gate (a baseline, not the paper's): one option "
                                "per gated block, e.g. 8,8,skip,16,... or a JSON file of option names; "
                                "one name applies to every block")
        p.add_argument("--execution", choices=["dynamic", "mixed"], default="dynamic",
                       help="training forward (same numbers either way): dynamic back-propagates only "
                            "through the options some sample chose (one host sync per block); mixed "
                            "keeps every option in the autograd graph (no sync; may pay on a GPU)")
    return p


def parse_args(stage, argv=None):
    """Parsed and validated arguments (argparse's usage error and exit status 2 otherwise)."""
    p = build_parser(stage)
    args = p.parse_args(argv)
    try:
        validate_args(stage, args)
    except ValueError as e:
        p.error(str(e))
    return args


def given_args(stage, argv=None):
    """Names of the arguments set on the command line, as opposed to left at their defaults."""
    p = build_parser(stage)
    unset = object()  # argparse fills in a default only where the namespace lacks the attribute
    namespace = argparse.Namespace(**dict.fromkeys(vars(p.parse_args(argv)), unset))
    return {name for name, value in vars(p.parse_args(argv, namespace=namespace)).items() if value is not unset}


# What defines a run: continuing it takes these from its checkpoint (an explicitly given value
# that differs is refused). --iters, --eval-every, --print-freq, --device, --data-dir, --download,
# --workers, --execution and --save-folder may change; options are checked against the model's own.
RUN_SETTINGS = {"dataset": "--dataset", "val_size": "--val-size", "batch_size": "--batch-size",
                "seed": "--seed", "lr": "--lr", "lr_steps": "--lr-steps", "step_ratio": "--step-ratio",
                "warm_up": "--warm-up", "momentum": "--momentum", "weight_decay": "--weight-decay",
                "tf32": "--tf32", "target_cp": "--target-cp/--minimum", "cost_weight": "--cost-weight/--beta",
                "stochastic_act_rounding": "--stochastic-act-rounding", "policy": "--policy"}


def keep_run_settings(args, saved, given, where):
    """Continue a run with its own settings: take each from `saved` (its args), refuse a different one."""
    def show(value):
        if isinstance(value, bool):
            return "on" if value else "off"
        return " ".join(map(str, value)) if isinstance(value, list) else str(value)
    for name, flag in RUN_SETTINGS.items():
        if name not in saved or not hasattr(args, name):
            continue
        if name in given and getattr(args, name) != saved[name]:
            raise UserError(f"{flag} {show(getattr(args, name))} differs from the run {where} continues "
                            f"({flag} {show(saved[name])}); leave it out to continue that run")
        setattr(args, name, saved[name])


def validate_args(stage, args):
    """Reject bad values before anything is written; ValueError carries the message."""
    canonical, implied_classes = resolve_name(args.arch)
    if is_gated(canonical) != stage.gated:
        kind = "a gated dfs_resnet / *_rnn_gate_*" if stage.gated else "a plain resnet / *_resnet_*"
        raise ValueError(f"this stage trains {kind} architecture, got {args.arch}")
    if args.dataset is None:
        args.dataset = args.arch.split("_")[0] if implied_classes else "cifar10"
    if implied_classes and data.NUM_CLASSES[args.dataset] != implied_classes:
        raise ValueError(f"{args.arch} has {implied_classes} classes but {args.dataset} has "
                         f"{data.NUM_CLASSES[args.dataset]}")
    for name in ("iters", "batch_size", "eval_every", "print_freq"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.val_size < 0:
        raise ValueError("--val-size must be >= 0")
    for name in ("lr", "momentum", "weight_decay", "step_ratio", "cost_weight"):
        value = getattr(args, name, 0.0)  # cost_weight: gated stages only
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.sync_bn and stage.gated:  # see README, "Several GPUs and machines"
        raise ValueError("--sync-bn is for stage 1: a gated block may run a batch norm with autograd on one "
                         "process and without on another, and SyncBatchNorm's backward needs them all")
    if stage.gated:
        if args.options is not None:
            args.options = list(parse_options(args.options))
        if getattr(args, "policy", None) is not None:
            args.policy = read_policy(args.policy)
        if not 0 < args.target_cp <= 100:
            raise ValueError(f"--target-cp/--minimum must be in (0, 100], got {args.target_cp}")
    try:  # a device this machine has, not just a well-formed name ("cuda" without a GPU)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"--device {args.device} is not usable here: {str(e).strip().splitlines()[0]}")


def read_policy(spec):
    """--policy's option names: a comma list, or a JSON file holding a list (or {"policy": [...]})."""
    if not isinstance(spec, str) or not spec.endswith(".json"):
        return [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    try:
        with open(spec) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--policy {spec}: cannot read a JSON policy ({getattr(e, 'strerror', None) or e})")
    value = value.get("policy") if isinstance(value, dict) else value
    if not isinstance(value, list):
        raise ValueError(f"--policy {spec}: expected a list of option names (or {{\"policy\": [...]}})")
    return [str(v) for v in value]


def seed_everything(seed):
    """Seed Python and torch (all devices)."""
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Random states that affect training (for exact resume)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def split_output(out):
    """(logits, decisions or None) from a plain or a gated model's output."""
    return out if isinstance(out, tuple) else (out, None)


@torch.no_grad()
def evaluate(model, batches, force=None, per_image=False):
    """Top-1 accuracy, loss, computation percentage and per-block decision distribution.

    With several processes each evaluates its share of `batches` and the sums are added up, the
    counts exactly (int64, and float64 for the decision counts), so the figures are one process's.
    force: [N, G] option indices, one row per image of `batches` in order, run instead of the
    gate's choices (one process). per_image: also return `correct` [N] (bool) and, for a gated
    model, `choices` [N, G] (one process).
    """
    if (force is not None or per_image) and distributed.world_size() > 1:
        raise UserError("per-image evaluation (controls, significance) runs in one process")
    was_training = model.training
    model.eval()
    device, gated = next(model.parameters()).device, hasattr(model, "options")
    correct, n = torch.zeros((), dtype=torch.int64, device=device), 0
    loss = torch.zeros((), dtype=torch.float64, device=device)
    if gated:  # [G, O]: how many samples chose each option at each gated block
        usage = torch.zeros(len(model.gate_embeds), len(model.options), dtype=torch.float64, device=device)
    hits, choices = [], []
    for x, y in batches:
        kwargs = {} if force is None else {"force_option": force[n:n + len(y)]}
        logits, decisions = split_output(model(x, **kwargs))
        hit = logits.argmax(1) == y
        correct += hit.sum()
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        n += len(y)
        if gated:
            usage += decisions.sum(0).double()
        if per_image:
            hits.append(hit.cpu())
            choices.append(decisions.argmax(2).cpu() if gated else None)
    if force is not None and n != len(force):
        raise ValueError(f"force has {len(force)} rows for {n} images")
    model.train(was_training)
    correct, n = distributed.all_sum(torch.stack([correct, correct.new_tensor(n)])).tolist()
    stats = {"acc": 100 * correct / n, "loss": float(distributed.all_sum(loss)) / n, "num_samples": n}
    if per_image:
        stats["correct"] = torch.cat(hits)
        if gated:
            stats["choices"] = torch.cat(choices)
    if gated:
        # Every figure is linear in the decisions, so the mean over samples gives them all.
        dist = distributed.all_sum(usage) / n  # per block, the share of samples that chose each option
        mean = dist[None].float()
        figures = model.complexity(mean)
        stats["computation_percentage"] = float(model.computation_percentage(mean))
        stats["bitops_percentage"] = float(figures["bitops_percentage"])
        stats["macs_per_image"] = float(figures["macs"])
        stats["decision_distribution"] = dist.tolist()
    return stats


def learning_rate(args, step):
    """Step schedule: lr x step_ratio at each of --lr-steps; optional 0.01 warm-up for 400 iterations."""
    if args.warm_up and step < 400:
        return 0.01
    return args.lr * args.step_ratio ** sum(step >= s for s in args.lr_steps)


def format_report(stats, option_names=None):
    """A text table: accuracy, computation percentage and the per-block decision distribution."""
    lines = [f"top-1 accuracy {stats['acc']:.2f} %  ({stats['num_samples']} images)"]
    if "decision_distribution" in stats:
        lines.append(f"computation percentage {stats['computation_percentage']:.2f} %  "
                     f"(whole-network BitOPs {stats['bitops_percentage']:.2f} %, "
                     f"executed MACs/image {stats['macs_per_image'] / 1e6:.2f} M)")
        lines.append("block " + "".join(f"{n:>8}" for n in option_names))
        # Paper numbering: block 1 is the ungated first block, gated blocks are 2..3n.
        for i, row in enumerate(stats["decision_distribution"]):
            lines.append(f"{i + 2:>5} " + "".join(f"{100 * v:>7.1f}%" for v in row))
    return "\n".join(lines)


def build_from_checkpoint(stage, args, ckpt):
    """Build the model for this stage and load weights; returns (model, continuing)."""
    options = args.options if stage.gated else None
    policy = getattr(args, "policy", None)
    if ckpt is None:
        try:
            return build_model(args.arch, data.NUM_CLASSES[args.dataset], options,
                               getattr(args, "stochastic_act_rounding", False), policy), False
        except ValueError as e:
            raise UserError(f"--policy: {e}")
    where = args.resume
    canonical = resolve_name(args.arch)[0]
    if ckpt["arch"].replace("dfs_", "") != canonical.replace("dfs_", ""):
        raise UserError(f"{where} holds a {ckpt['arch']}, not a {canonical} backbone")
    if ckpt["num_classes"] != data.NUM_CLASSES[args.dataset]:
        raise UserError(f"{where} has {ckpt['num_classes']} classes, {args.dataset} has "
                        f"{data.NUM_CLASSES[args.dataset]}")
    if stage.gated and ckpt.get("options") is not None:
        saved = tuple(ckpt["options"])
        if options is not None and tuple(options) != saved:
            raise UserError(f"{where} was trained with options {list(saved)}, not {list(options)}")
        options = args.options = list(saved)
    continuing = ckpt["stage"] == stage.name
    testing = args.cmd == "test" and is_gated(ckpt["arch"]) == stage.gated
    if not (continuing or testing or ckpt["stage"] == stage.parent):
        expected = f"a '{stage.parent}' checkpoint to start from or " if stage.parent else ""
        raise UserError(f"{where} is a '{ckpt['stage']}' checkpoint; stage '{stage.name}' takes "
                        f"{expected}a '{stage.name}' checkpoint to continue")
    if continuing or testing:
        policy = ckpt.get("policy")
    elif ckpt.get("policy") is not None:
        raise UserError(f"{where} is a static-policy network (no trained gate); start from a stage-2 checkpoint")
    try:
        model = build_model(args.arch, ckpt["num_classes"], options,
                            getattr(args, "stochastic_act_rounding", False), policy)
    except ValueError as e:
        raise UserError(f"--policy: {e}")
    try:
        if stage.gated and not is_gated(ckpt["arch"]):
            model.load_backbone(ckpt["model"])
        else:
            model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{where} does not fit {args.arch}: {str(e).splitlines()[0][:200]}")
    return model, continuing


class Interrupt:
    """Turns SIGINT/SIGTERM into a flag checked at step boundaries (a second signal acts at once).

    Under torchrun a second signal is only noted: torchrun itself signals every process when one
    fails, and kills those still running after its --shutdown-timeout (30 s by default).
    """

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        self.signum = signum
        if distributed.world_size() == 1:
            for s, h in self.previous.items():
                signal.signal(s, h)

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


class Run:
    """The mutable state of one training run, and how it is saved."""

    def __init__(self, stage, args, model, optimizer, train_batches, folder):
        self.stage, self.args, self.model, self.optimizer = stage, args, model, optimizer
        self.train_batches, self.folder = train_batches, folder
        self.step, self.best_acc = 0, float("-inf")  # the first evaluation always writes model_best
        # `model` is the module itself (state dict, cost model); training steps go through `wrapped`
        # Every trainable parameter gets a gradient in every step: the gated network's sparse backward
        # keeps a block whose samples all skipped in the graph with an exact zero term (as the dense
        # formulation), so DDP need not search the graph for unused parameters.
        self.wrapped = distributed.wrap(model, find_unused_parameters=False)
        self.forward_kwargs = {"execution": args.execution} if stage.gated else {}

    def checkpoint(self):
        """Everything needed to continue exactly, as tensors and plain data (every process calls it)."""
        model = self.model
        return {"model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "best_acc": self.best_acc, "stage": self.stage.name,
                "arch": resolve_name(self.args.arch)[0], "num_classes": model.num_classes,
                "options": list(model.options) if self.stage.gated else None,
                "policy": model.policy_names() if self.stage.gated else None,
                "args": vars(self.args), "data_state": self.train_batches.state_dict(),
                "rng": rng_state(), "world_size": distributed.world_size(),
                **({"rng_by_rank": distributed.all_gather(rng_state())} if distributed.world_size() > 1 else {})}

    def restore(self, ckpt):
        """Continue a run of this stage from its checkpoint; UserError if it cannot be done exactly."""
        where = self.args.resume
        missing = [k for k in ("optimizer", "best_acc", "data_state", "rng") if k not in ckpt]
        if missing:
            raise UserError(f"{where} lacks {', '.join(missing)}, so it cannot continue a run")
        saved, now = ckpt.get("world_size", 1), distributed.world_size()
        if saved != now:  # batch norm works per process: its batches would change
            raise UserError(f"{where} was trained by {saved} process(es); continue it with {saved}, "
                            f"not {now} (torchrun --nproc_per_node/--nnodes)")
        try:
            self.train_batches.load_state_dict(ckpt["data_state"])
        except ValueError as e:
            raise UserError(f"{where} does not fit this data ({e}): was --batch-size or --val-size changed?")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.best_acc = ckpt["step"], ckpt["best_acc"]
        set_rng_state(ckpt["rng_by_rank"][distributed.rank()] if now > 1 else ckpt["rng"])

    def save(self, best=False):
        """Write model_best when `best`, then checkpoint_latest; WriteError names a file that failed.

        Every process calls it; process 0 writes. model_best goes first: should checkpoint_latest
        then fail, a resume from the previous one evaluates here again and writes the same
        model_best, so the two never disagree.
        """
        ckpt = self.checkpoint()
        if distributed.is_main():
            for name in (["model_best.pth.tar"] if best else []) + ["checkpoint_latest.pth.tar"]:
                path = os.path.join(self.folder, name)
                with runfolder.writing(path):
                    save_checkpoint(ckpt, path)
        distributed.barrier()  # no process goes on (or exits) before the checkpoint is on disk


def log_eval(run, stats, split, writer):
    """Evaluation record: TensorBoard scalars and one JSON line in log.jsonl."""
    record, path = {"step": run.step, "split": split, **stats}, os.path.join(run.folder, "log.jsonl")
    with runfolder.writing(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is None:
        return
    writer.add_scalar(f"{split}/acc", stats["acc"], run.step)
    writer.add_scalar(f"{split}/loss", stats["loss"], run.step)
    if "decision_distribution" in stats:
        writer.add_scalar(f"{split}/computation_percentage", stats["computation_percentage"], run.step)
        usage = torch.tensor(stats["decision_distribution"]).mean(0)
        for name, share in zip(run.model.option_names, usage.tolist()):
            writer.add_scalar(f"{split}/option/{name}", share, run.step)
    writer.flush()  # on disk before the checkpoint that covers it


def train_step(run, loss_fn, x, y):
    """One SGD step; returns (loss, logits, decisions, cp) as tensors (no host sync but the finite check)."""
    logits, decisions = split_output(run.wrapped(x, **run.forward_kwargs))
    loss, cp = loss_fn(logits, decisions, y, run.model)
    if distributed.any_process(~torch.isfinite(loss)):  # stop before the bad step touches the weights
        kept = runfolder.last_checkpoint(run.folder)
        kept = f"the last checkpoint, {kept}, is kept" if kept else "no checkpoint was saved yet"
        raise TrainingError(f"non-finite loss at iteration {run.step + 1}; {kept} (try a lower --lr)")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return loss, logits, decisions, cp


class TrainingError(Exception):
    """Training cannot go on (non-finite loss); exit status 3."""


def log_train(run, loss, logits, decisions, cp, y, lr, seconds, writer, say):
    """The compact per-interval line and its TensorBoard scalars, over the global batch."""
    # One reduction: each process's loss is its share of the global loss (see budget_loss); the
    # rest are sums of correct answers, samples and per-option choices over blocks.
    usage = decisions.detach().sum((0, 1)) if decisions is not None else loss.new_zeros(0)
    totals = distributed.all_sum(torch.cat([(loss.detach() / distributed.world_size()).reshape(1),
                                            (logits.argmax(1) == y).sum().reshape(1).to(loss.dtype),
                                            loss.new_tensor([len(y)]), usage.to(loss.dtype)])).tolist()
    loss, acc, n, usage = totals[0], 100 * totals[1] / totals[2], totals[2], totals[3:]
    line = f"iter {run.step}/{run.args.iters}  loss {loss:.4f}  acc {acc:.1f}  lr {lr:g}"
    if cp is not None:
        line += f"  cp {float(cp):.2f}"
    say(f"{line}  {seconds * 1000:.0f} ms/iter")
    if writer is not None:
        writer.add_scalar("train/loss", loss, run.step)
        writer.add_scalar("train/acc", acc, run.step)
        writer.add_scalar("train/lr", lr, run.step)
        if cp is not None:
            writer.add_scalar("train/computation_percentage", float(cp), run.step)
            for name, count in zip(run.model.option_names, usage):
                writer.add_scalar(f"train/option/{name}", count / (n * decisions.shape[1]), run.step)


def evaluate_and_save(run, eval_batches, split, writer, say):
    """Evaluate, log, write checkpoint_latest (and model_best when better) and report."""
    device = torch.device(run.args.device)
    # Evaluation must not move the training random stream (dithered rounding draws from it in
    # eval too): otherwise where evaluations fall, e.g. a resume's --iters, changes the training.
    distributed.broadcast_buffers(run.model)  # every process evaluates process 0's model
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        stats = evaluate(run.model, eval_batches)
    best = stats["acc"] > run.best_acc
    run.best_acc = max(run.best_acc, stats["acc"])
    if distributed.is_main():
        log_eval(run, stats, split, writer)
    run.save(best)
    say(f"eval iter {run.step}: {split} acc {stats['acc']:.2f}"
        + (f"  cp {stats['computation_percentage']:.2f}" if "decision_distribution" in stats else "")
        + f"  (best {run.best_acc:.2f})")


def train(run, loss_fn, eval_batches, split, writer=None):
    """The iteration loop: step, log, evaluate and checkpoint; returns the exit status."""
    from tqdm import tqdm
    args = run.args
    stream = data.infinite(run.train_batches)
    main_process = distributed.is_main()  # the only process that prints
    bar = tqdm(total=args.iters, initial=run.step, disable=not (main_process and sys.stderr.isatty()), leave=False)
    say = (bar.write if not bar.disable else print) if main_process else (lambda line: None)
    tick = time.time()
    with Interrupt() as stop:
        while run.step < args.iters:
            lr = learning_rate(args, run.step)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            x, y = next(stream)
            loss, logits, decisions, cp = train_step(run, loss_fn, x, y)
            run.step += 1
            bar.update(1)
            if run.step % args.print_freq == 0:
                log_train(run, loss, logits, decisions, cp, y, lr,
                          (time.time() - tick) / args.print_freq, writer, say)
                tick = time.time()
            if run.step % args.eval_every == 0 or run.step == args.iters:
                evaluate_and_save(run, eval_batches, split, writer, say)
            signum = distributed.agreed_signal(stop.signum)  # the same step on every process
            if signum is not None:
                run.save()
                bar.close()
                if main_process:
                    print(f"interrupted at iteration {run.step}; saved {run.folder}/checkpoint_latest.pth.tar. "
                          f"Continue with the same command plus --resume {run.folder}/checkpoint_latest.pth.tar",
                          file=sys.stderr)
                return 128 + signum
    bar.close()
    return 0


def report_test(model, args, share):
    """`test ARCH --resume CKPT`: the test-set report, printed by process 0; returns 0."""
    stats = evaluate(model, data.test_batches(args.dataset, args.data_dir, args.batch_size,
                                              download=args.download, **share))
    if distributed.is_main():
        print(format_report(stats, getattr(model, "option_names", None)))
    return 0


def run_stage(stage, args, given=frozenset()):
    """Everything after argument parsing; raises UserError-like exceptions for bad input.

    `given`: the arguments set on the command line; a continued run takes the others from its checkpoint.
    """
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if args.cmd == "train" and ckpt is not None and ckpt["stage"] == stage.name:
        keep_run_settings(args, ckpt.get("args") or {}, given, args.resume)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    try:
        device = distributed.init(args.device)  # this process's own GPU under torchrun
    except ValueError as e:
        raise UserError(str(e))
    seed_everything(args.seed)
    model, continuing = build_from_checkpoint(stage, args, ckpt)
    model.to(device)
    main_process = distributed.is_main()  # the only process that writes and prints
    share = dict(device=device, rank=distributed.rank(), world_size=distributed.world_size())
    if args.cmd == "test":
        if ckpt is None:
            raise UserError("test needs --resume CHECKPOINT")
        return report_test(model, args, share)
    try:
        train_batches, eval_batches, _ = data.build_batches(
            args.dataset, args.data_dir, args.batch_size, val_size=args.val_size,
            download=args.download, seed=args.seed, **share)
        model = distributed.sync_batch_norm(model) if args.sync_bn else model
    except ValueError as e:
        raise UserError(str(e))
    trainable = list(stage.trainable(model))
    if stage.gated:  # a static policy runs neither the gate nor its skipped blocks
        unused = {id(p) for p in model.unused_parameters()}
        trainable = [p for p in trainable if id(p) not in unused]
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    run = Run(stage, args, model, optimizer, train_batches, os.path.join(args.save_folder, args.arch))
    if continuing:
        run.restore(ckpt)
        if run.step >= args.iters:
            if main_process:
                runfolder.refuse_if_in_use(run.folder)  # reads the lock; writes nothing
                print(f"{args.resume} already finished {run.step} of --iters {args.iters} iterations; nothing to do")
            return 0
    split = "val" if args.val_size else "test"
    if not main_process:  # only process 0 holds the folder, writes and prints
        return train(run, stage.make_loss(args), eval_batches, split, None)
    with runfolder.claim(run.folder, resume=args.resume if continuing else None, step=run.step,
                         overwrite=args.overwrite) as folder:
        folder.write_text("args.json", json.dumps(vars(args), indent=2))
        where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
        if distributed.world_size() > 1:
            where += f" x {distributed.world_size()} processes"
        print(f"stage {stage.name}: {args.arch} on {args.dataset}, {where}, torch {torch.__version__}, "
              f"seed {args.seed}, iterations {run.step}..{args.iters}, saving to {run.folder}")
        # a resumed run's earlier events past its checkpoint are hidden (TensorBoard drops step >= purge_step)
        writer = folder.summary_writer(purge_step=run.step + 1 if continuing else None)
        return train(run, stage.make_loss(args), eval_batches, split, writer)


def main(stage, argv=None):
    """Command-line entry point of a stage script; returns the exit status."""
    args = parse_args(stage, argv)
    with distributed.session():
        try:
            return run_stage(stage, args, given_args(stage, argv))
        except (UserError, CheckpointError, data.DatasetError, runfolder.FolderError) as e:
            # every process says it: under torchrun a file or a GPU may be missing on one machine only
            print(f"error: {distributed.error_prefix()}{e}", file=sys.stderr)
            return 2
        except TrainingError as e:
            if distributed.is_main():  # every process stops here together
                print(f"error: {e}", file=sys.stderr)
            return 3
        except runfolder.WriteError as e:
            print(f"error: {e}", file=sys.stderr)
            return 4
