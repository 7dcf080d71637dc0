"""Tests of the uniform straight-through quantizer and QConv2d (docs/spec.md §2, §8)."""
import os

import pytest
import torch
import torch.nn.functional as F

from quantize import QConv2d, fake_quantize

DEVICE = os.environ.get("TEST_DEVICE", "cpu")


def reference_fq(x, bits, lo, hi):
    """Spec §2, written out independently with plain torch ops (same op order as the spec)."""
    lo = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
    hi = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
    levels = 2 ** bits - 1
    scale = torch.maximum((hi - lo) / levels, torch.tensor(1e-8, dtype=x.dtype, device=x.device))
    q = torch.round((x - lo) / scale).clamp(0, levels)
    return q * scale + lo


# --------------------------------------------------------------------------- fake_quantize


def test_golden_two_bits():
    # bits=2 on [0, 1]: scale 1/3, grid {0, 1/3, 2/3, 1}.
    # x/scale = 0, 0.3, 1.35, 2.4, 3, -0.6, 4.5 -> q = 0, 0, 1, 2, 3, clamp(-1)=0, clamp(4)=3
    x = torch.tensor([0.0, 0.1, 0.45, 0.8, 1.0, -0.2, 1.5], device=DEVICE)
    out = fake_quantize(x, 2, 0.0, 1.0)
    expected = torch.tensor([0, 0, 1 / 3, 2 / 3, 1, 0, 1], device=DEVICE)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_golden_offset_range():
    # bits=3 on [-1, 6]: scale 1, grid -1..6; x - lo = 0.2, 2.6, 4.4, 9 -> q = 0, 3, 4, 7(clamped)
    x = torch.tensor([-0.8, 1.6, 3.4, 8.0], device=DEVICE)
    out = fake_quantize(x, 3, torch.tensor(-1.0), torch.tensor(6.0))
    torch.testing.assert_close(out, torch.tensor([-1.0, 2.0, 3.0, 6.0], device=DEVICE), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8, 10, 16])
@pytest.mark.parametrize("range_as", ["float", "tensor"])
def test_matches_spec_formula(bits, range_as):
    torch.manual_seed(bits)
    x = torch.randn(4, 3, 5, 5, device=DEVICE) * 2 + 0.3
    lo, hi = -1.7, 2.9  # inner range: some elements fall outside and are clamped
    if range_as == "tensor":
        lo, hi = torch.tensor(lo, device=DEVICE), torch.tensor(hi, device=DEVICE)
        assert lo.dim() == 0
    out = fake_quantize(x, bits, lo, hi)
    expected = reference_fq(x, bits, lo, hi)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # and the range is respected
    assert out.min() >= -1.7 - 1e-6 and out.max() <= 2.9 + 1e-6
    # x itself is not modified
    assert not torch.equal(out, x)


def test_none_bits_is_identity():
    x = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    out = fake_quantize(x, None, -1.0, 1.0)
    assert out is x or torch.equal(out, x)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_number_of_levels_and_grid(bits):
    lo, hi = -0.75, 2.25
    x = torch.linspace(lo - 0.5, hi + 0.5, 10001, device=DEVICE)
    out = fake_quantize(x, bits, lo, hi)
    levels = torch.unique(out)
    assert levels.numel() == 2 ** bits
    scale = (hi - lo) / (2 ** bits - 1)
    k = (out - lo) / scale
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
    assert k.round().min() == 0 and k.round().max() == 2 ** bits - 1


@pytest.mark.parametrize("bits", [8, 10])
def test_levels_at_most_2_to_b(bits):
    torch.manual_seed(0)
    x = torch.randn(50000, device=DEVICE) * 3
    out = fake_quantize(x, bits, x.min(), x.max())
    assert torch.unique(out).numel() <= 2 ** bits


def test_degenerate_range_no_nan():
    x = torch.tensor([0.5, 0.5, 0.5, 0.5 + 2e-8, 0.5 + 1e-6], device=DEVICE)
    out = fake_quantize(x, 8, 0.5, 0.5)
    assert torch.isfinite(out).all()
    # scale = 1e-8: q = round((x - 0.5) / 1e-8) clamped to [0, 255] -> out = 0.5 + q * 1e-8
    expected = reference_fq(x, 8, 0.5, 0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    # all values stay within 255 * 1e-8 of lo
    assert (out - 0.5).abs().max() <= 255 * 1e-8 + 1e-7
    # constant tensor with its own min/max as range
    c = torch.full((7,), 3.0, device=DEVICE, requires_grad=True)
    o = fake_quantize(c, 4, c.min(), c.max())
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, c.detach())
    o.sum().backward()
    assert torch.equal(c.grad, torch.ones_like(c))


@pytest.mark.parametrize("bits", [2, 8, 16])
def test_gradient_is_identity_including_min_max(bits):
    torch.manual_seed(1)
    x = torch.randn(6, 9, device=DEVICE, requires_grad=True)
    out = fake_quantize(x, bits, x.min(), x.max())
    out.sum().backward()
    # spec §8: elements sitting on the tensor's min and max must keep gradient 1
    assert torch.equal(x.grad, torch.ones_like(x))
    assert x.grad.flatten()[x.detach().argmin()] == 1 and x.grad.flatten()[x.detach().argmax()] == 1

    # arbitrary upstream gradient passes through unchanged
    x.grad = None
    g = torch.randn(6, 9, device=DEVICE)
    fake_quantize(x, bits, x.min(), x.max()).backward(g)
    assert torch.equal(x.grad, g)


def test_gradient_not_clipped_outside_range():
    x = torch.tensor([-5.0, -1.0, -0.3, 0.0, 0.4, 1.0, 7.0], device=DEVICE, requires_grad=True)
    out = fake_quantize(x, 4, -1.0, 1.0)
    assert out[0] == -1 and out[-1] == 1  # clamped in value ...
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # ... but not in gradient


def test_range_tensors_get_no_gradient_through_quantizer():
    x = torch.randn(20, device=DEVICE, requires_grad=True)
    lo = torch.tensor(-0.5, device=DEVICE, requires_grad=True)
    hi = torch.tensor(0.5, device=DEVICE, requires_grad=True)
    fake_quantize(x, 4, lo, hi).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert lo.grad is None or torch.all(lo.grad == 0)
    assert hi.grad is None or torch.all(hi.grad == 0)


def test_stochastic_rounding():
    torch.manual_seed(3)
    bits, lo, hi = 4, -2.0, 2.0
    scale = (hi - lo) / (2 ** bits - 1)
    x = torch.rand(4000, device=DEVICE) * 4 - 2
    nearest = fake_quantize(x, bits, lo, hi)
    torch.manual_seed(123)
    s1 = fake_quantize(x, bits, lo, hi, stochastic=True)
    torch.manual_seed(123)
    s2 = fake_quantize(x, bits, lo, hi, stochastic=True)
    assert torch.equal(s1, s2)  # reproducible with a fixed seed
    differs = (s1 - nearest).abs() > scale / 2
    assert differs.sum() > 100  # dither changes a good share of the elements
    assert differs.float().mean() < 0.5
    # on the grid, inside the range, and within one step of x's grid position
    k = (s1 - lo) / scale
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)
    assert s1.min() >= lo - 1e-6 and s1.max() <= hi + 1e-6
    assert ((s1 - x).abs() <= scale * (1 + 1e-4)).all()
    assert ((s1 - nearest).abs() <= scale * (1 + 1e-4)).all()
    # unbiased-ish: the stochastic mean error is much smaller than a step
    assert (s1 - x).mean().abs() < scale / 10
    # gradient still the identity
    xr = x.clone().requires_grad_()
    fake_quantize(xr, bits, lo, hi, stochastic=True).sum().backward()
    assert torch.equal(xr.grad, torch.ones_like(xr))


# --------------------------------------------------------------------------- QConv2d


def test_a_python_float_range_is_taken_in_the_tensors_dtype():
    """In float64, lo = 0.1 and hi = 0.7 stay float64 (not rounded through fp32 first)."""
    x = torch.linspace(-0.2, 1.0, 1001, dtype=torch.float64, device=DEVICE)
    out = fake_quantize(x, 8, 0.1, 0.7)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_fq(x, 8, 0.1, 0.7), rtol=0, atol=0)
    assert out.min().item() == 0.1  # the float64 0.1 itself, not float32(0.1) = 0.100000001...


def test_qconv_quantized_path_keeps_bias_dilation_and_groups():
    """A QConv2d with a bias, dilation 2 and 2 groups (none in the ResNets, all Conv2d features)."""
    torch.manual_seed(3)
    conv = QConv2d(4, 6, 3, 1, 2, dilation=2, groups=2, bias=True).to(DEVICE).train()
    x = torch.randn(2, 4, 9, 9, device=DEVICE)
    v = x.flatten(1)
    lo, hi = v.min(1).values.mean(), v.max(1).values.mean()
    w = conv.weight.detach()
    expected = F.conv2d(reference_fq(x, 8, lo, hi), reference_fq(w, 8, w.min(), w.max()), conv.bias,
                        1, 2, 2, 2)
    torch.testing.assert_close(conv(x, 8), expected, rtol=1e-5, atol=1e-5)


def make_conv(cin=3, cout=5, k=3, stride=1, padding=1, seed=0, **kw):
    torch.manual_seed(seed)
    return QConv2d(cin, cout, k, stride, padding, bias=False, **kw).to(DEVICE)


def test_qconv_buffers_start_at_zero():
    conv = make_conv()
    assert conv.running_min.item() == 0 and conv.running_max.item() == 0
    assert conv.running_min.dim() == 0
    assert {"running_min", "running_max"} <= set(conv.state_dict())


def test_qconv_full_precision_is_plain_conv():
    conv = make_conv(stride=2)
    conv.train()
    x = torch.randn(4, 3, 9, 9, device=DEVICE)
    out = conv(x)
    out_none = conv(x, None)
    expected = F.conv2d(x, conv.weight, None, 2, 1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_none, expected, rtol=1e-6, atol=1e-6)
    assert conv.running_min.item() == 0 and conv.running_max.item() == 0


@pytest.mark.parametrize("bits", [4, 8])
def test_qconv_training_output(bits):
    conv = make_conv(seed=bits)
    conv.train()
    torch.manual_seed(10 + bits)
    x = torch.randn(4, 3, 8, 8, device=DEVICE) * torch.tensor([1.0, 2.0, 0.5, 3.0], device=DEVICE).view(4, 1, 1, 1)
    # per-sample min / max, averaged over the batch
    lo = torch.stack([x[i].min() for i in range(4)]).mean()
    hi = torch.stack([x[i].max() for i in range(4)]).mean()
    w = conv.weight.detach()
    expected = F.conv2d(reference_fq(x, bits, lo, hi), reference_fq(w, bits, w.min(), w.max()), None, 1, 1)
    out = conv(x, bits)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # differs from full precision
    assert not torch.allclose(out, F.conv2d(x, w, None, 1, 1), atol=1e-3)
    # buffers after one call from zero: 0.9 * batch value
    torch.testing.assert_close(conv.running_min, 0.9 * lo, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(conv.running_max, 0.9 * hi, rtol=1e-6, atol=1e-7)


def test_qconv_running_range_golden():
    conv = QConv2d(1, 1, 1, bias=False).to(DEVICE)
    conv.train()
    # call 1: sample mins 0, -1 -> lo = -0.5; sample maxes 3, 5 -> hi = 4
    x1 = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 4.0, 5.0, 2.0]], device=DEVICE).view(2, 1, 2, 2)
    conv(x1, 8)
    # running = 0.1 * 0 + 0.9 * batch: min -0.45, max 3.6
    assert conv.running_min.item() == pytest.approx(-0.45, abs=1e-6)
    assert conv.running_max.item() == pytest.approx(3.6, abs=1e-6)
    # call 2: sample mins 1, -3 -> lo = -1; sample maxes 4, 6 -> hi = 5
    x2 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-3.0, 0.0, 0.0, 6.0]], device=DEVICE).view(2, 1, 2, 2)
    conv(x2, 4)  # a different bitwidth shares the same buffers
    # min: 0.1 * -0.45 + 0.9 * -1 = -0.945; max: 0.1 * 3.6 + 0.9 * 5 = 4.86
    assert conv.running_min.item() == pytest.approx(-0.945, abs=1e-6)
    assert conv.running_max.item() == pytest.approx(4.86, abs=1e-6)
    # a full-precision call does not touch them
    conv(x2 * 10)
    assert conv.running_min.item() == pytest.approx(-0.945, abs=1e-6)
    assert conv.running_max.item() == pytest.approx(4.86, abs=1e-6)


def test_qconv_eval_uses_buffers():
    conv = make_conv(seed=4)
    conv.eval()
    with torch.no_grad():
        conv.running_min.fill_(-0.8)
        conv.running_max.fill_(1.1)
    torch.manual_seed(5)
    x = torch.randn(3, 3, 6, 6, device=DEVICE)  # exceeds the buffered range
    out = conv(x, 6)
    w = conv.weight.detach()
    expected = F.conv2d(reference_fq(x, 6, -0.8, 1.1), reference_fq(w, 6, w.min(), w.max()), None, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert conv.running_min.item() == pytest.approx(-0.8) and conv.running_max.item() == pytest.approx(1.1)
    # batch statistics would have given something else
    lo = x.flatten(1).min(1).values.mean()
    hi = x.flatten(1).max(1).values.mean()
    other = F.conv2d(reference_fq(x, 6, lo, hi), reference_fq(w, 6, w.min(), w.max()), None, 1, 1)
    assert not torch.allclose(out, other, atol=1e-4)


def test_qconv_gradients_straight_through():
    conv = make_conv(seed=6)
    conv.train()
    torch.manual_seed(7)
    x = torch.randn(2, 3, 7, 7, device=DEVICE, requires_grad=True)
    g = torch.randn(2, 5, 7, 7, device=DEVICE)
    conv(x, 4).backward(g)
    assert x.grad is not None and conv.weight.grad is not None
    assert x.grad.abs().sum() > 0 and conv.weight.grad.abs().sum() > 0
    # STE: gradient equals that of a conv whose quantized operands are leaves
    lo = x.detach().flatten(1).min(1).values.mean()
    hi = x.detach().flatten(1).max(1).values.mean()
    w = conv.weight.detach()
    xq = reference_fq(x.detach(), 4, lo, hi).requires_grad_()
    wq = reference_fq(w, 4, w.min(), w.max()).requires_grad_()
    F.conv2d(xq, wq, None, 1, 1).backward(g)
    torch.testing.assert_close(x.grad, xq.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, wq.grad, rtol=1e-5, atol=1e-5)


def test_qconv_stochastic_flag():
    conv = make_conv(seed=8, stochastic_act_rounding=True)
    conv.eval()  # the released code dithers in eval too
    with torch.no_grad():
        conv.running_min.fill_(-2.0)
        conv.running_max.fill_(2.0)
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    a, b = conv(x, 4), conv(x, 4)
    assert not torch.equal(a, b)
    det = make_conv(seed=8)
    det.eval()
    det.load_state_dict(conv.state_dict())
    assert torch.equal(det(x, 4), det(x, 4))


def test_error_shrinks_with_bits():
    conv = make_conv(cin=8, cout=8, seed=9)
    conv.eval()
    torch.manual_seed(11)
    x = torch.randn(4, 8, 12, 12, device=DEVICE) * 3
    with torch.no_grad():  # a range that covers the data, so the only error is rounding
        conv.running_min.copy_(x.min())
        conv.running_max.copy_(x.max())
        full = conv(x)
        outs = {b: conv(x, b) for b in (8, 10, 12, 14, 16)}
    errors = [(outs[b] - full).abs().mean().item() for b in (8, 10, 12, 14, 16)]
    assert all(e > 0 for e in errors)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # two more bits are roughly four times finer
    assert all(a > 2 * b for a, b in zip(errors, errors[1:])), errors
    bits = sorted(outs)
    for i, b1 in enumerate(bits):
        for b2 in bits[i + 1:]:
            assert not torch.equal(outs[b1], outs[b2]), (b1, b2)
        assert not torch.equal(outs[b1], full)


# --------------------------------------------------------------------------- the released arithmetic


def released_fq(x, num_bits, min_value, max_value, stochastic=0.0):
    """The released code's quantizer transcribed: Python-float range and scale (float64), then
    in-place fp32 ops in its order (subtract, divide, dither, clamp, round, scale back)."""
    min_value, max_value = float(min_value), float(max_value)
    qmin, qmax = 0.0, 2.0 ** num_bits - 1.0
    scale = max((max_value - min_value) / (qmax - qmin), 1e-8)
    out = x.clone()
    out.add_(-min_value).div_(scale)
    if stochastic > 0:
        out.add_(out.new(out.shape).uniform_(-stochastic, stochastic))
    out.clamp_(qmin, qmax).round_()
    return out.mul_(scale).add_(min_value)


def released_cases():
    g = torch.Generator().manual_seed(11)
    n = 1 << 19
    return {  # weight-like and activation-like tensors with their own ranges
        "weights": torch.randn(n, generator=g) * 0.05,
        "post-relu activations": torch.rand(n, generator=g) * 3,
        "conv weight": torch.randn(64, 64, 3, 3, generator=g) * 0.1,
        "signed activations": torch.randn(n, generator=g) * 2 + 0.3,
    }


@pytest.mark.skipif(DEVICE != "cpu", reason="the released code's scalar division differs on CUDA")
@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
def test_bit_identical_to_the_released_arithmetic(bits):
    """Scale in float64 from the fp32 range, cast to fp32: every element equals the released
    code's (an fp32 scale moved 0.001-0.35 % of them to a neighbouring level)."""
    for name, x in released_cases().items():
        lo, hi = x.min(), x.max()
        assert torch.equal(fake_quantize(x, bits, lo, hi), released_fq(x, bits, lo, hi)), name
        # the activation path: a range that is not the tensor's own (a running buffer)
        lo, hi = lo * 0.9, hi * 0.8
        assert torch.equal(fake_quantize(x, bits, lo, hi), released_fq(x, bits, lo, hi)), name


@pytest.mark.skipif(DEVICE != "cpu", reason="the released code's scalar division differs on CUDA")
def test_dithered_rounding_identical_to_the_released_arithmetic():
    x = released_cases()["post-relu activations"]
    torch.manual_seed(5)
    ours = fake_quantize(x, 8, x.min(), x.max(), stochastic=True)
    torch.manual_seed(5)
    assert torch.equal(ours, released_fq(x, 8, x.min(), x.max(), stochastic=0.5))


def test_an_fp32_scale_would_differ_from_the_released_arithmetic():
    """The test above can fail: the fp32 scale of the old formula differs on these tensors."""
    differs = 0
    for x in released_cases().values():
        for bits in (8, 10, 12, 14, 16):
            lo, hi = x.min(), x.max()
            differs += int((reference_fq(x, bits, lo, hi) != released_fq(x, bits, lo, hi)).sum())
    assert differs > 0
