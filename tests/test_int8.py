"""eval.py --int8 (core/int8.py): the 8-bit option through oneDNN's u8 x s8 convolution gives the
fake-quantized conv's result up to fp32 rounding along both paths (direct; codes split in two) on
any x86 CPU, the self-check picks a path that is exact for the kernel at hand or refuses (tested
with an emulated saturating kernel, and with oneDNN's own AVX2 kernel in a subprocess), it follows
weight and range changes, and leaves training and autograd on the spec's path."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from core import int8
from helpers import images, randomize_bn, small_synthetic, spread_gate
from models import build_model
from quantize import QConv2d, fake_quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not int8.available(), reason="no oneDNN quantized convolution in this build")


def conv_with_range(cin, cout, k, stride, lo, hi, seed=0):
    torch.manual_seed(seed)
    conv = QConv2d(cin, cout, k, stride, k // 2, bias=False).eval()
    with torch.no_grad():
        conv.running_min.fill_(lo)
        conv.running_max.fill_(hi)
    return conv


def float64_reference(conv, x):
    """conv(x_q, w_q) summed in float64 from the spec's fake-quantized tensors: independent of both paths."""
    xq = fake_quantize(x, 8, conv.running_min, conv.running_max).double()
    lo, hi = torch.aminmax(conv.weight.detach())
    wq = fake_quantize(conv.weight.detach(), 8, lo, hi).double()
    return F.conv2d(xq, wq, None, conv.stride, conv.padding)


def saturating_kernel(limit=2 ** 15 - 1):
    """An emulation of oneDNN's u8 x s8 kernel on CPUs without VNNI: the products of adjacent input
    channels added in pairs and each pair clamped to +-limit (vpmaddubsw's int16 saturation at the
    default), the rest summed exactly. Its own computation: unfold, products, pairs, clamp."""
    def kernel(codes, weight, geometry):
        stride, padding, dilation, groups = geometry
        assert groups == 1
        n, c, h, w = codes.shape
        o, _, kh, kw = weight.shape
        cols = F.unfold(codes.double(), (kh, kw), dilation, padding, stride).view(n, 1, c, kh * kw, -1)
        products = cols * weight.double().view(1, o, c, kh * kw, 1)
        if c % 2:
            products = F.pad(products, (0, 0, 0, 0, 0, 1))
        pairs = products.view(n, o, -1, 2, kh * kw, products.shape[-1]).sum(3).clamp(-limit - 1, limit)
        h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        return pairs.sum((2, 3)).view(n, o, h_out, -1).float()
    return kernel


def test_the_emulated_kernel_is_exact_without_saturation():
    """The emulation itself: exact when no pair leaves int16 (lower-half codes), wrong when one does."""
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-128, 128, (8, 16, 3, 3), generator=g, dtype=torch.int8)
    geometry = [[1, 1], [1, 1], [1, 1], 1]
    for top, exact in ((128, True), (256, False)):
        k = torch.randint(0, top, (2, 16, 6, 6), generator=g, dtype=torch.uint8)
        k[0, :, :2] = top - 1
        reference = F.conv2d(k.double(), w.double(), None, 1, 1)
        assert torch.equal(saturating_kernel()(k, w, geometry).double(), reference) == exact


PROBE = ([[1, 1], [1, 1], [1, 1], 1], 16, 16, (3, 3))


def test_the_self_check_takes_the_split_path_for_a_saturating_kernel_and_refuses_a_worse_one():
    assert int8.check_kernel(PROBE, "direct") or int8.check_kernel(PROBE, "split")  # oneDNN's own, here
    assert not int8.check_kernel(PROBE, "direct", saturating_kernel())  # pairs of 255 * -128 saturate
    assert int8.check_kernel(PROBE, "split", saturating_kernel())  # 127 * 128 * 2 does not
    assert int8.choose_path([PROBE], saturating_kernel()) == "split"
    assert int8.choose_path([PROBE], saturating_kernel(2 ** 12)) is None  # saturates the split codes too
    model = gated_model()
    assert int8.path_of(model) is None
    with pytest.raises(int8.InexactKernel, match=r"not exact on this CPU \(.+ \(torch \w+\)\)"):
        int8.enable(model, kernel=saturating_kernel(2 ** 12))
    assert int8.path_of(model) is None  # nothing enabled
    assert int8.path_of(int8.enable(model, kernel=saturating_kernel())) == "split"
    assert int8.path_of(int8.enable(model)) == int8.choose_path(int8.probes(model))


@pytest.mark.parametrize("path", int8.PATHS)
@pytest.mark.parametrize("cin,cout,k,stride,size", [(16, 16, 3, 1, 12), (16, 32, 3, 2, 12), (16, 32, 1, 2, 12),
                                                    (64, 64, 3, 1, 8)])
@pytest.mark.parametrize("lo,hi", [(0.0, 2.5), (-1.25, 3.0)])
def test_int8_conv_equals_the_fake_quantized_conv_up_to_fp32_rounding(cin, cout, k, stride, size, lo, hi, path):
    """Each path, forced, whatever this CPU would choose: on a VNNI CPU the split path runs too. A path
    whose kernel is not exact here (the direct one on CPUs without VNNI) is skipped: the self-check
    never takes it."""
    conv = conv_with_range(cin, cout, k, stride, lo, hi)
    if not int8.check_kernel(int8.probe(conv), path):
        pytest.skip(f"the {path} kernel is not exact on this CPU ({int8.cpu_name()}): never chosen")
    x = torch.randn(5, cin, size, size) * 1.5 + 0.5  # values beyond the range too: clamped codes
    with torch.no_grad():
        fake = conv(x, 8)
        conv.int8 = int8.Int8Conv(conv, path=path)
        fast = conv(x, 8)
    exact = float64_reference(conv, x)
    scale = exact.abs().max().item()
    assert fast.shape == fake.shape
    # both within fp32 rounding of the exact float64 sum (a missing term, e.g. the border one when
    # lo != 0, or the c_w * Σ k_x one, is off by far more than this)
    assert (fake.double() - exact).abs().max().item() <= 2e-6 * scale
    assert (fast.double() - exact).abs().max().item() <= 2e-6 * scale


def test_int8_conv_follows_weight_and_range_changes():
    conv = conv_with_range(16, 16, 3, 1, -0.5, 2.0)
    x = torch.randn(3, 16, 8, 8)
    conv.int8 = int8.Int8Conv(conv)
    with torch.no_grad():
        conv(x, 8)
        conv.weight.mul_(-0.5)  # an in-place write bumps the version counter
        conv.running_max.fill_(4.0)
        after = conv(x, 8)
    exact = float64_reference(conv, x)
    assert (after.double() - exact).abs().max().item() <= 2e-6 * exact.abs().max().item()


def gated_model(seed=0):
    torch.manual_seed(seed)
    model = build_model("dfs_resnet20", 10, "skip,8,16,full")
    randomize_bn(model)
    spread_gate(model)
    model.train()
    model(images(16))  # range buffers from a real pass
    return model.eval()


def test_training_and_autograd_stay_on_the_spec_path():
    """With the int8 kernels in place, autograd and training run the fake-quantized path (in
    channels_last, the format enable() moves the model to), and disable() restores the model."""
    model = gated_model()
    x = images(6)
    with torch.no_grad():
        plain_ref = model(x, force_option=1)[0]
        model.to(memory_format=torch.channels_last)
        ref = model(x.contiguous(memory_format=torch.channels_last), force_option=1)[0]
    int8.enable(model)
    with torch.enable_grad():
        assert torch.equal(model(x, force_option=1)[0], ref)  # grad enabled: fake-quantized, bit for bit
    with torch.no_grad():
        assert not torch.equal(model(x, force_option=1)[0], ref)  # ... and without grad, the int8 kernels
        int8.disable(model)
        assert torch.equal(model(x, force_option=1)[0], plain_ref)
    int8.enable(model)
    model.train()
    torch.manual_seed(3)
    out_int8 = model(x)[0]
    int8.disable(model)
    model.to(memory_format=torch.channels_last)
    torch.manual_seed(3)
    assert torch.equal(model(x.contiguous(memory_format=torch.channels_last))[0], out_int8)  # training ignores them


@pytest.mark.parametrize("path", [None, *int8.PATHS])
def test_int8_network_agrees_with_the_fake_quantized_one(path):
    """Every block at 8 bits, and the gate's own mix: logits within a small tolerance (an fp32
    difference can move a value across a rounding boundary of the next layer's grid, so not
    bit for bit), the same predicted classes, and the gate's decisions almost all equal; along the
    path the self-check chooses (None) and along each path forced, where its kernel is exact here."""
    model = gated_model()
    if path and not all(int8.check_kernel(p, path) for p in int8.probes(model)):
        pytest.skip(f"the {path} kernel is not exact on this CPU ({int8.cpu_name()}): never chosen")
    x = images(32)
    with torch.no_grad():
        ref8, _ = model(x, force_option=1)
        ref, ref_decisions = model(x)
        int8.enable(model, path=path)
        assert int8.path_of(model) == (path or int8.choose_path(int8.probes(model)))
        out8, _ = model(x, force_option=1)
        out, decisions = model(x)
    assert (ref_decisions[:, :, 1] > 0).any()  # the gate does choose 8 bits somewhere
    for a, b in ((out8, ref8), (out, ref)):
        assert (a - b).abs().max().item() <= 0.05 * b.abs().max().item()
        assert torch.equal(a.argmax(1), b.argmax(1))
    assert (decisions != ref_decisions).any(-1).float().mean().item() <= 0.05


def test_eval_int8_end_to_end_and_its_errors(tmp_path, capsys):
    import eval as eval_script
    from core.checkpoint import save_checkpoint
    model = gated_model()
    path = tmp_path / "m.pth.tar"
    save_checkpoint({"model": model.state_dict(), "stage": "dfs", "arch": "dfs_resnet20", "num_classes": 10,
                     "step": 0, "options": ["skip", 8, 16, "full"], "args": {"dataset": "synthetic"}}, str(path))
    outs = {}
    with small_synthetic(test=100):
        for flags in ([], ["--int8"]):
            out = tmp_path / f"r{len(flags)}.json"
            assert eval_script.main([str(path), "--device", "cpu", "--batch-size", "50", "--json", str(out),
                                     *flags]) == 0
            outs[len(flags)] = json.loads(out.read_text())
    steps = {"fused", "eager (fused steps disagreed)"} if int8.can_compile() else {"eager"}
    assert outs[1]["int8"] in steps and "int8" not in outs[0]
    path = int8.choose_path(int8.probes(model))
    assert outs[1]["int8_path"] == path and outs[1]["cpu"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"--int8: the {path} path (" in capsys.readouterr().out
    assert abs(outs[1]["accuracy"] - outs[0]["accuracy"]) <= 1.0
    assert abs(outs[1]["computation_percentage"] - outs[0]["computation_percentage"]) <= 1.0
    with pytest.raises(SystemExit) as e:
        eval_script.main([str(path), "--device", "cuda", "--int8"])
    assert e.value.code == 2 and "--int8 runs on the CPU only" in capsys.readouterr().err
    dithered = build_model("dfs_resnet20", 10, "skip,8,16,full", stochastic_act_rounding=True)
    with pytest.raises(ValueError, match="dithered"):
        int8.enable(dithered)


@pytest.mark.skipif(not int8.can_compile(), reason="torch.compile needs a C++ compiler")
def test_the_fused_steps_give_the_same_codes_and_results():
    """torch.compile's fused codes equal fake_quantize's codes exactly (round half to even, clamping,
    values on and between grid points), in both memory formats and at another batch size, for both
    paths, wherever Inductor compiles them right; where it does not (seen where torch's capability
    is AVX2, one thread), Int8Conv notices and runs the eager steps: its output equals the eager
    conv's either way."""
    lo, hi = torch.tensor(-0.75), torch.tensor(2.0)
    scale = int8.grid_scale(lo, hi, 8, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, 9, 9, generator=g) * 1.5
    x[0, 0, 0, :6] = lo + scale * torch.tensor([0.5, 1.5, 2.5, 254.5, 255.5, 300.0])  # ties and beyond
    reference = ((fake_quantize(x, 8, lo, hi) - lo) / scale).round()
    inputs = (x, x.contiguous(memory_format=torch.channels_last), x[:3])
    miscompiled = False
    for xs in inputs:
        eager, split = int8.codes(xs, lo, scale), int8.split_codes(xs, lo, scale)  # split: [q; r], k = 2q + r
        assert torch.equal(eager.float(), reference[:len(xs)]) and split.max().item() <= 127
        assert torch.equal(2 * split[:len(xs)].float() + split[len(xs):].float(), reference[:len(xs)])
        for step, want in (("codes", eager), ("split_codes", split)):
            fused = int8.fused_step(step)(xs, lo, scale)
            assert fused.is_contiguous(memory_format=torch.channels_last) and want.is_contiguous(
                memory_format=torch.channels_last)
            miscompiled |= not torch.equal(fused, want)
    conv = conv_with_range(16, 32, 3, 2, -0.75, 2.0)
    failed = False
    for path in int8.PATHS:
        if int8.check_kernel(int8.probe(conv), path):
            eager, fused = int8.Int8Conv(conv, path=path), int8.Int8Conv(conv, fused=True, path=path)
            with torch.no_grad():
                for xs in inputs:
                    a, b = eager(xs), fused(xs)
                    assert (a - b).abs().max().item() <= 1e-6 * a.abs().max().item()
            failed |= fused.fused_failed
    assert failed or not miscompiled  # a miscompiled step was noticed on the same inputs


def test_fused_steps_that_disagree_are_dropped_for_the_eager_ones():
    """A fused codes step that is off by one code, handed to Int8Conv: it is caught on the first
    input, the eager steps run from then on (bit for bit), and steps_of(model) says so."""
    model = gated_model()
    x = images(4)
    with torch.no_grad():
        int8.enable(model)
        want = model(x, force_option=1)[0]
        for m in model.modules():
            if isinstance(m, QConv2d):
                codes, combine = m.int8.eager
                m.int8.fused = (lambda x, lo, s, codes=codes: codes(x, lo, s).add(1).clamp(max=255), combine)
        assert int8.steps_of(model) == "fused"
        assert torch.equal(model(x, force_option=1)[0], want)
        assert int8.steps_of(model) == "eager (fused steps disagreed)"
        assert torch.equal(model(x, force_option=1)[0], want)


AVX2_CHECK = """
import torch
from core import int8
from models import build_model
from quantize import fake_quantize
from test_int8 import conv_with_range, float64_reference, gated_model
model = gated_model()
direct = [int8.check_kernel(p, "direct") for p in int8.probes(model)]
conv = conv_with_range(16, 16, 3, 1, 0.0, 2.5)
x = torch.rand(4, 16, 8, 8) * 2.5  # codes across the whole range
exact = float64_reference(conv, x)
errors = {}
with torch.no_grad():
    for path in int8.PATHS:
        conv.int8 = int8.Int8Conv(conv, path=path)
        errors[path] = ((conv(x, 8).double() - exact).abs().max() / exact.abs().max()).item()
print(any(direct), int8.choose_path(int8.probes(model)), errors["direct"], errors["split"])
"""


def test_onednns_avx2_kernel_saturates_and_the_self_check_takes_the_split_path():
    """oneDNN's own kernel for CPUs without VNNI (ONEDNN_MAX_CPU_ISA=AVX2 selects it on any x86 CPU;
    an AVX2 machine runs it anyway): the direct path errs by about 14 % of the output's scale, the
    self-check sees it and chooses the split path, which is exact up to fp32 rounding."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    out = subprocess.run([sys.executable, "-c", AVX2_CHECK], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    any_direct, path, direct_error, split_error = out.stdout.split()
    assert any_direct == "False" and path == "split"
    assert float(direct_error) > 0.01 and float(split_error) <= 2e-6
