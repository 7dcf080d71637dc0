"""Uniform fake quantization with a straight-through gradient (docs/spec.md §2, §8).

`fake_quantize` maps a float tensor onto the 2^b-level grid spanning [lo, hi] and back
to float. `QConv2d` is an `nn.Conv2d` whose forward takes the bitwidth per call:
`bits=None` is full precision and leaves input and weight untouched.

Ranges follow the authors' code: the weight range is the min/max of the whole weight
tensor at every call; the activation range is, in training, the batch mean of each
sample's min (and max), folded into running buffers as
`running = 0.1 * running + 0.9 * batch_value`, and in eval the buffers themselves.
The buffers start at 0 and are shared by every bitwidth of the conv.

The scale is computed as the released code does: (hi - lo) / (2^b - 1) in float64 from
the fp32 range (it turned lo and hi into Python floats), then cast to the tensor's dtype;
everything else is elementwise in the tensor's dtype, in the spec's order.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

RANGE_MOMENTUM = 0.1  # weight of the old value, as in the released code


def grid_scale(lo, hi, bits, dtype):
    """max((hi - lo) / (2^b - 1), 1e-8) in float64, cast to `dtype`: the released arithmetic."""
    return ((hi.double() - lo.double()) / (2.0 ** bits - 1)).clamp_(min=1e-8).to(dtype)


class _FakeQuantize(torch.autograd.Function):
    """Forward: the quantized grid value. Backward: identity to x, nothing to the range."""

    @staticmethod
    def forward(ctx, x, bits, lo, hi, stochastic):
        scale = grid_scale(lo, hi, bits, x.dtype)
        v = (x - lo).div_(scale)  # one new tensor, then in place: same values, fewer allocations
        if stochastic:  # the released code's accidental U(-0.5, 0.5) dither before rounding
            v.add_(torch.empty_like(v).uniform_(-0.5, 0.5))
        return v.round_().clamp_(0, 2.0 ** bits - 1).mul_(scale).add_(lo)

    @staticmethod
    def backward(ctx, grad):
        # An explicit identity: a clamp-based estimator loses the gradient of the elements
        # sitting exactly on min/max, whose clamp gradient is 0 since torch 2.14 (spec §8).
        return grad, None, None, None, None


def fake_quantize(x, bits, lo, hi, stochastic=False):
    """Fake-quantize `x` to `bits` bits on [lo, hi] (spec §2); `bits=None` returns `x`.

    lo, hi: scalars or 0-d tensors (kept on the device, no host sync).
    """
    if bits is None:
        return x
    lo = torch.as_tensor(lo, dtype=x.dtype, device=x.device).detach()
    hi = torch.as_tensor(hi, dtype=x.dtype, device=x.device).detach()
    return _FakeQuantize.apply(x, int(bits), lo, hi, bool(stochastic))


class QConv2d(nn.Conv2d):
    """Conv2d whose input and weight are fake-quantized to `bits` bits per call.

    stochastic_act_rounding: reproduce the released code's dithered activation rounding
    (in training and eval alike); off by default (round to nearest).

    Outside autograd (eval, or no_grad) the quantized weight of each bitwidth is computed once
    and reused until the weight changes: the cache is keyed on the parameter's version counter,
    which every in-place write (optimizer step, load_state_dict, `with torch.no_grad(): w.mul_()`)
    bumps, and on its storage. Only writes through `.data` bypass the counter.
    """

    def __init__(self, *args, stochastic_act_rounding=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.stochastic_act_rounding = stochastic_act_rounding
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self._weight_cache = {}  # bits -> (key, quantized weight); never saved
        self.int8 = None  # int8.Int8Conv when `eval.py --int8` runs the 8-bit option on oneDNN

    def activation_range(self, x, x_range=None):
        """(lo, hi) for the input: batch statistics in training (updating the buffers), else buffers.

        x_range: this input's (lo, hi) if the caller already reduced it (the same input
        fed to several bitwidths); the buffers are updated once per call either way.
        """
        if not self.training:
            return self.running_min, self.running_max
        lo, hi = x_range if x_range is not None else input_range(x)
        with torch.no_grad():
            self.running_min.mul_(RANGE_MOMENTUM).add_(lo * (1 - RANGE_MOMENTUM))
            self.running_max.mul_(RANGE_MOMENTUM).add_(hi * (1 - RANGE_MOMENTUM))
        return lo, hi

    def quantized_weight(self, bits):
        """The weight fake-quantized on its own min/max; cached per bitwidth outside autograd."""
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            lo, hi = torch.aminmax(w.detach())
            return fake_quantize(w, bits, lo, hi)
        key = (w._version, w.data_ptr(), w.device, w.dtype)
        hit = self._weight_cache.get(bits)
        if hit is None or hit[0] != key:
            lo, hi = torch.aminmax(w.detach())
            hit = self._weight_cache[bits] = (key, fake_quantize(w.detach(), bits, lo, hi))
        return hit[1]

    def forward(self, x, bits=None, x_range=None):
        if bits is None:
            return super().forward(x)
        if self.int8 is not None and bits == 8 and not self.training and not torch.is_grad_enabled():
            return self.int8(x)
        lo, hi = self.activation_range(x, x_range)
        x = fake_quantize(x, bits, lo, hi, self.stochastic_act_rounding)
        return F.conv2d(x, self.quantized_weight(bits), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def input_range(x):
    """The batch mean of each sample's min and of its max (the training activation range)."""
    flat = x.detach().flatten(1)
    return flat.amin(1).mean(), flat.amax(1).mean()  # amin/amax: no indices, ~7x faster than min(1)
