"""eval.py --int8 (core/int8.py): the 8-bit option through oneDNN's u8 x s8 convolution gives the
fake-quantized conv's result up to fp32 rounding, follows weight and range changes, and leaves
training and autograd on the spec's path."""
import json

import pytest
import torch
import torch.nn.functional as F

from core import int8
from helpers import images, randomize_bn, small_synthetic, spread_gate
from models import build_model
from quantize import QConv2d, fake_quantize

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


@pytest.mark.parametrize("cin,cout,k,stride,size", [(16, 16, 3, 1, 12), (16, 32, 3, 2, 12), (16, 32, 1, 2, 12),
                                                    (64, 64, 3, 1, 8)])
@pytest.mark.parametrize("lo,hi", [(0.0, 2.5), (-1.25, 3.0)])
def test_int8_conv_equals_the_fake_quantized_conv_up_to_fp32_rounding(cin, cout, k, stride, size, lo, hi):
    conv = conv_with_range(cin, cout, k, stride, lo, hi)
    x = torch.randn(5, cin, size, size) * 1.5 + 0.5  # values beyond the range too: clamped codes
    with torch.no_grad():
        fake = conv(x, 8)
        conv.int8 = int8.Int8Conv(conv)
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


def test_int8_network_agrees_with_the_fake_quantized_one():
    """Every block at 8 bits, and the gate's own mix: logits within a small tolerance (an fp32
    difference can move a value across a rounding boundary of the next layer's grid, so not
    bit for bit), the same predicted classes, and the gate's decisions almost all equal."""
    model = gated_model()
    x = images(32)
    with torch.no_grad():
        ref8, _ = model(x, force_option=1)
        ref, ref_decisions = model(x)
        int8.enable(model)
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
    assert outs[1]["int8"] == ("fused" if int8.can_compile() else "eager") and "int8" not in outs[0]
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
    values on and between grid points), in both memory formats and at another batch size."""
    lo, hi = torch.tensor(-0.75), torch.tensor(2.0)
    scale = int8.grid_scale(lo, hi, 8, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, 9, 9, generator=g) * 1.5
    x[0, 0, 0, :6] = lo + scale * torch.tensor([0.5, 1.5, 2.5, 254.5, 255.5, 300.0])  # ties and beyond
    reference = ((fake_quantize(x, 8, lo, hi) - lo) / scale).round()
    for xs in (x, x.contiguous(memory_format=torch.channels_last), x[:3]):
        fused = int8.fused_step("codes")(xs, lo, scale)
        assert torch.equal(fused, int8.codes(xs, lo, scale))
        assert fused.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(fused.float(), reference[:len(xs)])
    conv = conv_with_range(16, 32, 3, 2, -0.75, 2.0)
    with torch.no_grad():
        eager, fused = int8.Int8Conv(conv)(x), int8.Int8Conv(conv, fused=True)(x)
    assert (eager - fused).abs().max().item() <= 1e-6 * eager.abs().max().item()
