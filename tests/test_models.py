"""Tests of the CIFAR ResNet backbone, the gate and the DFS network (docs/spec.md §1, §3, §5)."""
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import quantize
from models import MODELS, build_model, resolve_name
from models import dfs_resnet as dfs_module
from models.cost import cost_penalty
from models.dfs_resnet import DFSResNet
from models.resnet import CifarResNet
from quantize import QConv2d

from helpers import DEVICE, images, randomize_bn, spread_gate

DEFAULT_OPTIONS = ("skip", 8, 10, 12, 14, 16, "full")
SKIP, FULL = 0, 6  # indices in the default option list


def build(name, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(name, **kw).to(DEVICE)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def force_gate(model, k, logit=5.0):
    """Every sample chooses option k (zero head weights, bias favouring k)."""
    with torch.no_grad():
        model.gate.proj.weight.zero_()
        model.gate.proj.bias.zero_()
        model.gate.proj.bias[k] = logit


# --------------------------------------------------------------------------- parameter counts


def plain_param_count(depth, classes=10):
    """Independent count of a clean CIFAR ResNet (3x3 convs, BN pairs, projection shortcuts)."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem conv + BN
    cin = 16
    for w in (16, 32, 64):
        for i in range(n):
            total += cin * w * 9 + 2 * w + w * w * 9 + 2 * w
            if cin != w:
                total += cin * w + 2 * w  # 1x1 projection + its BN
            cin = w
    return total + 64 * classes + classes


def gate_param_count(depth, num_options=7):
    """Embeddings of blocks 0..3n-2 (channels*10 + 10), LSTMCell(10, 10), Linear(10, options)."""
    n = (depth - 2) // 6
    widths = [16] * n + [32] * n + [64] * n
    embeds = sum(c * 10 + 10 for c in widths[:-1])
    lstm = 4 * 10 * 10 * 2 + 4 * 10 * 2  # W_ih, W_hh, b_ih, b_hh = 880
    return embeds + lstm + 10 * num_options + num_options


@pytest.mark.parametrize("depth,authors_plain,authors_dfs,clean_plain", [
    (38, 565_274, 573_131, 564_122), (74, 1_149_914, 1_164_671, 1_147_418)])
def test_param_counts_of_built_models_against_spec(depth, authors_plain, authors_dfs, clean_plain):
    """Spec §1's counts, on built models: the clean backbone, and the gate as the authors' DFS net
    minus their backbone, less their extra (unused) 64-channel embedding of the last block (650)."""
    plain, dfs = CifarResNet(depth), DFSResNet(depth)
    assert n_params(plain) == clean_plain
    assert n_params(dfs) - n_params(plain) == authors_dfs - authors_plain - 650
    # the helpers used below agree with the spec's figures too
    assert plain_param_count(depth) == clean_plain
    assert gate_param_count(depth) == authors_dfs - authors_plain - 650
    gate_only = sum(p.numel() for name, p in dfs.named_parameters() if name.startswith(("gate.", "gate_embeds.")))
    assert gate_only == gate_param_count(depth)
    assert n_params(dfs.gate.lstm) == 880
    assert len(dfs.gate_embeds) == len(dfs.blocks) - 1


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_param_counts_other_depths(depth):
    assert n_params(CifarResNet(depth, num_classes=100)) == plain_param_count(depth, 100)
    assert n_params(DFSResNet(depth, options="paper")) == plain_param_count(depth) + gate_param_count(depth, 4)


# --------------------------------------------------------------------------- architecture details


def test_architecture_structure():
    m = CifarResNet(38)
    n = 6
    assert len(m.blocks) == 3 * n
    assert isinstance(m.conv1, nn.Conv2d) and not isinstance(m.conv1, QConv2d)  # stem never quantized
    assert m.conv1.bias is None and m.conv1.kernel_size == (3, 3)
    projections = [i for i, b in enumerate(m.blocks) if b.projection]
    assert projections == [n, 2 * n]
    for i in projections:
        b = m.blocks[i]
        assert b.conv1.stride == (2, 2) and b.shortcut_conv.kernel_size == (1, 1)
        assert b.shortcut_conv.stride == (2, 2) and b.shortcut_conv.bias is None
        assert isinstance(b.shortcut_conv, QConv2d) and isinstance(b.shortcut_bn, nn.BatchNorm2d)
    for b in m.blocks:
        assert isinstance(b.conv1, QConv2d) and isinstance(b.conv2, QConv2d)
        assert b.conv1.bias is None and b.conv2.bias is None
    assert m.fc.in_features == 64 and m.fc.out_features == 10
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)


def bn(t, mod):
    """Eval-mode batch norm with `mod`'s statistics, written out."""
    return F.batch_norm(t, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps)


def test_plain_forward_by_hand():
    """CifarResNet.forward equals the spec's block structure written out with functional ops."""
    m = build("resnet20")
    randomize_bn(m)
    m.eval()
    x = images(3)

    with torch.no_grad():
        h = F.relu(bn(F.conv2d(x, m.conv1.weight, padding=1), m.bn1))
        for b in m.blocks:
            s = b.conv1.stride
            out = F.relu(bn(F.conv2d(h, b.conv1.weight, stride=s, padding=1), b.bn1))
            out = bn(F.conv2d(out, b.conv2.weight, padding=1), b.bn2)
            sc = bn(F.conv2d(h, b.shortcut_conv.weight, stride=s), b.shortcut_bn) if b.projection else h
            h = F.relu(out + sc)
        assert h.shape[-2:] == (8, 8)
        expected = F.linear(F.avg_pool2d(h, 8).flatten(1), m.fc.weight, m.fc.bias)
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", list(MODELS))
def test_registry_builds_and_runs(name):
    m = build(name)
    assert isinstance(m, DFSResNet if name.startswith("dfs_") else CifarResNet)
    x = images(2)
    m.eval()  # eval: cheap (dynamic execution); backward through the executed path
    out = m(x)
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert m.fc.weight.grad is not None and m.fc.weight.grad.abs().sum() > 0
    if isinstance(out, tuple):
        depth = int(name.removeprefix("dfs_resnet"))
        assert out[1].shape == (2, 3 * ((depth - 2) // 6) - 1, 7)


@pytest.mark.parametrize("name", ["resnet20", "resnet38", "dfs_resnet20"])
def test_registry_train_backward(name):
    m = build(name)
    m.train()
    out = m(images(2))
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 3], device=DEVICE)).backward()
    for name_, p in m.named_parameters():
        assert p.grad is not None, name_
        assert torch.isfinite(p.grad).all(), name_
    assert m.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("alias,canonical,classes", [
    ("cifar10_resnet_38", "resnet38", 10),
    ("cifar100_resnet_74", "resnet74", 100),
    ("cifar10_rnn_gate_38", "dfs_resnet38", 10),
    ("cifar100_rnn_gate_74", "dfs_resnet74", 100),
    ("cifar10_resnet_31", "resnet32", 10),  # the authors' "31" is ResNet-32
])
def test_aliases(alias, canonical, classes):
    assert resolve_name(alias) == (canonical, classes)
    m = build_model(alias)
    assert m.fc.out_features == classes
    assert m.depth == int(canonical.removeprefix("dfs_").removeprefix("resnet"))
    assert isinstance(m, DFSResNet) == canonical.startswith("dfs_")
    assert models.is_gated(alias) == canonical.startswith("dfs_")


def test_alias_class_conflict_and_num_classes():
    with pytest.raises(ValueError):
        build_model("cifar10_resnet_38", num_classes=100)
    assert build_model("resnet20", num_classes=100).fc.out_features == 100
    assert build_model("resnet20").fc.out_features == 10
    with pytest.raises(ValueError):
        build_model("resnet20", options="paper")  # options only make sense for DFS


@pytest.mark.parametrize("name", ["resnet39", "dfs_resnet", "cifar10_resnet_39", "cifar10_lstm_38", "vgg16", ""])
def test_unknown_name(name):
    with pytest.raises(ValueError) as err:
        build_model(name)
    msg = str(err.value)
    for valid in ("resnet20", "resnet38", "resnet110", "dfs_resnet38", "dfs_resnet74"):
        assert valid in msg


# --------------------------------------------------------------------------- decisions


@pytest.mark.parametrize("depth,gated", [(38, 17), (74, 35)])
def test_decisions_shape_one_hot_eval(depth, gated):
    m = build(f"dfs_resnet{depth}")
    m.eval()
    with torch.no_grad():
        logits, d = m(images(3))
    assert logits.shape == (3, 10)
    assert d.shape == (3, gated, 7) and d.dtype == logits.dtype  # float, as in training
    assert torch.all((d == 0) | (d == 1))
    assert torch.all(d.sum(-1) == 1)


def test_decisions_one_hot_train_with_straight_through():
    m = build("dfs_resnet20")
    m.train()
    logits, d = m(images(4))
    assert d.shape == (4, 8, 7)
    assert d.requires_grad
    torch.testing.assert_close(d.sum(-1), torch.ones(4, 8, device=DEVICE), rtol=0, atol=1e-6)
    rounded = d.detach().round()
    torch.testing.assert_close(d.detach(), rounded, rtol=0, atol=1e-6)
    assert torch.all((rounded == 0) | (rounded == 1))


def test_gate_straight_through_values_and_gradient():
    gate = models.gate.LSTMGate(5).to(DEVICE)
    gate.train()
    torch.manual_seed(0)
    feat = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    probs, hard, (h, c) = gate(feat, gate.init_state(6, DEVICE))
    torch.testing.assert_close(probs.sum(-1), torch.ones(6, device=DEVICE))
    onehot = F.one_hot(probs.argmax(-1), 5).float()
    torch.testing.assert_close(hard, onehot, rtol=0, atol=1e-6)
    # gradient of hard is that of probs
    g = torch.randn(6, 5, device=DEVICE)
    (ga,) = torch.autograd.grad(hard, feat, g, retain_graph=True)
    (gb,) = torch.autograd.grad(probs, feat, g)
    torch.testing.assert_close(ga, gb)
    assert h.shape == (6, 10) and c.shape == (6, 10)


def test_gate_matches_hand_written_recurrence():
    """Decision for block j+1 from block j's output: pool -> 1x1 conv -> LSTM (state carried) -> linear."""
    m = build("dfs_resnet20").double()  # float64: per-sample reruns are exact enough
    randomize_bn(m)
    spread_gate(m)
    m.eval()
    x = images(6).double()
    with torch.no_grad():
        logits, d = m(x)
        lstm = m.gate.lstm
        h = torch.zeros(6, 10, device=DEVICE, dtype=torch.float64)
        c = torch.zeros(6, 10, device=DEVICE, dtype=torch.float64)
        feat = m.blocks[0](m.stem(x))
        choices = []
        for j, block in enumerate(m.blocks[1:]):
            conv = m.gate_embeds[j].conv  # embedding of the previous block's output
            e = F.conv2d(feat.mean((2, 3), keepdim=True), conv.weight, conv.bias).flatten(1)
            gates = e @ lstm.weight_ih.T + lstm.bias_ih + h @ lstm.weight_hh.T + lstm.bias_hh
            i, f, gg, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(c)
            choice = (h @ m.gate.proj.weight.T + m.gate.proj.bias).argmax(1)
            choices.append(choice)
            feat = torch.cat([m.run_option(block, feat[s:s + 1], int(choice[s])) for s in range(6)])
        expected = m.fc(feat.mean((2, 3)))
    choices = torch.stack(choices, 1)
    assert len(torch.unique(choices)) >= 3  # the construction does spread the decisions
    assert torch.equal(d.argmax(-1), choices)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)


def test_gate_state_reset_every_forward():
    m = build("dfs_resnet20")
    spread_gate(m)
    m.eval()
    x = images(4)
    with torch.no_grad():
        a = m(x)
        m(images(7, seed=9))  # a different batch (and batch size) in between
        b = m(x)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- dynamic vs mixed


def trained_spread_dfs(dtype):
    """dfs_resnet20 after a few training steps (non-trivial BN and range buffers), gate spread, eval."""
    m = build("dfs_resnet20").to(dtype)
    m.train()
    for s in range(3):
        m(images(8, seed=10 + s).to(dtype))
    assert m.blocks[2].conv2.running_max.item() > 0  # its input is post-ReLU: min stays 0
    assert m.blocks[2].conv1.running_min.item() == 0 < m.blocks[2].conv1.running_max.item()
    assert m.blocks[4].conv1.running_max.item() > 0
    assert not torch.all(m.blocks[2].bn1.running_mean == 0)
    spread_gate(m)
    return m.eval()


def assert_spread(choices):
    # the gate really spreads: several options overall, and mixed choices within a block's batch
    assert len(torch.unique(choices)) >= 3
    assert sum(len(torch.unique(choices[:, j])) > 1 for j in range(choices.shape[1])) >= 2


def test_dynamic_equals_mixed_float64():
    """In float64 the batch-size dependence of conv kernels is far below any rounding boundary."""
    m = trained_spread_dfs(torch.float64)
    x = images(8, seed=20).double()
    with torch.no_grad():
        ld, dd = m(x)  # default: dynamic
        lm, dm = m(x, execution="mixed")
        assert_spread(dd.argmax(-1))
        assert torch.equal(dd, dm)
        torch.testing.assert_close(ld, lm, rtol=1e-10, atol=1e-10)
        # dynamic eval is per-sample: a sample alone gives its row of the batch
        for i in (0, 5):
            l1, d1 = m(x[i:i + 1])
            assert torch.equal(d1, dd[i:i + 1])
            torch.testing.assert_close(l1, ld[i:i + 1], rtol=1e-10, atol=1e-10)


def test_dynamic_equals_mixed_float32():
    """fp32: same decisions; logits equal up to an ulp-level difference of the (batch-size
    dependent) conv kernels, which a rounding boundary can turn into one quantization step."""
    m = trained_spread_dfs(torch.float32)
    x = images(8, seed=20)
    with torch.no_grad():
        ld, dd = m(x)
        lm, dm = m(x, execution="mixed")
    assert_spread(dd.argmax(-1))
    assert torch.equal(dd, dm)
    torch.testing.assert_close(ld, lm, rtol=1e-3, atol=1e-2)


def test_bad_execution_and_force_option():
    m = build("dfs_resnet20")
    with pytest.raises(ValueError, match=r"execution must be one of \('dynamic', 'mixed'\), got 'fast'"):
        m(images(2), execution="fast")
    with pytest.raises(ValueError, match=r"force_option must be in 0\.\.6, got 7"):
        m(images(2), force_option=7)
    with pytest.raises(ValueError, match=r"force_option must be in 0\.\.6, got -1"):
        m(images(2), force_option=-1)


# --------------------------------------------------------------------------- forced options


def plain_and_dfs(depth=20):
    plain = build(f"resnet{depth}", seed=0)
    randomize_bn(plain)
    dfs = build(f"dfs_resnet{depth}", seed=1)  # different init: everything must come from the load
    missing = dfs.load_backbone(plain.state_dict())
    return plain, dfs, missing


def test_load_backbone_missing_keys():
    plain, dfs, missing = plain_and_dfs(38)
    gate_keys = set(dfs.state_dict()) - set(plain.state_dict())
    assert set(missing) == gate_keys
    assert gate_keys and all(k.startswith(("gate.", "gate_embeds.")) for k in gate_keys)
    assert {"gate.lstm.weight_ih", "gate.proj.weight", "gate_embeds.0.conv.weight",
            "gate_embeds.16.conv.bias"} <= gate_keys
    for k, v in plain.state_dict().items():
        assert torch.equal(dfs.state_dict()[k], v), k


def test_load_backbone_wrong_depth():
    small = CifarResNet(20)
    dfs = DFSResNet(38)
    with pytest.raises(ValueError):
        dfs.load_backbone(small.state_dict())
    with pytest.raises(ValueError):
        DFSResNet(20).load_backbone(CifarResNet(38).state_dict())
    before = {k: v.clone() for k, v in dfs.state_dict().items()}
    with pytest.raises(ValueError):
        dfs.load_backbone(small.state_dict())
    for k, v in dfs.state_dict().items():  # a rejected state dict leaves the model untouched
        assert torch.equal(v, before[k]), k
    # extra keys are rejected too
    sd = CifarResNet(38).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError):
        dfs.load_backbone(sd)
    # a DFS state dict (gate included) loads with nothing missing
    assert DFSResNet(38).load_backbone(dfs.state_dict()) == []


def test_forced_full_equals_plain_eval():
    plain, dfs, _ = plain_and_dfs()
    plain.eval()
    dfs.eval()
    x = images(4)
    with torch.no_grad():
        expected = plain(x)
        for execution in ("dynamic", "mixed"):
            logits, d = dfs(x, execution=execution, force_option=FULL)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            assert torch.all(d.argmax(-1) == FULL) and torch.all(d.sum(-1) == 1)
            assert dfs.computation_percentage(d).item() == pytest.approx(100.0)


def test_forced_full_equals_plain_train():
    plain, dfs, _ = plain_and_dfs()
    plain.train()
    dfs.train()
    x = images(4)
    y = torch.tensor([0, 1, 2, 3], device=DEVICE)
    expected = plain(x)
    logits, _ = dfs(x, force_option=FULL)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    F.cross_entropy(expected, y).backward()
    F.cross_entropy(logits, y).backward()
    dfs_buffers = dict(dfs.named_buffers())
    for name, buf in plain.named_buffers():  # BN running stats after the step (and untouched range buffers)
        torch.testing.assert_close(dfs_buffers[name], buf, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(plain.bn1.running_mean, torch.zeros_like(plain.bn1.running_mean))
    dfs_params = dict(dfs.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(dfs_params[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_run_option_skip_single_block():
    m = build("dfs_resnet20")
    randomize_bn(m)
    m.eval()
    n = 3
    with torch.no_grad():
        x16 = torch.randn(2, 16, 32, 32, device=DEVICE)
        assert torch.equal(m.run_option(m.blocks[1], x16, SKIP), x16)
        for i, x in ((n, x16), (2 * n, torch.randn(2, 32, 16, 16, device=DEVICE))):
            b = m.blocks[i]
            assert b.projection
            bn = b.shortcut_bn
            expected = F.batch_norm(F.conv2d(x, b.shortcut_conv.weight, stride=2), bn.running_mean,
                                    bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            torch.testing.assert_close(m.run_option(b, x, SKIP), expected, rtol=1e-5, atol=1e-5)


def test_forced_skip_whole_network_by_hand():
    m = build("dfs_resnet20")
    randomize_bn(m)
    force_gate(m, FULL)  # left to itself the gate now runs everything: forcing skip must override it
    m.eval()
    x = images(3)

    with torch.no_grad():
        assert torch.all(m(x)[1].argmax(-1) == FULL)
        h = F.relu(bn(F.conv2d(x, m.conv1.weight, padding=1), m.bn1))
        b0 = m.blocks[0]
        out = bn(F.conv2d(F.relu(bn(F.conv2d(h, b0.conv1.weight, padding=1), b0.bn1)), b0.conv2.weight, padding=1), b0.bn2)
        h = F.relu(out + h)
        for b in m.blocks[1:]:
            if b.projection:
                h = bn(F.conv2d(h, b.shortcut_conv.weight, stride=2), b.shortcut_bn)
        expected = F.linear(h.mean((2, 3)), m.fc.weight, m.fc.bias)
        for execution in ("dynamic", "mixed"):
            logits, d = m(x, execution=execution, force_option=SKIP)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            assert torch.all(d.argmax(-1) == SKIP)
            assert m.computation_percentage(d).item() == 0


def test_forced_bits_differ_and_approach_full():
    """Forced 8..16-bit networks differ from each other and approach full precision as bits grow."""
    m = build("dfs_resnet20")
    m.train()
    for s in range(2):
        m(images(8, seed=30 + s))  # fill the activation-range buffers
    m.eval()
    x = images(4, seed=40)
    with torch.no_grad():
        full = m(x, force_option=FULL)[0]
        outs = {b: m(x, force_option=DEFAULT_OPTIONS.index(b))[0] for b in (8, 10, 12, 14, 16)}
    errors = [(outs[b] - full).abs().mean().item() for b in (8, 10, 12, 14, 16)]
    assert all(e > 0 for e in errors)
    assert errors[0] > errors[2] > errors[4], errors
    for b1 in outs:
        for b2 in outs:
            if b1 < b2:
                assert not torch.equal(outs[b1], outs[b2])


# --------------------------------------------------------------------------- training behaviour


def test_training_runs_every_option_on_shared_modules():
    """Spec §2: in training each option calls the shared BN and range buffers once per step."""
    m = build("dfs_resnet20")
    m.train()
    captured = {}

    def grab(mod, args):  # returns None: the block's arguments (x, bits) stay as they are
        captured.setdefault("x", args[0].detach().clone())

    m.blocks[1].register_forward_pre_hook(grab)
    m(images(4))
    b1, proj = m.blocks[1], m.blocks[3]
    assert b1.bn1.num_batches_tracked.item() == 6  # 8, 10, 12, 14, 16, full (skip uses no bn1)
    assert b1.bn2.num_batches_tracked.item() == 6
    assert proj.shortcut_bn.num_batches_tracked.item() == 7  # skip uses the shortcut too
    assert m.blocks[0].bn1.num_batches_tracked.item() == 1
    # conv1 of block 1 sees the same input under the five quantized options:
    # running = sum_{i<5} 0.9 * 0.1^i * v = (1 - 0.1^5) v
    x = captured["x"]
    v_min = x.flatten(1).min(1).values.mean()
    v_max = x.flatten(1).max(1).values.mean()
    torch.testing.assert_close(b1.conv1.running_min, (1 - 1e-5) * v_min, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b1.conv1.running_max, (1 - 1e-5) * v_max, rtol=1e-5, atol=1e-7)
    # block 0 and the stem are never quantized
    assert m.blocks[0].conv1.running_max.item() == 0


def test_batch_of_one():
    m = build("dfs_resnet20")
    m.train()
    logits, d = m(images(1))
    assert logits.shape == (1, 10) and d.shape == (1, 8, 7)
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    m.eval()
    with torch.no_grad():
        for execution in ("dynamic", "mixed"):
            logits, d = m(images(1, seed=3), execution=execution)
            assert logits.shape == (1, 10) and d.shape == (1, 8, 7) and torch.isfinite(logits).all()


def test_gate_gets_gradient_from_spec_loss():
    m = build("dfs_resnet20")
    m.train()
    x, y = images(4), torch.tensor([0, 1, 2, 3], device=DEVICE)
    logits, d = m(x)
    beta, target = 1.0, 50.0
    s = 1.0 if m.computation_percentage(d).item() > target else -1.0
    loss = F.cross_entropy(logits, y) + beta * s * cost_penalty(d, m.option_costs)
    loss.backward()
    gate_params = [(n, p) for n, p in m.named_parameters() if n.startswith(("gate.", "gate_embeds."))]
    names = {n for n, _ in gate_params}
    assert {"gate.lstm.weight_ih", "gate.lstm.weight_hh", "gate.lstm.bias_ih", "gate.lstm.bias_hh",
            "gate.proj.weight", "gate.proj.bias"} <= names
    assert sum(n.startswith("gate_embeds.") for n in names) == 2 * 8
    for n, p in gate_params:
        assert p.grad is not None, n
        assert p.grad.abs().sum() > 0, n
        assert torch.isfinite(p.grad).all(), n


def test_cost_term_alone_drives_gate():
    """The penalty's gradient reaches the gate head even without the cross-entropy."""
    m = build("dfs_resnet20")
    m.train()
    _, d = m(images(4))
    cost_penalty(d, m.option_costs).backward()
    assert m.gate.proj.bias.grad.abs().sum() > 0
    assert m.gate_embeds[0].conv.weight.grad.abs().sum() > 0


def test_backbone_learns_only_through_chosen_option():
    x, y = images(4), torch.tensor([0, 1, 2, 3], device=DEVICE)
    gated_convs = lambda m: [(i, c) for i, b in enumerate(m.blocks) if i > 0 for c in (b.conv1, b.conv2)]

    m = build("dfs_resnet20")
    force_gate(m, SKIP)  # every sample skips every gated block
    m.train()
    logits, d = m(x)
    assert torch.all(d.detach().argmax(-1) == SKIP)
    F.cross_entropy(logits, y).backward()
    for i, conv in gated_convs(m):
        assert conv.weight.grad is None or torch.all(conv.weight.grad == 0), i
    assert m.blocks[3].shortcut_conv.weight.grad.abs().sum() > 0  # skip's projection shortcut
    assert m.blocks[0].conv1.weight.grad.abs().sum() > 0
    assert m.gate.proj.bias.grad.abs().sum() > 0  # the gate still learns through all candidates

    m = build("dfs_resnet20")
    force_gate(m, 1)  # every sample at 8 bits
    m.train()
    logits, d = m(x)
    assert torch.all(d.detach().argmax(-1) == 1)
    F.cross_entropy(logits, y).backward()
    for i, conv in gated_convs(m):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, i


# --------------------------------------------------------------------------- options


def test_option_presets():
    paper = build("dfs_resnet38", options="paper")
    assert paper.options == ("skip", 8, 16, "full")
    assert paper.gate.proj.out_features == 4
    assert paper.option_costs.tolist() == [0, 1 / 16, 1 / 4, 1]
    paper.eval()
    with torch.no_grad():
        _, d = paper(images(2))
    assert d.shape == (2, 17, 4)

    skipnet = build("dfs_resnet20", options="skipnet")
    assert skipnet.options == ("skip", "full") and skipnet.gate.proj.out_features == 2
    assert build("dfs_resnet20").options == DEFAULT_OPTIONS
    assert build("dfs_resnet20", options="skip,8,16,full").options == ("skip", 8, 16, "full")


def test_static_quantization_single_bitwidth():
    m = build("dfs_resnet20", options="8")
    assert m.options == (8,) and m.gate.proj.out_features == 1
    m.train()
    logits, d = m(images(4))
    assert d.shape == (4, 8, 1)
    assert m.computation_percentage(d).item() == pytest.approx(6.25)
    m.eval()
    with torch.no_grad():
        for seed in (1, 2):
            logits, d = m(images(3, seed=seed))
            assert torch.all(d == 1)
            assert m.computation_percentage(d).item() == 6.25
        # every gated block at 8 bits, written out; block 1 at full precision
        x = images(3)
        h = m.blocks[0](m.stem(x))
        for b in m.blocks[1:]:
            h = b(h, 8)
        torch.testing.assert_close(m(x)[0], m.head(h), rtol=1e-5, atol=1e-5)
        h_full = m.blocks[0](m.stem(x))
        for b in m.blocks[1:]:
            h_full = b(h_full)
        assert (m(x)[0] - m.head(h_full)).abs().max() > 1e-3  # and that is not full precision


# --------------------------------------------------------------------------- device and flags


def test_device_and_varying_batch_sizes():
    m = build("dfs_resnet20")
    for mode in ("train", "eval"):
        getattr(m, mode)()
        for b in (3, 5):
            with torch.set_grad_enabled(mode == "train"):
                logits, d = m(images(b))
            assert logits.shape == (b, 10) and d.shape == (b, 8, 7)
            assert logits.device == torch.device(DEVICE) or logits.device.type == torch.device(DEVICE).type
            assert d.device.type == torch.device(DEVICE).type


def test_no_hard_coded_cuda():
    for mod in (quantize, models, models.gate, models.cost, models.resnet, dfs_module):
        assert ".cuda(" not in inspect.getsource(mod), mod.__name__


@pytest.mark.parametrize("flag", [False, True])
def test_stochastic_act_rounding_passes_down(flag):
    for m in (build_model("dfs_resnet20", stochastic_act_rounding=flag),
              DFSResNet(20, stochastic_act_rounding=flag),
              build_model("resnet20", stochastic_act_rounding=flag)):
        qconvs = [mod for mod in m.modules() if isinstance(mod, QConv2d)]
        # two 3x3 convs per block plus the two projection shortcuts
        assert len(qconvs) == 2 * 9 + 2
        assert all(q.stochastic_act_rounding is flag for q in qconvs)


def test_stochastic_act_rounding_changes_eval_outputs():
    m = build("dfs_resnet20", stochastic_act_rounding=True)
    m.train()
    m(images(4))
    m.eval()
    with torch.no_grad():
        a = m(images(2), force_option=1)[0]
        b = m(images(2), force_option=1)[0]
        c = m(images(2), force_option=FULL)[0]
        d = m(images(2), force_option=FULL)[0]
    assert not torch.equal(a, b)  # dithered activations at 8 bits, in eval too
    assert torch.equal(c, d)  # full precision is never dithered
