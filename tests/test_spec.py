"""Tests that pin the rules of ../shared/spec/dfs.md that no other test file pins (issue #12).

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
import os
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import engine
import train_base
import train_dfs
import train_gate_init
from models import build_model
from models.cost import option_costs
from models.dfs_resnet import DFSResNet
from models.resnet import CifarResNet, init_weights
from quantize import QConv2d, fake_quantize

DEVICE = os.environ.get("TEST_DEVICE", "cpu")
STAGES = {"base": train_base.STAGE, "gate_init": train_gate_init.STAGE, "dfs": train_dfs.STAGE}
ARCH = {"base": "resnet20", "gate_init": "dfs_resnet20", "dfs": "dfs_resnet20"}
PAPER = ("skip", 8, 16, "full")  # costs 0, 1/16, 1/4, 1: every percentage below is exact in fp32


def images(b, seed=1, dtype=torch.float32):
    """A batch whose samples differ in scale (so the gate and the ranges see different samples)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 2.0, b).view(b, 1, 1, 1)
    return (torch.randn(b, 3, 32, 32, generator=g) * scale).to(DEVICE, dtype)


def onehot(choices, num_options):
    """[B, G] option indices -> [B, G, O] float one-hot decisions."""
    return F.one_hot(torch.tensor(choices), num_options).float().to(DEVICE)


def randomize_bn(model, seed=5):
    """Non-trivial BN affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def spread_gate(model, seed=7):
    """Make the gate's choices depend strongly on the sample (big embeddings, random head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in model.gate_embeds:
            e.conv.weight.mul_(10)
        model.gate.proj.weight.copy_(torch.randn(model.gate.proj.weight.shape, generator=g) * 3)
        model.gate.proj.bias.zero_()


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
    assert engine.parse_args(train_dfs.STAGE, ["train", "dfs_resnet20", "--device", "cpu"]).stochastic_act_rounding is False


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
