"""Evaluation: accuracy, computation percentage and decisions of a model on a set of batches, the
text report, and rebuilding a model from a checkpoint (the one way every tool does it).
"""
import torch
import torch.nn.functional as F

from core import distributed
from core.checkpoint import load_checkpoint
from core.errors import CheckpointError, UserError
from models import build_model


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
    if force is not None and len(force) and (int(force.min()) < 0 or int(force.max()) >= len(model.options)):
        raise ValueError(f"force holds option indices outside 0..{len(model.options) - 1}")
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
    model.train(was_training)
    if force is not None and n != len(force):
        raise ValueError(f"force has {len(force)} rows for {n} images")
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


ESTIMATORS = ("pooled", "call")


@torch.no_grad()
def recalibrate_bn(model, batches, estimator="pooled"):
    """Re-estimate every BN's running statistics on `batches`, the model routing each image as in
    evaluation (through the option its gate chooses). A diagnostic, not the paper's.

    During the passes each BN normalises with the batch statistics of the images that reach it in
    that call, as in training; activation ranges are left as trained. The estimate:
    pooled: the mean and (unbiased) variance over every image routed through the BN in all of
        `batches` together, each image weighted the same; a BN that no image reached keeps its own.
    call: each call's batch statistics averaged with equal weight (BN momentum None), however few
        images the call saw; round 2's posthoc figures were made with it.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta, was_training = [bn.momentum for bn in norms], model.training
    sums = {bn: [0, 0.0, 0.0] for bn in norms}  # elements per channel, sum, sum of squares (float64)

    def accumulate(bn, inputs):
        x = inputs[0].double().transpose(0, 1).flatten(1)
        acc = sums[bn]
        acc[0] += x.shape[1]
        acc[1] = acc[1] + x.sum(1)
        acc[2] = acc[2] + x.square().sum(1)

    hooks = [bn.register_forward_pre_hook(accumulate) for bn in norms] if estimator == "pooled" else []
    trained = {bn: (bn.running_mean.clone(), bn.running_var.clone()) for bn in norms}
    model.eval()
    for bn in norms:
        bn.reset_running_stats()  # pooled: overwritten below; call: the running average starts here
        bn.momentum = None
        bn.train()
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.train(was_training)
    if estimator == "pooled":
        for bn, (n, s1, s2) in sums.items():
            mean, var = (s1 / n, (s2 - n * (s1 / n).square()) / (n - 1)) if n > 1 else trained[bn]
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)


def model_config(ckpt):
    """The model's constructor arguments, as a checkpoint stores them (`model_config`); for the
    checkpoints written before that record (the released round-1 ones), from their other keys."""
    if "model_config" in ckpt:
        return dict(ckpt["model_config"])
    saved = ckpt.get("args") or {}
    return {"name": ckpt["arch"], "num_classes": ckpt["num_classes"], "options": ckpt.get("options"),
            "stochastic_act_rounding": bool(saved.get("stochastic_act_rounding", False)),
            "policy": ckpt.get("policy")}


def model_from_config(config):
    """A new model from a config record (ValueError on bad values); no "bn" key: shared BN."""
    return build_model(config["name"], config["num_classes"], config.get("options"),
                       bool(config.get("stochastic_act_rounding", False)), config.get("policy"), config.get("costs"),
                       config.get("bn"))


def load_model(path, device):
    """(model on `device`, checkpoint) from a checkpoint file; CheckpointError if it does not fit."""
    ckpt = load_checkpoint(path)
    try:
        model = model_from_config(model_config(ckpt))
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not hold a valid {ckpt['arch']}: {str(e).splitlines()[0][:200]}")
    return model.to(device), ckpt
