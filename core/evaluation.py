"""Evaluation: accuracy, computation percentage and decisions of a model on a set of batches, the
text report, and rebuilding a model from a checkpoint (the one way every tool does it).
"""
import math

import torch
import torch.nn.functional as F

from core import distributed
from core.checkpoint import load_checkpoint
from core.errors import CheckpointError, UserError
from models import build_model
from models.dfs_resnet import has_mark


def split_output(out):
    """(logits, decisions or None) from a plain or a gated model's output."""
    return out if isinstance(out, tuple) else (out, None)


def option_cost_of(choices, costs):
    """[N, G] cost of each image's choice at each gated block, from a [O] or [G, O] cost table."""
    costs = costs.to(choices.device)
    if costs.dim() == 1:
        return costs[choices]
    return costs[torch.arange(choices.shape[1], device=choices.device), choices]


def mutual_information_bits(a, b):
    """Mutual information, in bits, between two [N] integer labelings (plug-in estimate)."""
    pairs = torch.stack([a, b], 1).unique(dim=0, return_counts=True)
    n = len(a)
    info = 0.0
    for (x, y), count in zip(pairs[0].tolist(), pairs[1].tolist()):
        joint = count / n
        info += joint * math.log2(joint / (float((a == x).sum()) / n * float((b == y).sum()) / n))
    return max(info, 0.0)


def routing_diagnostics(choices, costs, correct=None, marks=None):
    """How much a gate routes per input, from its [N, G] choices (a host-side summary).

    distinct_decision_vectors: how many different rows; majority_share: per block, the share of the
    images that took its most common option. With `marks` ([N] bool, a marked data set) and `correct`
    ([N] bool): per half, top-1 and computation percentage, and per block the mutual information
    between the decision and the mark, in bits (at most 1).
    """
    choices = choices.cpu()
    n, blocks = choices.shape
    counts = torch.stack([torch.bincount(col, minlength=int(choices.max()) + 1) for col in choices.T])
    out = {"distinct_decision_vectors": int(len(choices.unique(dim=0))),
           "majority_share": (counts.max(1).values.double() / n).tolist()}
    if marks is not None:
        marks = marks.cpu()
        cost = 100 * option_cost_of(choices, costs.cpu()).double().mean(1)  # [N] each image's percentage
        out["halves"] = {half: {"images": int(m.sum()),
                                "computation_percentage": float(cost[m].mean()) if m.any() else None,
                                **({"acc": 100 * float(correct.cpu()[m].double().mean()) if m.any() else None}
                                   if correct is not None else {})}
                         for half, m in (("marked", marks), ("unmarked", ~marks))}
        out["mark_information_bits"] = [mutual_information_bits(col, marks.long()) for col in choices.T]
    return out


@torch.no_grad()
def evaluate(model, batches, force=None, per_image=False, marked=False):
    """Top-1 accuracy, loss, computation percentage and per-block decision distribution.

    With several processes each evaluates its share of `batches` and the sums are added up, the
    counts exactly (int64, and float64 for the decision counts), so the figures are one process's.
    force: [N, G] option indices, one row per image of `batches` in order, run instead of the
    gate's choices (one process). per_image: also return `correct` [N] (bool) and, for a gated
    model, `choices` [N, G] (one process). A gated model in one process also gets `routing`
    (`routing_diagnostics`); marked: the batches are of a marked data set (its halves reported).
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
    hits, choices, marks = [], [], []
    routing = gated and distributed.world_size() == 1  # per-image diagnostics: one process
    for x, y in batches:
        kwargs = {} if force is None else {"force_option": force[n:n + len(y)]}
        logits, decisions = split_output(model(x, **kwargs))
        hit = logits.argmax(1) == y
        correct += hit.sum()
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        n += len(y)
        if gated:
            usage += decisions.sum(0).double()
        if per_image or routing:
            hits.append(hit)
            choices.append(decisions.argmax(2) if gated else None)
        if routing and marked:
            marks.append(has_mark(x))
    model.train(was_training)
    if force is not None and n != len(force):
        raise ValueError(f"force has {len(force)} rows for {n} images")
    correct, n = distributed.all_sum(torch.stack([correct, correct.new_tensor(n)])).tolist()
    stats = {"acc": 100 * correct / n, "loss": float(distributed.all_sum(loss)) / n, "num_samples": n}
    if per_image:
        stats["correct"] = torch.cat(hits).cpu()
        if gated:
            stats["choices"] = torch.cat(choices).cpu()
    if routing and n:
        stats["routing"] = routing_diagnostics(torch.cat(choices), model.option_costs, torch.cat(hits),
                                               torch.cat(marks) if marked else None)
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


@torch.no_grad()
def counterfactuals(model, batches, marked=False):
    """Per gated block and option: the mean change of each image's cross entropy and top-1 (points)
    when that block alone is forced to that option, every other block as the gate decided (round 5's
    diagnostics, `eval.py --counterfactual`). Per half of a marked data set, else over all images.

    Returns {"options": names, "halves": {half: {"images": n, "delta_ce": [G][O], "delta_top1": [G][O]}}}.
    G x O extra forward passes per batch; one process."""
    if distributed.world_size() > 1:
        raise UserError("counterfactual diagnostics run in one process")
    was_training = model.training
    model.eval()
    blocks, options = len(model.gate_embeds), len(model.options)
    halves = ("marked", "unmarked") if marked else ("all",)
    sums = {h: {"images": 0, "ce": torch.zeros(blocks, options, dtype=torch.float64),
                "top1": torch.zeros(blocks, options, dtype=torch.float64)} for h in halves}
    for x, y in batches:
        logits, decisions = model(x)
        choices = decisions.argmax(2)
        ce = F.cross_entropy(logits, y, reduction="none").double()
        hit = (logits.argmax(1) == y).double()
        masks = {"all": torch.ones_like(y, dtype=torch.bool)} if not marked else \
            {"marked": has_mark(x), "unmarked": ~has_mark(x)}
        for h, m in masks.items():
            sums[h]["images"] += int(m.sum())
        for g in range(blocks):
            for o in range(options):
                force = choices.clone()
                force[:, g] = o
                out, _ = model(x, force_option=force)
                d_ce = F.cross_entropy(out, y, reduction="none").double() - ce
                d_top1 = (out.argmax(1) == y).double() - hit
                for h, m in masks.items():
                    sums[h]["ce"][g, o] += d_ce[m].sum().cpu()
                    sums[h]["top1"][g, o] += d_top1[m].sum().cpu()
    model.train(was_training)
    out = {}
    for h, v in sums.items():
        n = max(v["images"], 1)
        out[h] = {"images": v["images"], "delta_ce": (v["ce"] / n).tolist(), "delta_top1": (100 * v["top1"] / n).tolist()}
    return {"options": list(model.option_names), "halves": out}


def format_counterfactuals(record):
    """A text table per half: each block's mean change of CE (and top-1, points) per forced option."""
    lines = []
    for half, v in record["halves"].items():
        lines.append(f"counterfactual, {half} ({v['images']} images): mean change of cross entropy (top-1, points) "
                     "when one block is forced, the others as decided")
        lines.append("block " + "".join(f"{name:>20}" for name in record["options"]))
        for g, (ce, top1) in enumerate(zip(v["delta_ce"], v["delta_top1"])):
            lines.append(f"{g:>5} " + "".join(f"{c:>+11.3f} ({t:>+6.2f})" for c, t in zip(ce, top1)))
    return "\n".join(lines)


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
    routing = stats.get("routing")
    if routing:
        lines.append(f"distinct decision vectors {routing['distinct_decision_vectors']}, images at each block's "
                     f"most common option {100 * sum(routing['majority_share']) / len(routing['majority_share']):.1f} %")
        for half, h in routing.get("halves", {}).items():
            if h["images"]:
                lines.append(f"{half} half ({h['images']} images): top-1 {h['acc']:.2f} %, "
                             f"computation {h['computation_percentage']:.2f} %")
        if "mark_information_bits" in routing:
            lines.append("decision-mark information (bits) per block: "
                         + " ".join(f"{v:.2f}" for v in routing["mark_information_bits"]))
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
                       config.get("bn"), config.get("routes"))


def load_model(path, device):
    """(model on `device`, checkpoint) from a checkpoint file; CheckpointError if it does not fit."""
    ckpt = load_checkpoint(path)
    try:
        model = model_from_config(model_config(ckpt))
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not hold a valid {ckpt['arch']}: {str(e).splitlines()[0][:200]}")
    return model.to(device), ckpt
