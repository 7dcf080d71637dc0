"""Fast paths give the same numbers as the straightforward formulation, bit for bit.

Training: the default forward back-propagates only through options that some sample chose
(`execution="dynamic"`); `execution="mixed"` keeps every option in the autograd graph (the
released code's formulation). One step of each from the same state must give the same loss,
the same gradient for every parameter and the same buffers (BN running statistics, activation
ranges), and a few optimizer steps must stay equal, in every stage and setting.

Eval: the cached quantized weights and the no-gather path for a batch that chose one option.
"""
import copy
import types

import pytest
import torch

import quantize
from core.losses import budget_loss
from models import build_model, dfs_resnet
from quantize import QConv2d, fake_quantize

import helpers
from helpers import DEVICE


def batch(b=8, seed=1):
    """Inputs that differ per sample, and labels."""
    return helpers.images(b, seed), torch.arange(b).remainder(10).to(DEVICE)


def steer(model, pattern):
    """'spread': choices vary with the sample; an option name: every sample chooses it."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        proj = model.gate.proj
        if pattern == "spread":
            for e in model.gate_embeds:
                e.conv.weight.mul_(10)
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * 3)
            proj.bias.zero_()
        else:
            proj.weight.zero_()
            proj.bias.fill_(-5.0)
            proj.bias[model.options.index(int(pattern) if pattern.isdigit() else pattern)] = 5.0


def step(model, x, y, execution, seed=3, target=50.0):
    """Forward with `execution`, the stage-2/3 loss, backward; returns (loss, grads, buffers)."""
    torch.manual_seed(seed)  # dithered rounding draws from the global stream: same draws both ways
    logits, decisions = model(x, execution=execution)
    loss, _ = budget_loss(types.SimpleNamespace(target_cp=target, cost_weight=1e-2))(logits, decisions, y, model)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, dict(model.named_buffers()), decisions.detach()


def assert_same_step(a, b):
    (loss_a, grads_a, bufs_a, dec_a), (loss_b, grads_b, bufs_b, dec_b) = a, b
    assert torch.equal(dec_a, dec_b)
    assert torch.equal(loss_a, loss_b), (loss_a.item(), loss_b.item())
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), f"gradient of {n} differs"
    for n in bufs_a:
        assert torch.equal(bufs_a[n], bufs_b[n]), f"buffer {n} differs"


def pair(options="default", stochastic=False, pattern="spread", freeze_backbone=False):
    torch.manual_seed(0)
    model = build_model("dfs_resnet20", 10, options, stochastic_act_rounding=stochastic).to(DEVICE)
    steer(model, pattern)
    if freeze_backbone:  # stage 2: only the gate trains, BN and range buffers still update
        gate = {id(p) for p in [*model.gate.parameters(), *model.gate_embeds.parameters()]}
        for p in model.parameters():
            p.requires_grad_(id(p) in gate)
    model.train()
    return model, copy.deepcopy(model)


CASES = [  # (options, stochastic rounding, gate pattern, stage 2)
    ("default", False, "spread", False),
    ("default", True, "spread", False),
    ("default", False, "spread", True),
    ("paper", False, "spread", False),
    ("skipnet", False, "spread", False),
    ("8", False, "spread", False),
    ("default", False, "skip", False),  # every sample skips every block
    ("default", False, "8", False),
    ("paper", True, "full", True),
]


@pytest.mark.parametrize("options,stochastic,pattern,frozen", CASES)
def test_sparse_training_step_equals_mixed(options, stochastic, pattern, frozen):
    sparse, dense = pair(options, stochastic, pattern, frozen)
    x, y = batch()
    a, b = step(sparse, x, y, "dynamic"), step(dense, x, y, "mixed")
    assert_same_step(a, b)
    chosen = a[3].sum((0, 1)) > 0
    if pattern == "spread" and len(sparse.options) > 2:  # the test exercises the sparse path
        assert 1 < int(chosen.sum()) < len(sparse.options) or options == "paper"
    if pattern != "spread":
        assert int(chosen.sum()) == 1


def test_sparse_skips_backward_through_unchosen_options():
    """Not vacuous: with every sample on 8 bits the full-precision path is out of the graph."""
    sparse, dense = pair("default", pattern="8")
    x, y = batch()
    counted = {}
    for name, model in (("sparse", sparse), ("dense", dense)):
        calls = []
        handle = model.blocks[1].conv1.register_full_backward_hook(lambda *a: calls.append(1))
        step(model, x, y, "dynamic" if name == "sparse" else "mixed")
        handle.remove()
        counted[name] = len(calls)
    assert counted["sparse"] < counted["dense"]


@pytest.mark.parametrize("options,stochastic", [("default", False), ("paper", True), ("skipnet", False)])
def test_sparse_optimizer_steps_stay_equal(options, stochastic):
    sparse, dense = pair(options, stochastic)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4) for m in (sparse, dense)]
    for i in range(3):
        x, y = batch(seed=10 + i)
        a, b = step(sparse, x, y, "dynamic", seed=i), step(dense, x, y, "mixed", seed=i)
        assert_same_step(a, b)
        for o in opts:
            o.step()
    for (n, p), q in zip(sparse.named_parameters(), dense.parameters()):
        assert torch.equal(p, q), n


def test_input_range_shared_across_bitwidths_updates_buffers_per_call():
    """conv1 and the projection see the block input once per quantized option (spec §2)."""
    model, _ = pair("default")
    x, _ = batch()
    got = {}
    model.blocks[3].register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0].detach().clone()))
    model(x)
    v = got["x"].flatten(1)
    lo, hi = v.min(1).values.mean(), v.max(1).values.mean()
    running = torch.zeros(())
    for _ in range(5):  # five bitwidths, each call folds the same batch value in
        running = 0.1 * running + 0.9 * lo
    for conv in (model.blocks[3].conv1, model.blocks[3].shortcut_conv):
        assert torch.equal(conv.running_min, running.to(DEVICE))


def test_the_block_input_range_is_reduced_once_in_training_and_never_in_eval(monkeypatch):
    """Training reduces a gated block's input range once for all its bitwidths and its projection
    (the same values as once per conv); eval, even the mixed reference, uses the buffers only."""
    model, _ = pair("default")
    x, _ = batch()
    block_input, reduced = [], []  # the tensors themselves: an address can be reused once freed
    model.blocks[3].register_forward_pre_hook(lambda m, a: block_input.append(a[0]))
    real = quantize.input_range

    def counting(t):
        reduced.append(t)
        return real(t)
    monkeypatch.setattr(quantize, "input_range", counting)
    monkeypatch.setattr(dfs_resnet, "input_range", counting)
    model(x)
    assert sum(t is block_input[0] for t in reduced) == 1  # (the block runs once per option)
    model.eval()
    reduced.clear()
    with torch.no_grad():
        model(x, execution="mixed")
    assert reduced == []


@pytest.mark.parametrize("execution,calls", [("dynamic", 1), ("mixed", 6)])
def test_eval_computes_only_the_chosen_option(execution, calls):
    """§7: with every sample on 8 bits, dynamic eval runs each gated block's convs once (the
    chosen option); the mixed reference runs them for all six options that have convs."""
    model, _ = pair("default", pattern="8")
    model.eval()
    x, _ = batch()
    seen = []
    model.blocks[2].conv1.register_forward_hook(lambda m, a, out: seen.append(1))
    with torch.no_grad():
        model(x, execution=execution)
    assert len(seen) == calls


def test_eval_weight_cache_follows_the_weight():
    conv = QConv2d(4, 6, 3, padding=1, bias=False).to(DEVICE).eval()
    with torch.no_grad():
        conv.running_min.fill_(-1.0)
        conv.running_max.fill_(2.0)
    x = torch.randn(2, 4, 8, 8, device=DEVICE)

    def reference():
        w = conv.weight.detach()
        xq = fake_quantize(x, 8, conv.running_min, conv.running_max)
        return torch.nn.functional.conv2d(xq, fake_quantize(w, 8, w.min(), w.max()), padding=1)

    with torch.no_grad():
        assert torch.equal(conv(x, 8), reference())
        cached = conv._weight_cache[8][1]
        conv(x, 8)
        assert conv._weight_cache[8][1] is cached  # reused, not recomputed
        conv.weight.mul_(3)  # an in-place write (as an optimizer step) invalidates it
        assert torch.equal(conv(x, 8), reference())
        conv.load_state_dict({k: v * 0.5 if k == "weight" else v for k, v in conv.state_dict().items()})
        assert torch.equal(conv(x, 8), reference())
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    conv.train()
    conv(x, 8).sum().backward()  # training never uses the cache and keeps the weight's gradient
    assert conv.weight.grad is not None
    opt.step()
    conv.eval()
    with torch.no_grad():
        conv.running_min.fill_(-1.0)
        conv.running_max.fill_(2.0)
        assert torch.equal(conv(x, 8), reference())


@pytest.mark.parametrize("pattern", ["full", "8", "skip"])
def test_one_option_for_the_batch_equals_mixed_exactly(pattern):
    """Every sample on one option: no gather/scatter, cached weights, the same numbers as mixed."""
    model, _ = pair("default", pattern=pattern)
    x, _ = batch()
    with torch.no_grad():
        model(x)  # non-trivial BN and range statistics
        model.eval()
        for _ in range(2):  # the second pass reuses the cached quantized weights
            (la, da), (lb, db) = model(x), model(x, execution="mixed")
            assert torch.equal(da, db) and torch.equal(la, lb)
        (la, da), (lb, db) = model(x[:1]), model(x[:1], execution="mixed")  # a batch of one
        assert torch.equal(da, db) and torch.equal(la, lb)
