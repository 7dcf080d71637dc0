"""The training engine shared by the three DFS stages (docs/spec.md §5-§6): the stage driver and its loop.

A stage script states only what differs: where its weights come from, what trains, the
loss and the schedule (a `Stage`); `main(stage)` does the rest: data, model, resume, the
iteration loop, evaluation, checkpoints and logs. Around it: the command line is
`core/settings.py`'s, the losses and budget terms `core/losses.py`'s, building the model from a
checkpoint and continuing a run `core/continuing.py`'s, a record's provenance `core/provenance.py`'s,
evaluation `core/evaluation.py`'s.
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Callable, Optional

import torch

import data
from core import distributed, runfolder
from core.checkpoint import load_checkpoint, save_checkpoint
from core.continuing import (build_from_checkpoint, check_continuable, gate_parameters, own_run, rng_state,
                             seed_everything, set_rng_state)
from core.errors import DFSError, TrainingError, UserError, WriteError
from core.evaluation import evaluate, format_report, split_output
from core.intervals import accuracy_interval
from core.losses import global_cross_entropy
from core.provenance import provenance
from core.settings import continue_run, given_args, gumbel_tau, parse_args
from models import resolve_name


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


def learning_rate(args, step):
    """Step schedule: lr x step_ratio at each of --lr-steps; optional 0.01 warm-up for 400 iterations."""
    if args.warm_up and step < 400:
        return 0.01
    return args.lr * args.step_ratio ** sum(step >= s for s in args.lr_steps)


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

    def __init__(self, stage, args, model, optimizer, train_batches, folder, config=None):
        self.stage, self.args, self.model, self.optimizer = stage, args, model, optimizer
        self.config = config  # the model's constructor arguments, stored in every checkpoint
        self.train_batches, self.folder = train_batches, folder
        self.step, self.best_acc = 0, float("-inf")  # the first evaluation always writes model_best
        # `model` is the module itself (state dict, cost model); training steps go through `wrapped`
        # Every trainable parameter gets a gradient in every step: the gated network's sparse backward
        # keeps a block whose samples all skipped in the graph with an exact zero term (as the dense
        # formulation), so DDP need not search the graph for unused parameters.
        self.wrapped = distributed.wrap(model, find_unused_parameters=False)
        self.forward_kwargs = {"execution": args.execution} if stage.gated else {}
        if getattr(args, "gate_estimator", "argmax") == "reinforce":  # decisions sampled; the loss needs the probabilities
            self.forward_kwargs["return_probs"] = True
            model.gate.sampling = True
        self.distill = None  # --distill-marked/--distill-unmarked: the routing the gate learns, [2, G]
        if getattr(args, "distill_marked", None) is not None:
            self.distill = model.parse_routes({"marked": args.distill_marked, "unmarked": args.distill_unmarked})
            self.forward_kwargs["return_probs"] = True
        self.provenance = provenance()  # the code and torch that trained it, in args.json and every checkpoint

    def checkpoint(self):
        """Everything needed to continue exactly, as tensors and plain data (every process calls it)."""
        model, config = self.model, self.config or {
            "name": resolve_name(self.args.arch)[0], "num_classes": self.model.num_classes,
            "options": list(self.model.options) if self.stage.gated else None,
            "stochastic_act_rounding": getattr(self.args, "stochastic_act_rounding", False),
            "policy": self.model.policy_names() if self.stage.gated else None,
            "costs": getattr(self.args, "costs", None)}
        return {"model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "best_acc": self.best_acc, "stage": self.stage.name,
                "model_config": config,  # and, for older readers, its three keys of format 1:
                "arch": config["name"], "num_classes": model.num_classes, "options": config["options"],
                "args": vars(self.args), "data_state": self.train_batches.state_dict(),
                "rng": rng_state(), "world_size": distributed.world_size(), "provenance": self.provenance,
                **({"rng_by_rank": distributed.all_gather(rng_state())} if distributed.world_size() > 1 else {})}

    def restore(self, ckpt):
        """Continue a run of this stage from its checkpoint; UserError if it cannot be done exactly."""
        where = self.args.resume
        check_continuable(ckpt, where)
        try:
            self.train_batches.load_state_dict(ckpt["data_state"])
        except ValueError as e:
            raise UserError(f"{where} does not fit this data ({e}): was --batch-size or --val-size changed?")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.best_acc = ckpt["step"], ckpt["best_acc"]
        set_rng_state(ckpt["rng_by_rank"][distributed.rank()] if distributed.world_size() > 1 else ckpt["rng"])

    def save(self, best=False):
        """Write model_best when `best`, then checkpoint_latest; WriteError names a file that failed.

        Every process calls it; process 0 writes. model_best goes first: should checkpoint_latest
        then fail, a resume from the previous one evaluates here again and writes the same
        model_best, so the two never disagree.
        """
        ckpt = self.checkpoint()
        if distributed.is_main():
            for name in ([runfolder.BEST] if best else []) + [runfolder.LATEST]:
                path = os.path.join(self.folder, name)
                with runfolder.writing(path):
                    save_checkpoint(ckpt, path)
        distributed.barrier()  # no process goes on (or exits) before the checkpoint is on disk


def log_eval(run, stats, split, writer):
    """Evaluation record: TensorBoard scalars and one JSON line in log.jsonl."""
    runfolder.append_record(run.folder, {"step": run.step, "split": split, **stats})
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
    kwargs = run.forward_kwargs
    if getattr(run, "distill", None) is not None:  # the network runs the routing the gate is taught (teacher forcing)
        kwargs = dict(kwargs, force_option=run.model.routed_choices(x, run.distill.to(x.device)))
    logits, decisions, *probs = split_output(run.wrapped(x, **kwargs))  # probs: reinforce's, distillation's
    loss, cp = loss_fn(logits, decisions, y, run.model, *probs)
    if distributed.any_process(~torch.isfinite(loss)):  # stop before the bad step touches the weights
        kept = runfolder.last_checkpoint(run.folder)
        kept = f"the last checkpoint, {kept}, is kept" if kept else "no checkpoint was saved yet"
        raise TrainingError(f"non-finite loss at iteration {run.step + 1}; {kept} (try a lower --lr)")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return loss, logits, decisions, cp


def log_train(run, loss, logits, decisions, cp, y, lr, seconds, writer, say):
    """The compact per-interval line and its TensorBoard scalars, over the global batch."""
    # One reduction: each process's loss is its share of the global loss (see budget_loss); the
    # rest are sums of correct answers, samples and per-option choices over blocks.
    per_block = decisions.detach().sum(0) if decisions is not None else loss.new_zeros(0, 0)  # [G, O]
    with torch.no_grad():  # the cross-entropy part of the loss, shared out as the loss is
        ce = global_cross_entropy(logits.detach().float(), y)
    totals = distributed.all_sum(torch.cat([(loss.detach() / distributed.world_size()).reshape(1),
                                            (ce / distributed.world_size()).reshape(1).to(loss.dtype),
                                            (logits.argmax(1) == y).sum().reshape(1).to(loss.dtype),
                                            loss.new_tensor([len(y)]), per_block.flatten().to(loss.dtype)])).tolist()
    loss, ce, acc, n = totals[0], totals[1], 100 * totals[2] / totals[3], totals[3]
    per_block = torch.tensor(totals[4:]).view(per_block.shape) / n  # share of the batch per block and option
    usage = (per_block.sum(0) * n).tolist()
    line = f"iter {run.step}/{run.args.iters}  loss {loss:.4f}"
    if cp is not None:  # the loss = cross entropy + the budget term
        line += f" (ce {ce:.4f}, budget {loss - ce:+.4f})"
    line += f"  acc {acc:.1f}  lr {lr:g}"
    if cp is not None:
        line += f"  cp {float(cp):.2f}"
    tau = run.model.gate.gumbel_tau if run.stage.gated else None
    if tau is not None:
        line += f"  tau {tau:.3g}"
    say(f"{line}  {seconds * 1000:.0f} ms/iter")
    if distributed.is_main():
        record = {"step": run.step, "split": "train", "loss": loss, "acc": acc, "lr": lr,
                  "seconds_per_iter": seconds}
        if cp is not None:
            record.update(cross_entropy=ce, budget_term=loss - ce, computation_percentage=float(cp),
                          target=run.args.target_cp, option_names=run.model.option_names,
                          block_shares=per_block.tolist(), **({"gumbel_tau": tau} if tau is not None else {}))
        runfolder.append_record(run.folder, record, runfolder.TRAIN_LOG)
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
        stats = evaluate(run.model, eval_batches, marked=run.args.dataset in data.MARKED)
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
    show = bar.write if not bar.disable else print

    def say(line):  # process 0: the console, and train.log with the time
        if main_process:
            show(line)
            runfolder.append_text(run.folder, f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}")
    tick = time.time()
    with Interrupt() as stop:
        while run.step < args.iters:
            lr = learning_rate(args, run.step)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            x, y = next(stream)
            if getattr(args, "gate_estimator", "argmax") == "gumbel":
                run.model.gate.gumbel_tau = gumbel_tau(args, run.step)
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
                    print(f"interrupted at iteration {run.step}; {continue_with(args.resume, run.folder)}",
                          file=sys.stderr)
                return 128 + signum
    bar.close()
    if main_process and run.stage.gated and os.path.exists(os.path.join(run.folder, runfolder.TRAIN_LOG)):
        try:  # a figure, not a result: its failure must not fail a finished run
            from core import plots
            say(f"training plot: {plots.plot_training(run.folder)}")
        except Exception as e:
            print(f"warning: training plot not written ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                  file=sys.stderr)
    return 0


def continue_with(resumed, folder):
    """The interrupt message's advice: how to continue from the run's checkpoint_latest."""
    latest = os.path.join(folder, runfolder.LATEST)
    if resumed and os.path.abspath(resumed) == os.path.abspath(latest):
        return f"saved {latest}. Continue with the same command"
    if resumed:
        return f"saved {latest}. Continue with the same command, --resume {latest} in place of --resume {resumed}"
    return f"saved {latest}. Continue with the same command plus --resume {latest}"


def report_test(model, args, share):
    """`test ARCH --resume CKPT`: the test-set report, printed by process 0, as eval.py's: the
    checkpoint, the network and the data set, the figures, the 95 % interval of the top-1; returns 0."""
    batches = data.test_batches(args.dataset, args.data_dir, args.batch_size, download=args.download, **share)
    stats = evaluate(model, batches, marked=args.dataset in data.MARKED)
    if distributed.is_main():
        low, high = accuracy_interval(stats["acc"], stats["num_samples"])
        print(f"== {args.resume} ({args.arch}, {args.dataset})\n{format_report(stats, getattr(model, 'option_names', None))}\n"
              f"95 % interval of the top-1 (Wilson score on the {stats['num_samples']} test images): "
              f"[{low:.2f}, {high:.2f}] %")
    return 0


def run_stage(stage, args, given=frozenset()):
    """Everything after argument parsing; raises UserError-like exceptions for bad input.

    `given`: the arguments set on the command line; a continued run takes the others from its checkpoint.
    """
    ckpt = load_checkpoint(args.resume) if args.resume else None
    extending = None  # the run's own --iters, when a larger one given extends it
    if args.cmd == "train" and ckpt is not None and ckpt["stage"] == stage.name:
        args = continue_run(args, ckpt.get("args") or {}, given, args.resume)
        args, extending = own_run(args, ckpt, given)
    if args.cmd == "test" and ckpt is not None and "dataset" not in given:  # as eval.py: the data it was trained on
        args = argparse.Namespace(**{**vars(args), "dataset": (ckpt.get("args") or {}).get("dataset") or args.dataset})
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    fallback = None if "device" in given else distributed.cpu_fallback_warning(args.device)
    if fallback:
        print(fallback, file=sys.stderr)
    try:
        device = distributed.init(args.device)  # this process's own GPU under torchrun
    except ValueError as e:
        raise UserError(str(e))
    seed_everything(args.seed)
    model, config, continuing = build_from_checkpoint(stage, args, ckpt)
    if stage.gated:  # args.json and the checkpoint's args show the options the run has
        args = argparse.Namespace(**{**vars(args), "options": config["options"], "bn": config["bn"]})
    model.to(device)
    main_process = distributed.is_main()  # the only process that writes and prints
    share = dict(device=device, rank=distributed.rank(), world_size=distributed.world_size())
    if args.cmd == "test":
        if ckpt is None:
            raise UserError("test needs --resume CHECKPOINT")
        return report_test(model, args, share)
    if extending is not None and distributed.is_main():
        print(f"extending the run of {args.resume} from {extending} to {args.iters} iterations")
    if continuing and ckpt.get("step", 0) >= args.iters:  # finished: said before data and optimizer are built
        check_continuable(ckpt, args.resume)
        if main_process:
            runfolder.refuse_if_in_use(os.path.join(args.save_folder, args.arch))  # reads the lock; writes nothing
            print(f"{args.resume} already finished {ckpt['step']} of --iters {args.iters} iterations; nothing to do "
                  f"(a larger --iters N continues it to N)")
        return 0
    try:
        train_batches, eval_batches, _ = data.build_batches(
            args.dataset, args.data_dir, args.batch_size, val_size=args.val_size,
            download=args.download, seed=args.seed, **share)
        model = distributed.sync_batch_norm(model) if args.sync_bn else model
    except ValueError as e:
        raise UserError(str(e))
    gate_only = getattr(args, "train", "all") == "gate"
    if gate_only:  # --train gate: the backbone frozen and in eval mode (DFSResNet.train)
        model.gate_only = True
        model.train()
    trainable = gate_parameters(model) if gate_only else list(stage.trainable(model))
    if stage.gated:  # a static policy runs neither the gate nor its skipped blocks
        unused = {id(p) for p in model.unused_parameters()}
        trainable = [p for p in trainable if id(p) not in unused]
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    run = Run(stage, args, model, optimizer, train_batches, os.path.join(args.save_folder, args.arch), config)
    if continuing:
        run.restore(ckpt)
    split, loss_fn = "val" if args.val_size else "test", stage.make_loss(args)
    if not main_process:  # only process 0 holds the folder, writes and prints
        return train(run, loss_fn, eval_batches, split, None)
    with runfolder.claim(run.folder, resume=args.resume if continuing else None, step=run.step,
                         overwrite=args.overwrite) as folder:
        if extending is not None:  # the finished run's settings stay readable beside the extension's
            folder.keep_args(extending)
        folder.write_text(runfolder.ARGS, json.dumps({**vars(args), "provenance": run.provenance}, indent=2))
        where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
        if distributed.world_size() > 1:
            where += f" x {distributed.world_size()} processes"
        line = (f"stage {stage.name}: {args.arch} on {args.dataset}, {where}, torch {torch.__version__}, "
                f"seed {args.seed}, iterations {run.step}..{args.iters}, saving to {run.folder}")
        print(line)
        runfolder.append_text(run.folder, f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}")
        # a resumed run's earlier events past its checkpoint are hidden (TensorBoard drops step >= purge_step)
        writer = folder.summary_writer(purge_step=run.step + 1 if continuing else None)
        return train(run, loss_fn, eval_batches, split, writer)


def main(stage, argv=None):
    """Command-line entry point of a stage script; returns the exit status."""
    args = parse_args(stage, argv)
    with distributed.session():
        try:
            return run_stage(stage, args, given_args(stage, argv))
        except TrainingError as e:
            if distributed.is_main():  # every process stops here together
                print(f"error: {e}", file=sys.stderr)
            return e.status
        except WriteError as e:  # process 0's: the only one that writes
            print(f"error: {e}", file=sys.stderr)
            return e.status
        except DFSError as e:  # UserError, CheckpointError, DatasetError, FolderError
            # every process says it: under torchrun a file or a GPU may be missing on one machine only
            print(f"error: {distributed.error_prefix()}{e}", file=sys.stderr)
            return e.status
