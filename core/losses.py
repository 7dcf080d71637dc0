"""The stages' losses: cross entropy over the global batch, and the budget terms of stages 2-3 (the
paper's signed term, docs/spec.md §5, and the departures' squared and dead-band terms).

Every loss is `loss_fn(logits, decisions, target, model) -> (loss, computation percentage or None)`,
made by a `make_loss(args)` of a stage (core/engine.py's Stage).
"""
import argparse

import torch
import torch.nn.functional as F

from core import distributed
from models.cost import cost_penalty


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
    --budget-loss squared or deadband (departures, stage 3) replace the term: see `budget_term`.
    """
    kind = getattr(args, "budget_loss", "signed")
    if getattr(args, "gate_estimator", "argmax") == "reinforce":
        return reinforce_loss(args)
    if getattr(args, "distill_marked", None) is not None:
        return distill_loss(args)

    def loss_fn(logits, decisions, target, model):
        total, cp = distributed.global_mean(model.computation_percentage(decisions.detach()), len(target))
        ce = global_cross_entropy(logits, target, total)
        penalty = cost_penalty(decisions, model.option_costs) * distributed.world_size()
        if kind != "signed":
            return ce + budget_term(kind, args, ce, penalty, cp, total, decisions, model), cp
        sign = torch.where(cp > args.target_cp, 1.0, -1.0)
        return ce + args.cost_weight * sign * penalty, cp
    return loss_fn


def budget_term(kind, args, ce, penalty, cp, total, decisions, model):
    """The departures' budget terms (each process's share of DDP's gradient average, as `budget_loss`).

    squared: beta * (cp/100 - target/100)^2 of the global batch's computation percentage cp (the form of
        ConvNet-AIG, DynConv, LAUDNet); its gradient is that of the global value.
    deadband: FracTrain's rule (GATECH-EIC/FracTrain, fractrain_cifar/train_dfq.py, run_training): beta * C
        times s = -1 below target - band, +1 at or above target + band, +0.1 at or above the target within
        the band and -0.1 below it; with a cap c > 0 (their --ada_beta, c = 0.1), when beta * C exceeds c
        times the cross entropy it is rescaled to exactly that (the gradient scaled by the same factor).
    """
    target = args.target_cp
    if kind == "squared":
        world = distributed.world_size()
        # sum over this process's images of their percentage, / the global count: its share of cp
        share = world * 100 * (decisions * model.option_costs).sum(-1).mean(1).sum() / total
        gap = (cp - target) / 100
        return args.cost_weight * (gap.square() + 2 * gap * (share - share.detach()) / 100)
    band = args.budget_band
    sign = torch.where(cp < target - band, -1.0, torch.where(cp >= target + band, 1.0,
                                                             torch.where(cp >= target, 0.1, -0.1)))
    term = args.cost_weight * penalty
    if args.budget_cap > 0:  # global values: C summed over processes, CE their mean
        world = distributed.world_size()
        global_term = distributed.all_sum(term.detach()) / world
        global_ce = distributed.all_sum(ce.detach()) / world
        limit = args.budget_cap * global_ce
        term = torch.where(global_term > limit, term * (limit / global_term), term)
    return sign * term


def reinforce_loss(args):
    """--gate-estimator reinforce (stage 3, a departure; docs/departures.md): the gate learns by the
    score function, the backbone by cross entropy, the budget through the expected cost.

    The decisions are samples from the gate's softmax (LSTMGate.sampling), so cross entropy reaches
    the backbone through the chosen options only and the gate not at all. Per image i the reward is
    -CE_i, its own cross entropy under the sampled decisions (SkipNet's terminal reward, ucbdrive/skipnet
    cifar/train_rl.py: R = -pred_loss), with a baseline as in BlockDrop (Tushar-N/blockdrop
    cl_training.py: advantage = reward_sample - reward_map, the greedy policy's reward): here the mean
    of the other images' CE in the batch (leave-one-out), which keeps the estimate unbiased and needs
    no second forward pass. The score term mean_i (CE_i - b_i) log pi(a_i), log pi(a_i) the sum over
    blocks of the log-probabilities of the sampled options, has the gradient of E[CE] in expectation.
    The budget term is `budget_loss`'s, on the expected decisions (the softmax) instead of the sampled
    ones: its gradient through the probabilities is exact, not sampled. One process only.
    """
    budget = budget_loss(argparse.Namespace(**{**vars(args), "gate_estimator": "argmax"}))

    def loss_fn(logits, decisions, target, model, probs):
        each = F.cross_entropy(logits, target, reduction="none")
        n = len(target)
        baseline = (each.sum() - each) / (n - 1)
        log_pi = (decisions.detach() * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum((1, 2))
        score = ((each - baseline).detach() * log_pi).mean()
        ce_and_budget, _ = budget(logits, probs, target, model)  # the expected cost's budget term
        cp = model.computation_percentage(decisions.detach()).mean()  # the sampled decisions' cost, logged
        return ce_and_budget + score, cp
    return loss_fn


def distill_loss(args):
    """--distill-marked/--distill-unmarked (stage 3 with --train gate, a departure): the gate trained
    to reproduce a given per-half routing. The network runs the routing itself (the engine forces it,
    so the gate sees the features the routing produces) and the loss is the cross entropy of the
    gate's softmax against the routing's option, averaged over images and gated blocks. The
    computation percentage returned (logged) is that of the gate's own argmax."""
    def loss_fn(logits, decisions, target, model, probs):
        wanted = decisions.detach().argmax(-1)  # the forced routing
        log_p = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        loss = F.nll_loss(log_p.flatten(0, 1), wanted.flatten())
        own = F.one_hot(probs.detach().argmax(-1), probs.shape[-1]).to(probs.dtype)
        return loss, model.computation_percentage(own).mean()
    return loss_fn
