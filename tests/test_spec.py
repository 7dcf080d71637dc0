"""Tests that pin the rules of docs/spec.md that no other test file pins (issue #12).

Each test names the spec section it pins and fails when that rule is broken: a flipped budget
sign, a detached penalty, a moved schedule boundary, a backbone parameter that trains in stage 2,
a shortcut at the wrong bitwidth, dithered weights, a swapped init formula, a wrong dataset
constant. tests/README.md maps every spec section to its tests and lists the bugs each was
checked against. Expectations are worked out by hand or computed independently of the code
under test; where a test needs the quantizer itself it calls `fake_quantize`, whose arithmetic
is pinned in test_quantize.py, so these tests hold whatever the scale's float precision.
"""
import argparse
import copy
import gzip
import math
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import train_base
import train_dfs
import train_gate_init
from core import engine, losses, settings
from models import build_model
from models.cost import option_costs
from models.dfs_resnet import DFSResNet
from models.resnet import CifarResNet, init_weights
from quantize import QConv2d, fake_quantize

from helpers import DEVICE, images, onehot, randomize_bn, small_synthetic as shrink_synthetic, spread_gate

STAGES = {"base": train_base.STAGE, "gate_init": train_gate_init.STAGE, "dfs": train_dfs.STAGE}
ARCH = {"base": "resnet20", "gate_init": "dfs_resnet20", "dfs": "dfs_resnet20"}
PAPER = ("skip", 8, 16, "full")  # costs 0, 1/16, 1/4, 1: every percentage below is exact in fp32


# =========================================================================== §1 initialisation


def relative_std(weight, expected):
    return weight.detach().std().item() / expected - 1


@pytest.mark.parametrize("cin,cout,k", [(48, 160, 3), (160, 48, 3), (64, 256, 1)])
def test_init_conv_is_normal_with_std_from_k_k_out(cin, cout, k):
    """§1: conv weights ~ N(0, sqrt(2 / (k*k*out_channels))): fan-out, not fan-in."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, bias=False)  # >= 16k weights: the std is known to ~0.6 %
    init_weights(conv)
    expected = math.sqrt(2.0 / (k * k * cout))
    # fan-in (k*k*in) is off by sqrt(cout/cin) >= 1.8x, dropping k*k by 3x: 5 % separates them
    assert abs(relative_std(conv.weight, expected)) < 0.05
    assert abs(conv.weight.mean().item()) < 0.05 * expected


def test_init_linear_uses_in_times_out_and_keeps_the_default_bias():
    """§1: Linear weight ~ N(0, sqrt(2 / (in*out))) (sic), bias left at PyTorch's default."""
    torch.manual_seed(0)
    fc = nn.Linear(120, 300)
    init_weights(fc)
    expected = math.sqrt(2.0 / (120 * 300))  # fan-in alone would be 17x, fan-out 10x larger
    assert abs(relative_std(fc.weight, expected)) < 0.05
    bound = 1 / math.sqrt(120)  # PyTorch's default bias: U(-1/sqrt(in), 1/sqrt(in))
    assert fc.bias.abs().max().item() <= bound
    assert fc.bias.std().item() > bound / 3  # not zeroed, not re-drawn at the weight's tiny std


def test_init_batchnorm_is_one_and_zero():
    bn = nn.BatchNorm2d(32)
    with torch.no_grad():
        bn.weight.uniform_(2, 3)
        bn.bias.uniform_(2, 3)
    init_weights(bn)
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


@pytest.mark.parametrize("make", [lambda: CifarResNet(20), lambda: DFSResNet(20)], ids=["resnet20", "dfs_resnet20"])
def test_models_are_built_with_the_released_init(make):
    """Every backbone conv and the classifier of a built model follow §1's formulas, layer by layer.

    Checked on the layers where fan-in and fan-out differ (the stem 3->16, the stride-2 convs
    and the projection shortcuts), so that a swap shows up, and on every other conv too.
    """
    torch.manual_seed(3)
    m = make()
    backbone_convs = [mod for name, mod in m.named_modules()
                      if isinstance(mod, nn.Conv2d) and not name.startswith(("gate", "gate_embeds"))]
    assert len(backbone_convs) == 1 + 2 * 9 + 2
    for conv in backbone_convs:
        k = conv.kernel_size[0]
        expected = math.sqrt(2.0 / (k * k * conv.out_channels))
        # the smallest of these layers has 432 weights: its std is known to ~3.4 % (1 sigma)
        assert abs(relative_std(conv.weight, expected)) < 0.2, conv
    assert m.conv1.in_channels != m.conv1.out_channels  # the stem: fan-in 27 vs fan-out 144
    expected_fc = math.sqrt(2.0 / (64 * 10))  # 640 weights: ~2.8 %; fan-in alone would be 3.2x
    assert abs(relative_std(m.fc.weight, expected_fc)) < 0.2
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)


# =========================================================================== §2 quantized convs of a block


def quantized_conv(conv, x, bits, lo, hi):
    """A quantized conv written out: input on [lo, hi], weight on its own min/max, at `bits`."""
    w = conv.weight
    return F.conv2d(fake_quantize(x, bits, lo, hi), fake_quantize(w, bits, w.min(), w.max()),
                    None, conv.stride, conv.padding)


def bn_eval(t, mod):
    return F.batch_norm(t, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps)


def projection_block(options=("skip", 4, 8, "full")):
    """DFS-ResNet-20 in eval with BN statistics and per-conv range buffers set; its first stride-2 block."""
    torch.manual_seed(0)
    m = DFSResNet(20, options=options).to(DEVICE)
    randomize_bn(m)
    m.eval()
    b = m.blocks[3]
    assert b.projection
    with torch.no_grad():  # a different range for each conv: the buffers belong to the conv
        for conv, (lo, hi) in ((b.conv1, (-2.5, 2.0)), (b.conv2, (0.0, 3.0)), (b.shortcut_conv, (-1.5, 2.5))):
            conv.running_min.fill_(lo)
            conv.running_max.fill_(hi)
    return m, b


@pytest.mark.parametrize("bits", [4, 8])
def test_projection_shortcut_is_quantized_at_the_options_bitwidth(bits):
    """§2: both 3x3 convs *and the block's own 1x1 projection shortcut* run at the chosen bitwidth."""
    m, b = projection_block()
    x = torch.randn(3, 16, 32, 32, device=DEVICE)
    with torch.no_grad():
        out = F.relu(bn_eval(quantized_conv(b.conv1, x, bits, -2.5, 2.0), b.bn1))
        out = bn_eval(quantized_conv(b.conv2, out, bits, 0.0, 3.0), b.bn2)
        shortcut = bn_eval(quantized_conv(b.shortcut_conv, x, bits, -1.5, 2.5), b.shortcut_bn)
        expected = F.relu(out + shortcut)
        got = m.run_option(b, x, m.options.index(bits))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # the control: the same block with a full-precision shortcut is measurably different
        fp_shortcut = bn_eval(F.conv2d(x, b.shortcut_conv.weight, None, 2), b.shortcut_bn)
        assert (F.relu(out + fp_shortcut) - got).abs().max() > 1e-3


def test_skip_shortcut_is_full_precision_and_leaves_the_ranges_alone():
    """§2/§3: skip runs the block's own shortcut conv + BN at full precision, quantizing nothing."""
    m, b = projection_block()
    x = torch.randn(3, 16, 32, 32, device=DEVICE)
    with torch.no_grad():
        expected = bn_eval(F.conv2d(x, b.shortcut_conv.weight, None, 2), b.shortcut_bn)
        torch.testing.assert_close(m.run_option(b, x, m.options.index("skip")), expected, rtol=1e-5, atol=1e-6)
    # in training, a quantized option moves the shortcut conv's range buffers; skip does not
    m.train()
    for conv in (b.conv1, b.shortcut_conv):
        conv.running_min.zero_()
        conv.running_max.zero_()
    m.run_option(b, x, m.options.index("skip"))
    assert b.shortcut_conv.running_min.item() == 0 and b.shortcut_conv.running_max.item() == 0
    m.run_option(b, x, m.options.index(8))
    lo, hi = x.flatten(1).min(1).values.mean(), x.flatten(1).max(1).values.mean()
    for conv in (b.conv1, b.shortcut_conv):  # both read the block input at 8 bits: 0.9 * batch value
        torch.testing.assert_close(conv.running_min, 0.9 * lo, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(conv.running_max, 0.9 * hi, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dithered_rounding_touches_activations_only(mode):
    """§2: the released code's U(-0.5, 0.5) dither acts on activations; weights round to nearest.

    The reference draws the activations' noise from the same seeded stream and rounds the
    weight to nearest: a dithered weight (or an undithered activation) makes it disagree.
    """
    torch.manual_seed(0)
    conv = QConv2d(4, 6, 3, 1, 1, bias=False, stochastic_act_rounding=True).to(DEVICE)
    getattr(conv, mode)()
    with torch.no_grad():
        conv.running_min.fill_(-2.0)
        conv.running_max.fill_(2.0)
    x = torch.randn(3, 4, 7, 7, device=DEVICE)
    if mode == "train":
        lo, hi = x.flatten(1).min(1).values.mean(), x.flatten(1).max(1).values.mean()
    else:
        lo, hi = torch.tensor(-2.0), torch.tensor(2.0)
    w = conv.weight.detach()
    w_nearest = fake_quantize(w, 4, w.min(), w.max())
    with torch.no_grad():
        torch.manual_seed(11)
        got = conv(x, 4)
        torch.manual_seed(11)
        x_dithered = fake_quantize(x, 4, lo, hi, stochastic=True)
        torch.testing.assert_close(got, F.conv2d(x_dithered, w_nearest, None, 1, 1), rtol=1e-5, atol=1e-5)
        nearest = F.conv2d(fake_quantize(x, 4, lo, hi), w_nearest, None, 1, 1)
        assert (got - nearest).abs().max() > 1e-2  # the activations were dithered


def test_dithered_rounding_off_by_default_everywhere():
    """§2: round to nearest by default: a default model's quantized convs never dither."""
    m = build_model("dfs_resnet20")
    qconvs = [q for q in m.modules() if isinstance(q, QConv2d)]
    assert qconvs and not any(q.stochastic_act_rounding for q in qconvs)
    assert QConv2d(3, 4, 3).stochastic_act_rounding is False and DFSResNet(20).blocks[1].conv1.stochastic_act_rounding is False
    assert settings.parse_args(train_dfs.STAGE, ["train", "dfs_resnet20", "--device", "cpu"]).stochastic_act_rounding is False


# =========================================================================== §2-§3 the training forward


def reference_training_forward(m, x):
    """Spec §2-§3 training forward, written out: the gate recurrence, every option of every gated
    block on the whole batch in option order (skip, 8, ..., full), mixed by the straight-through mask."""
    h = m.blocks[0](m.stem(x))  # block 1 always at full precision
    hc = (x.new_zeros(len(x), 10), x.new_zeros(len(x), 10))  # state reset every forward
    decisions = []
    for j, block in enumerate(m.blocks[1:]):
        conv = m.gate_embeds[j].conv
        feat = F.conv2d(h.mean((2, 3), keepdim=True), conv.weight, conv.bias).flatten(1)
        hc = m.gate.lstm(feat, hc)
        p = F.softmax(F.linear(hc[0], m.gate.proj.weight, m.gate.proj.bias), -1)
        mask = F.one_hot(p.argmax(-1), len(m.options)).to(p.dtype) - p.detach() + p
        candidates = [block.shortcut(h) if o == "skip" else block(h, None if o == "full" else o)
                      for o in m.options]
        h = sum(mask[:, k].view(-1, 1, 1, 1) * c for k, c in enumerate(candidates))
        decisions.append(mask)
    return m.fc(h.mean((2, 3))), torch.stack(decisions, 1)


@pytest.mark.parametrize("execution", ["dynamic", "mixed"])
def test_training_forward_matches_the_spec_written_out(execution):
    """§2-§3: outputs, gradients of every parameter, and every buffer after one training step
    (BN running statistics folded once per option *in option order*, range buffers) equal the
    written-out reference. Float64, so that order and missing terms show far above rounding."""
    torch.manual_seed(0)
    m = DFSResNet(20).to(DEVICE, torch.float64)
    m.train()
    m(images(8, seed=2, dtype=torch.float64))  # non-trivial BN and range buffers to start from
    spread_gate(m)
    ref = copy.deepcopy(m)
    x, y = images(8, seed=3, dtype=torch.float64), torch.arange(8, device=DEVICE) % 10
    w = torch.randn(8, 8, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)

    logits, d = m(x, execution=execution)
    ref_logits, ref_d = reference_training_forward(ref, x)
    choices = d.detach().argmax(-1)
    assert len(torch.unique(choices)) >= 3  # the construction really spreads the decisions
    assert torch.equal(choices, ref_d.detach().argmax(-1))
    torch.testing.assert_close(d, ref_d, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)
    (F.cross_entropy(logits, y) + (d * w).sum()).backward()
    (F.cross_entropy(ref_logits, y) + (ref_d * w).sum()).backward()
    ref_params = dict(ref.named_parameters())
    for name, p in m.named_parameters():
        assert (p.grad is None) == (ref_params[name].grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-7, atol=1e-10, msg=name)
    assert m.gate.proj.bias.grad.abs().sum() > 0
    ref_buffers = dict(ref.named_buffers())
    for name, buf in m.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], rtol=1e-10, atol=1e-12, msg=name)


# =========================================================================== §5 the loss


def budget(target, beta):
    return losses.budget_loss(argparse.Namespace(target_cp=target, cost_weight=beta))


@pytest.fixture(scope="module")
def paper_model():
    return DFSResNet(20, options="paper").to(DEVICE)  # 8 gated blocks, options skip, 8, 16, full


# (choices per sample and gated block, target, expected computation %, expected C, expected sign)
#   all full: C = 2 samples * 8 blocks = 16, cp 100; all 8-bit: C = 16/16 = 1, cp 6.25;
#   all 16-bit: C = 16/4 = 4, cp 25; mixed: sample 0 four full + four skip (4), sample 1 all
#   16-bit (2): C = 6, cp = 100 * 6 / 16 = 37.5
FULL8, BIT8, BIT16 = [[3] * 8] * 2, [[1] * 8] * 2, [[2] * 8] * 2
MIXED = [[3, 0, 3, 0, 3, 0, 3, 0], [2] * 8]
BUDGET_CASES = [
    ("all full above 50", FULL8, 50.0, 100.0, 16.0, +1),
    ("all full at 100 (stage 2)", FULL8, 100.0, 100.0, 16.0, -1),
    ("all 8-bit below 50", BIT8, 50.0, 6.25, 1.0, -1),
    ("all 16-bit at 25", BIT16, 25.0, 25.0, 4.0, -1),
    ("all 16-bit above 24.99", BIT16, 24.99, 25.0, 4.0, +1),
    ("mixed above 37.4", MIXED, 37.4, 37.5, 6.0, +1),
    ("mixed at 37.5", MIXED, 37.5, 37.5, 6.0, -1),
    ("mixed below 37.6", MIXED, 37.6, 37.5, 6.0, -1),
]


@pytest.mark.parametrize("choices,target,cp,cost,sign", [c[1:] for c in BUDGET_CASES],
                         ids=[c[0] for c in BUDGET_CASES])
def test_budget_loss_is_ce_plus_signed_beta_c(paper_model, choices, target, cp, cost, sign):
    """§5: loss - CE = +beta*C above the target, -beta*C below it *or exactly at it*."""
    beta = 0.5
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    y = torch.tensor([3, 7], device=DEVICE)
    d = onehot(choices, 4)
    loss, got_cp = budget(target, beta)(logits, d, y, paper_model)
    assert got_cp.item() == cp  # exact: dyadic costs
    ce = F.cross_entropy(logits, y)
    assert (loss - ce).item() == pytest.approx(sign * beta * cost, rel=1e-6)


def test_budget_penalty_is_a_sum_over_the_batch(paper_model):
    """§5: C sums over samples (not a mean): the same per-sample choices twice doubles beta*C."""
    loss_fn, y = budget(50.0, 0.5), torch.tensor([1, 2, 1, 2], device=DEVICE)
    logits = torch.zeros(4, 10, device=DEVICE)
    one, _ = loss_fn(logits[:2], onehot(MIXED, 4), y[:2], paper_model)
    two, _ = loss_fn(logits, onehot(MIXED + MIXED, 4), y, paper_model)
    ce = math.log(10)  # uniform logits
    assert one.item() - ce == pytest.approx(-0.5 * 6, rel=1e-6)
    assert two.item() - ce == pytest.approx(-0.5 * 12, rel=1e-6)


def as_processes(monkeypatch, loss_fn, slices):
    """Each slice's loss as one of W = len(slices) processes would compute it, in this process.

    `distributed.all_sum` sums what every process passed at that call: a first pass records each
    process's inputs (in the loss they depend on local data only), a second returns their sums.
    """
    monkeypatch.setattr(engine.distributed, "world_size", lambda: len(slices))
    sent = []
    for args in slices:  # pass 1: what each process would contribute, call by call
        sent.append([])
        monkeypatch.setattr(engine.distributed, "all_sum", lambda t, log=sent[-1]: log.append(t.detach().clone()) or t.clone())
        loss_fn(*args)
    results = []
    for args in slices:  # pass 2: every process receives the same sums
        calls = iter(range(len(sent[0])))

        def all_sum(t):
            k = next(calls)
            return sum(log[k] for log in sent)
        monkeypatch.setattr(engine.distributed, "all_sum", all_sum)
        results.append(loss_fn(*args))
    return results


@pytest.mark.parametrize("target", [10.0, 90.0])
def test_budget_loss_over_processes_averages_to_the_global_batch_loss(paper_model, monkeypatch, target):
    """§5 under DDP: W processes on unequal slices (3 and 5 samples). DDP averages their
    gradients, so the mean of their losses must have the gradient of the one-process loss of
    the whole batch (CE mean + beta*s*C, s from the global computation percentage), and every
    process must report the global computation percentage."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 10, generator=g).to(DEVICE).requires_grad_()
    z = (3 * torch.randn(8, 8, 4, generator=g)).to(DEVICE).requires_grad_()
    y = torch.randint(0, 10, (8,), generator=g).to(DEVICE)
    loss_fn = budget(target, 0.25)

    def decisions(rows):
        p = z[rows].softmax(-1)
        return F.one_hot(p.argmax(-1), 4).to(p.dtype) - p.detach() + p
    ref_loss, ref_cp = loss_fn(logits, decisions(slice(0, 8)), y, paper_model)
    assert 10 < ref_cp.item() < 90  # the two targets give the two signs
    ref_grads = torch.autograd.grad(ref_loss, (logits, z))
    slices = [(logits[rows], decisions(rows), y[rows], paper_model) for rows in (slice(0, 3), slice(3, 8))]
    results = as_processes(monkeypatch, loss_fn, slices)
    assert all(cp.item() == pytest.approx(ref_cp.item(), rel=1e-6) for _, cp in results)
    mean_loss = sum(loss for loss, _ in results) / len(results)
    for got, ref in zip(torch.autograd.grad(mean_loss, (logits, z)), ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("target,sign", [(10.0, +1), (90.0, -1)])
def test_budget_gradient_reaches_the_gate_through_the_straight_through_softmax(paper_model, target, sign):
    """§3/§5: the penalty's gradient on the gate's logits z, worked out by hand.

    mask = onehot(argmax p) - p.detach() + p with p = softmax(z), so d(beta*s*sum mask.cost)/dz
    = beta * s * p * (cost - sum_j p_j cost_j). The class logits are a separate leaf: the CE
    contributes nothing to z's gradient.
    """
    beta = 0.25
    g = torch.Generator().manual_seed(1)
    z = (3 * torch.randn(3, 8, 4, generator=g)).to(DEVICE).requires_grad_()
    class_logits = torch.randn(3, 10, generator=g).to(DEVICE).requires_grad_()
    p = z.softmax(-1)
    mask = F.one_hot(p.argmax(-1), 4).to(p.dtype) - p.detach() + p
    loss, cp = budget(target, beta)(class_logits, mask, torch.tensor([0, 1, 2], device=DEVICE), paper_model)
    assert 10 < cp.item() < 90  # so the two targets give the two signs
    loss.backward()
    costs = option_costs(PAPER).to(DEVICE)
    pd = p.detach()
    expected = beta * sign * pd * (costs - (pd * costs).sum(-1, keepdim=True))
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-8)
    assert z.grad.abs().max() > 1e-3


def test_budget_penalty_alone_drives_the_real_gate(paper_model):
    """On a real training forward: d(loss - CE)/d(probs of the last gated block) = beta*s*cost.

    The last block's probabilities reach (loss - CE) only through the penalty (their effect on
    the logits cancels with the CE), so their gradient is the cost table, signed and scaled.
    """
    m = copy.deepcopy(paper_model)
    spread_gate(m)
    m.train()
    probs = []
    real_forward = m.gate.forward

    def recording_forward(feat, state):
        p, hard, state = real_forward(feat, state)
        p.retain_grad()
        probs.append(p)
        return p, hard, state
    m.gate.forward = recording_forward
    x, y = images(4), torch.tensor([0, 1, 2, 3], device=DEVICE)
    beta, signs = 0.5, set()
    for target in (0.5, 100.0):  # one computation percentage, above the first and at/below the second
        probs.clear()
        m.zero_grad(set_to_none=True)
        logits, d = m(x)
        loss, cp = budget(target, beta)(logits, d, y, m)
        sign = 1.0 if cp.item() > target else -1.0
        signs.add(sign)
        (loss - F.cross_entropy(logits, y)).backward()
        assert len(probs) == 8 and probs[-1].grad is not None
        torch.testing.assert_close(probs[-1].grad, (beta * sign * m.option_costs).expand(4, 4),
                                   rtol=1e-5, atol=1e-7)
        assert m.gate.proj.bias.grad is not None and m.gate.proj.bias.grad.abs().sum() > 0
    assert signs == {1.0, -1.0}


# =========================================================================== §6 defaults and schedule


@pytest.mark.parametrize("stage,lr,iters,target", [("base", 0.1, 64000, None), ("gate_init", 0.01, 2000, 100.0),
                                                   ("dfs", 0.01, 64000, 50.0)])
def test_stage_defaults_are_the_released_ones(stage, lr, iters, target):
    """§5-§6: lr, iterations, target, beta, batch 128, SGD momentum 0.9, wd 1e-4, steps 32k/48k, fp32."""
    a = settings.parse_args(STAGES[stage], ["train", ARCH[stage], "--device", "cpu"])
    assert (a.lr, a.iters, a.batch_size) == (lr, iters, 128)
    assert (a.momentum, a.weight_decay, a.step_ratio, a.lr_steps) == (0.9, 1e-4, 0.1, [32000, 48000])
    assert a.warm_up is False and a.tf32 is False
    if target is None:
        assert not hasattr(a, "target_cp")
    else:
        assert (a.target_cp, a.cost_weight, a.options) == (target, 1e-5, None)
        alias = settings.parse_args(STAGES[stage], ["train", ARCH[stage], "--device", "cpu",
                                                  "--minimum", "30", "--beta", "2e-5"])
        assert (alias.target_cp, alias.cost_weight) == (30.0, 2e-5)
    assert STAGES["gate_init"].parent == "base" and STAGES["dfs"].parent == "gate_init"


@pytest.mark.parametrize("stage", list(STAGES))
def test_learning_rate_at_every_boundary(stage):
    """§6: x0.1 at 32k and at 48k (step = iterations already done, as the released code's _iter)."""
    a = settings.parse_args(STAGES[stage], ["train", ARCH[stage], "--device", "cpu"])
    lr = a.lr
    expected = {0: lr, 1: lr, 399: lr, 400: lr, 31999: lr, 32000: lr / 10, 32001: lr / 10,
                47999: lr / 10, 48000: lr / 100, 48001: lr / 100, 63999: lr / 100}
    for step, value in expected.items():
        assert engine.learning_rate(a, step) == pytest.approx(value, rel=1e-12), step


@pytest.mark.parametrize("stage,lr", [("base", None), ("gate_init", 0.05), ("dfs", 0.05)])
def test_warm_up_is_lr_0_01_for_the_first_400_iterations(stage, lr):
    """§6: --warm-up gives lr 0.01 for iterations 0..399, then the schedule (stages 2-3 default to
    0.01 already, so a visible lr is set there)."""
    argv = ["train", ARCH[stage], "--device", "cpu", "--warm-up"] + (["--lr", str(lr)] if lr else [])
    a = settings.parse_args(STAGES[stage], argv)
    lr = a.lr
    assert lr != 0.01
    for step, value in {0: 0.01, 398: 0.01, 399: 0.01, 400: lr, 401: lr, 32000: lr / 10}.items():
        assert engine.learning_rate(a, step) == pytest.approx(value, rel=1e-12), step


def test_step_ratio_is_honoured():
    a = settings.parse_args(STAGES["base"], ["train", "resnet20", "--device", "cpu", "--step-ratio", "0.5",
                                           "--lr-steps", "10", "20", "30"])
    assert [engine.learning_rate(a, s) for s in (9, 10, 20, 29, 30)] == pytest.approx([0.1, 0.05, 0.025, 0.025, 0.0125])


# =========================================================================== §6 data


def test_normalisation_constants_are_the_released_ones():
    """§6: CIFAR-10 mean/std (also used by the authors for CIFAR-100 and SVHN); Fashion-MNIST's own."""
    cifar = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    for name in ("cifar10", "cifar100", "svhn"):
        assert data.MEAN_STD[name] == cifar, name
    # Fashion-MNIST's training set (not MNIST's 0.1307 / 0.3081)
    assert data.MEAN_STD["fashion-mnist"] == ((0.2860,) * 3, (0.3530,) * 3)


def fashion_train_images():
    for name in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"):
        path = data.FASHION_SYSTEM_DIR / name
        if path.is_file():
            return data.read_idx(path, 2051)
    pytest.skip("Debian's dataset-fashion-mnist is not installed")


def test_fashion_mnist_constants_recomputed_from_the_training_files():
    """The constants are the mean and std of the raw 28x28 training pixels, to 4 decimals."""
    x = fashion_train_images()
    assert x.shape == (60000, 28, 28)
    counts = torch.bincount(x.flatten(), minlength=256).double()  # exact, and light on memory
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum()
    mean_ = (counts * values).sum() / n
    std_ = ((counts * (values - mean_) ** 2).sum() / (n - 1)).sqrt()
    mean, std = data.MEAN_STD["fashion-mnist"]
    assert (round(mean_.item(), 4), round(std_.item(), 4)) == (mean[0], std[0]) == (0.2860, 0.3530)


def test_every_dataset_is_normalised_with_its_own_constants(tmp_path):
    """build_batches and test_batches normalise with MEAN_STD[name], train and eval alike."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for stem, n in (("train", 4), ("t10k", 3)):
        x = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        header = (2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
        (folder / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + x.numpy().tobytes()))
        labels = (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(range(n))
        (folder / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    train, ev, _ = data.build_batches("fashion-mnist", tmp_path, 2)
    test = data.test_batches("fashion-mnist", tmp_path, 2)
    for b in (train, ev, test):
        assert b.mean.flatten().tolist() == pytest.approx([0.2860] * 3)
        assert b.std.flatten().tolist() == pytest.approx([0.3530] * 3)
    raw = test.images[:2]
    expected = (raw.float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(next(iter(test))[0], expected)


def test_crop_offsets_cover_0_to_8_and_flip_rate_is_one_half():
    """§6: random crop 32 from the 4-padded image (offsets 0..8 on both axes, uniform) and
    horizontal flip with probability 0.5, within 5 standard errors on 18,000 draws."""
    n = 18000
    batches = data.Batches(torch.zeros(n, 3, 1, 1, dtype=torch.uint8), torch.zeros(n, dtype=torch.long), 64,
                           (0.5,) * 3, (0.25,) * 3, train=True, seed=0)
    _, dx, dy, flip = batches.epoch_plan(0)
    p, tol = 1 / 9, 5 * math.sqrt(1 / 9 * 8 / 9 / n)
    for offsets in (dx, dy):
        counts = torch.bincount(offsets, minlength=10)
        assert offsets.min() == 0 and offsets.max() == 8
        assert ((counts[:9].double() / n - p).abs() < tol).all(), counts
    assert not torch.equal(dx, dy)  # two independent draws
    assert abs(flip.double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n)


# =========================================================================== §8 non-finite loss


def tiny_run(lr=0.5):
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return types.SimpleNamespace(model=model, wrapped=model, forward_kwargs={}, optimizer=optimizer, step=0, folder="nowhere")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
def test_a_non_finite_loss_raises_before_the_step(bad):
    """NaN, +inf and -inf all stop training before the weights move."""
    run = tiny_run()
    before = run.model.weight.detach().clone()
    x, y = torch.ones(4, 3), torch.zeros(4, dtype=torch.long)

    def bad_loss(logits, decisions, target, model):
        return F.cross_entropy(logits, target) * 0 + bad, None
    with pytest.raises(engine.TrainingError, match="non-finite loss at iteration 1; no checkpoint was saved yet"):
        engine.train_step(run, bad_loss, x, y)
    assert torch.equal(run.model.weight, before)


def test_a_non_finite_loss_names_the_checkpoint_that_is_kept(tmp_path):
    """The message names the run's last checkpoint when one exists (latest before best)."""
    run = tiny_run()
    run.folder, run.step = str(tmp_path), 7
    (tmp_path / "model_best.pth.tar").write_bytes(b"")
    x, y = torch.ones(4, 3), torch.zeros(4, dtype=torch.long)

    def bad_loss(logits, decisions, target, model):
        return F.cross_entropy(logits, target) * float("nan"), None
    for name in ("model_best.pth.tar", "checkpoint_latest.pth.tar"):
        (tmp_path / name).write_bytes(b"")
        kept = f"the last checkpoint, {tmp_path / name}, is kept"
        with pytest.raises(engine.TrainingError, match=f"non-finite loss at iteration 8; {re.escape(kept)}"):
            engine.train_step(run, bad_loss, x, y)


def test_a_training_step_calls_the_model_with_the_runs_forward_arguments():
    """--execution reaches the training forward (through DDP's wrapper, here the model itself)."""
    run, seen = tiny_run(), []
    model = run.model
    run.wrapped, run.forward_kwargs = lambda x, **kw: seen.append(kw) or model(x), {"execution": "mixed"}
    engine.train_step(run, lambda logits, decisions, target, model: (logits.sum(), None), torch.ones(2, 3), None)
    assert seen == [{"execution": "mixed"}]


def test_a_finite_loss_takes_one_sgd_step_on_fresh_gradients():
    """The positive control: each step uses that step's gradient only (zeroed in between)."""
    run = tiny_run(lr=0.5)
    w0 = run.model.weight.detach().clone()
    x = torch.tensor([[1.0, 2.0, 3.0]])

    def loss_fn(logits, decisions, target, model):  # d/dw of sum(w x) = x for every row
        return logits.sum(), None
    engine.train_step(run, loss_fn, x, None)
    engine.train_step(run, loss_fn, x, None)
    torch.testing.assert_close(run.model.weight, w0 - 2 * 0.5 * x.expand(2, 3))


# =========================================================================== §6 stages 2 and 3, end to end


@pytest.fixture(scope="module")
def small_synthetic():
    """The synthetic dataset shrunk to 64 training and 40 test images, one thread."""
    with shrink_synthetic(64, 40):
        yield


class Recorder:
    """Records, during engine.main, the optimizer built, the model trained and the lr of each step."""

    def __init__(self, monkeypatch):
        self.optimizers, self.lrs, self.models = [], [], []
        rec = self

        class RecordingSGD(torch.optim.SGD):
            def __init__(self, params, **kwargs):
                super().__init__(params, **kwargs)
                rec.optimizers.append((self, kwargs))
        real_step = engine.train_step

        def step(run, loss_fn, x, y):
            if not rec.lrs:  # the weights the run starts from
                rec.initial = {k: v.clone() for k, v in run.model.state_dict().items()}
            rec.lrs.append(run.optimizer.param_groups[0]["lr"])
            rec.models.append(run.model)
            return real_step(run, loss_fn, x, y)
        monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
        monkeypatch.setattr(engine, "train_step", step)


def run_stage(stage, save, extra, monkeypatch):
    rec = Recorder(monkeypatch)
    argv = ["train", ARCH[stage], "--dataset", "synthetic", "--batch-size", "16", "--device", "cpu",
            "--save-folder", str(save), "--data-dir", str(Path(save) / "data"), "--eval-every", "100",
            *map(str, extra)]
    assert engine.main(STAGES[stage], argv) == 0
    ckpt = torch.load(Path(save) / ARCH[stage] / "checkpoint_latest.pth.tar", weights_only=True)
    return rec, ckpt


@pytest.fixture(scope="module")
def stage1_checkpoint(small_synthetic, tmp_path_factory):
    save = tmp_path_factory.mktemp("stage1")
    with pytest.MonkeyPatch.context() as mp:
        run_stage("base", save, ["--iters", "2"], mp)
    return save / "resnet20" / "checkpoint_latest.pth.tar"


def is_gate(name):
    return name.startswith(("gate.", "gate_embeds."))


def test_stage2_trains_the_gate_only(stage1_checkpoint, tmp_path, monkeypatch):
    """§6 stage 2: backbone frozen bit for bit, gate moved, optimizer over the gate only, and the
    model in train mode so BN and activation-range statistics keep updating (released behaviour).
    Also: the lr each step used (--lr-steps 1 2), SGD's hyperparameters, and TF32 switched off."""
    before = torch.load(stage1_checkpoint, weights_only=True)["model"]
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # restored by conftest
    rec, ckpt = run_stage("gate_init", tmp_path, ["--resume", stage1_checkpoint, "--iters", "3",
                                                  "--options", "skip,8,full", "--lr-steps", "1", "2"], monkeypatch)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32  # §8: fp32
    after, model = ckpt["model"], rec.models[-1]
    params = dict(model.named_parameters())
    backbone = [n for n in params if not is_gate(n)]
    gate = [n for n in params if is_gate(n)]
    assert backbone and gate
    for name in backbone:
        assert torch.equal(after[name], before[name]), name
        assert not params[name].requires_grad, name  # frozen, not just left out of the optimizer
    unmoved = [n for n in gate if torch.equal(after[n], rec.initial[n])]
    assert not unmoved, unmoved  # every gate parameter trained
    # the optimizer holds exactly the gate's parameters, with SGD's released hyperparameters
    (optimizer, kwargs), = rec.optimizers
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(params[n]) for n in gate}
    assert (kwargs["momentum"], kwargs["weight_decay"]) == (0.9, 1e-4)
    assert optimizer.param_groups[0]["nesterov"] is False and optimizer.param_groups[0]["dampening"] == 0
    assert rec.lrs == pytest.approx([0.01, 0.001, 0.0001])
    # BN running statistics and the range buffers of the quantized convs did update
    for name in after:
        if name.endswith(("running_mean", "running_var")):
            assert not torch.equal(after[name], before[name]), name
        if name.endswith("num_batches_tracked"):
            assert after[name] > before[name], name
    for i, block in enumerate(model.blocks):
        for conv in ("conv1", "shortcut_conv"):
            key = f"blocks.{i}.{conv}.running_max"
            if key in after:
                assert before[key] == 0 and (after[key] > 0) == (i > 0), key  # block 1 never quantized


def test_stage3_trains_everything(stage1_checkpoint, tmp_path, monkeypatch):
    """§6 stage 3: starts from the stage-2 weights and buffers; the optimizer holds every parameter."""
    _, stage2 = run_stage("gate_init", tmp_path / "s2", ["--resume", stage1_checkpoint, "--iters", "1",
                                                         "--options", "skip,8,full"], monkeypatch)
    monkeypatch.undo()
    stage2_path = tmp_path / "s2" / "dfs_resnet20" / "checkpoint_latest.pth.tar"
    rec, ckpt = run_stage("dfs", tmp_path / "s3", ["--resume", stage2_path, "--iters", "1"], monkeypatch)
    assert rec.initial.keys() == stage2["model"].keys()
    for name, value in stage2["model"].items():
        assert torch.equal(rec.initial[name], value), name
    (optimizer, kwargs), = rec.optimizers
    model = rec.models[-1]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert all(p.requires_grad for p in model.parameters())
    assert rec.lrs == [0.01]
    changed = [n for n, v in ckpt["model"].items() if not torch.equal(v, stage2["model"][n])]
    assert "fc.weight" in changed and "conv1.weight" in changed and "gate.proj.bias" in changed
