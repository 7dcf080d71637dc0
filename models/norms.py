"""Per-option batch norm (`--bn per-option`): a departure from the paper, off by default.

The paper's network has one BN per conv, shared by every option of a gated block, so in
training its statistics mix every bitwidth's activations. With per-option BN every non-skip
option of a gated block has its own `bn1`, `bn2` (and `shortcut_bn` in a projection block); skip
keeps the block's own `shortcut_bn`. Each normalises only its own option's path, and its batch
statistics (used in training, and folded into its running statistics) are those of the images
the gate routed to that option, as at inference, where an option's BN sees only those images.

In training every option still runs on the whole batch (the gate's straight-through gradient
needs every option's output for every image); an image not routed to an option is normalised
with that option's statistics but does not enter them. An option that no image chose in a
batch normalises with its running statistics and leaves them unchanged.
"""
import copy

import torch
import torch.nn as nn

BN_MODES = ("shared", "per-option")


def parse_bn(bn):
    """'shared' (the paper's, the default for None) or 'per-option'; ValueError otherwise."""
    bn = "shared" if bn is None else bn
    if bn not in BN_MODES:
        raise ValueError(f"unknown batch-norm mode {bn!r}; choose from {', '.join(BN_MODES)}")
    return bn


def routed_batch_norm(bn, x, routed):
    """`bn` in training mode with the batch statistics of the images where `routed` ([B] bool).

    Same arithmetic as nn.BatchNorm2d in training on x[routed] (biased variance to normalise,
    unbiased in the running estimate, momentum or, for momentum None, a cumulative average),
    applied to every image of x; no host synchronisation.
    """
    w = routed.to(x.dtype).view(-1, 1, 1, 1)
    count = w.sum() * (x.numel() // (x.shape[0] * x.shape[1]))  # elements per channel that count
    denom = count.clamp(min=1)
    mean = (x * w).sum((0, 2, 3)) / denom
    var = ((x - mean.view(1, -1, 1, 1)).square() * w).sum((0, 2, 3)) / denom
    seen = count > 0
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(seen.long())
            factor = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.clamp(min=1)
            unbiased = var.detach() * count / (count - 1).clamp(min=1)
            bn.running_mean.copy_(torch.where(seen, torch.lerp(bn.running_mean, mean.detach(), factor), bn.running_mean))
            bn.running_var.copy_(torch.where(seen, torch.lerp(bn.running_var, unbiased, factor), bn.running_var))
    mean = torch.where(seen, mean, bn.running_mean)  # no image routed: the running statistics
    var = torch.where(seen, var, bn.running_var)
    scale = torch.rsqrt(var + bn.eps) * bn.weight
    return (x - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def block_norm_names(block):
    """The names of a BasicBlock's batch norms, in the order its forward uses them."""
    return ("bn1", "bn2", "shortcut_bn") if block.projection else ("bn1", "bn2")


def make_option_norms(blocks, option_names):
    """For each gated block, {option name: {BN name: a copy of the block's BN}} for non-skip options."""
    return nn.ModuleList(
        nn.ModuleDict({name: nn.ModuleDict({n: copy.deepcopy(getattr(block, n)) for n in block_norm_names(block)})
                       for name in option_names if name != "skip"})
        for block in blocks)


def norms_of(option_norms, block, name, routed=None):
    """(bn1, bn2, shortcut_bn) callables for one option of a block (None where it has none).

    routed: [B] bool of the images routed to this option, in training; None: the modules themselves.
    """
    if name == "skip":
        mods = (None, None, block.shortcut_bn if block.projection else None)
    else:
        own = option_norms[name]
        mods = (own["bn1"], own["bn2"], own["shortcut_bn"] if block.projection else None)
    if routed is None:
        return mods
    return tuple(None if m is None else (lambda x, m=m: routed_batch_norm(m, x, routed)) for m in mods)


@torch.no_grad()
def copy_shared_norms(option_norms, blocks):
    """Every option's BN set to its block's shared BN (parameters and statistics)."""
    for per_option, block in zip(option_norms, blocks):
        for own in per_option.values():
            for n, bn in own.items():
                bn.load_state_dict(getattr(block, n).state_dict())
