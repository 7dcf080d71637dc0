"""Starting or continuing a run from a checkpoint: the model built and loaded for a stage, the random
state saved and restored for an exact resume, and what a continued run keeps of its own settings.
(What made a record, its provenance, is core/provenance.py's.)
"""
import argparse
import os
import random

import torch

import data
from core import distributed
from core.errors import UserError
from core.evaluation import model_config, model_from_config
from core.settings import routes_of
from models import is_gated, resolve_name


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


def build_from_checkpoint(stage, args, ckpt):
    """Build the model for this stage and load weights; returns (model, its config record, continuing)."""
    config = {"name": resolve_name(args.arch)[0], "num_classes": data.NUM_CLASSES[args.dataset],
              "options": args.options if stage.gated else None,
              "stochastic_act_rounding": getattr(args, "stochastic_act_rounding", False),
              "policy": getattr(args, "policy", None), "costs": getattr(args, "costs", None),
              **({"bn": args.bn} if stage.gated else {}), **({"routes": routes_of(args)} if routes_of(args) else {})}
    continuing, saved_bn = False, None
    if ckpt is not None:
        where, saved = args.resume, model_config(ckpt)
        if saved["name"].replace("dfs_", "") != config["name"].replace("dfs_", ""):
            raise UserError(f"{where} holds a {saved['name']}, not a {config['name']} backbone")
        if saved["num_classes"] != config["num_classes"]:
            raise UserError(f"{where} has {saved['num_classes']} classes, {args.dataset} has {config['num_classes']}")
        if stage.gated and saved["options"] is not None:
            if config["options"] is not None and tuple(config["options"]) != tuple(saved["options"]):
                raise UserError(f"{where} was trained with options {list(saved['options'])}, not {list(config['options'])}")
            config["options"] = list(saved["options"])
            saved_bn = saved.get("bn") or "shared"
            if config["bn"] is None:
                config["bn"] = saved_bn
            elif saved_bn == "per-option" != config["bn"] and config["policy"] is None:
                raise UserError(f"{where} has per-option batch norms; --bn {config['bn']} cannot start from it")
        continuing = ckpt["stage"] == stage.name
        testing = args.cmd == "test" and is_gated(saved["name"]) == stage.gated
        if not (continuing or testing or ckpt["stage"] == stage.parent):
            expected = f"a '{stage.parent}' checkpoint to start from or " if stage.parent else ""
            raise UserError(f"{where} is a '{ckpt['stage']}' checkpoint; stage '{stage.name}' takes "
                            f"{expected}a '{stage.name}' checkpoint to continue")
        if continuing or testing:
            config["policy"], config["costs"] = saved["policy"], saved.get("costs")
            if saved.get("routes"):
                config["routes"] = saved["routes"]
            if stage.gated and config["bn"] != saved_bn:
                raise UserError(f"{where} has {saved_bn} batch norms, not --bn {config['bn']}")
        elif saved["policy"] is not None or saved.get("routes"):
            raise UserError(f"{where} is a static-policy or fixed-routing network (no trained gate); "
                            "start from a stage-2 checkpoint")
    try:
        model = model_from_config(config)
    except ValueError as e:
        raise UserError(str(e))  # the policy's or the cost table's own one-line message
    if ckpt is not None:
        try:
            if stage.gated and not is_gated(ckpt["arch"]):
                model.load_backbone(ckpt["model"])
            elif stage.gated and saved_bn == "shared" and model.bn == "per-option":
                model.load_shared_bn(ckpt["model"])  # every option's BN starts as the shared one
            elif stage.gated and saved_bn == "per-option" and model.bn == "shared":  # a static policy
                model.load_state_dict({k: v for k, v in ckpt["model"].items() if not k.startswith("option_norms.")})
            else:
                model.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{args.resume} does not fit {args.arch}: {str(e).splitlines()[0][:200]}")
    if getattr(model, "routes", None) is not None and distributed.world_size() > 1:
        # a process whose slice holds no image of one half would leave that half's parameters unused
        raise UserError("a fixed routing (--route-marked/--route-unmarked) trains in one process")
    if getattr(args, "gate_estimator", "argmax") == "reinforce" and distributed.world_size() > 1:
        raise UserError("--gate-estimator reinforce trains in one process (its baseline is the batch's)")
    if stage.gated:  # the options and policy as the model has them (a preset spelled out)
        config.update(options=list(model.options), policy=model.policy_names(), bn=model.bn)
        if model.routes is not None:
            config["routes"] = model.route_names()
    return model, config, continuing


def own_run(args, ckpt, given):
    """A continued run keeps its own --iters, --eval-every, --print-freq and run folder unless they are
    given: returns (args, the run's own iterations if a larger --iters extends it, else None). The run
    folder is the checkpoint's own when the checkpoint lies in one (SAVE_FOLDER/ARCH/..., ARCH as the run
    spelt it, an alias included), so a bare --resume never starts a copy."""
    args, saved = argparse.Namespace(**vars(args)), ckpt.get("args") or {}
    extending = None
    if "iters" not in given and "iters" in saved:
        args.iters = saved["iters"]
    elif "iters" in saved and args.iters > saved["iters"]:
        extending = saved["iters"]
    for name in ("eval_every", "print_freq"):  # so that it evaluates and logs where the run would have
        if name not in given and name in saved:
            setattr(args, name, saved[name])
    here = os.path.dirname(os.path.abspath(args.resume))
    folder_arch = os.path.basename(here)  # the run folder is named as the run spelt its network
    if "save_folder" not in given and folder_arch in (args.arch, saved.get("arch")) and \
            resolve_name(folder_arch)[0] == resolve_name(args.arch)[0]:
        args.save_folder, args.arch = os.path.dirname(here), folder_arch
    return args, extending


def check_continuable(ckpt, where):
    """UserError unless the checkpoint holds a run's state and was trained by this many processes."""
    missing = [k for k in ("optimizer", "best_acc", "data_state", "rng") if k not in ckpt]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}, so it cannot continue a run")
    saved, now = ckpt.get("world_size", 1), distributed.world_size()
    if saved != now:  # batch norm works per process: its batches would change
        raise UserError(f"{where} was trained by {saved} process(es); continue it with {saved}, "
                        f"not {now} (torchrun --nproc_per_node/--nnodes)")


def gate_parameters(model):
    """The gate's parameters: its embeddings, LSTM and head (what stage 2 and --train gate optimise)."""
    return [*model.gate.parameters(), *model.gate_embeds.parameters()]
