"""Uniform fake quantization with a straight-through gradient (spec/dfs.md §2, §8).

`fake_quantize` maps a float tensor onto the 2^b-level grid spanning [lo, hi] and back
to float. `QConv2d` is an `nn.Conv2d` whose forward takes the bitwidth per call:
`bits=None` is full precision and leaves input and weight untouched.

Ranges follow the authors' code: the weight range is the min/max of the whole weight
tensor at every call; the activation range is, in training, the batch mean of each
sample's min (and max), folded into running buffers as
`running = 0.1 * running + 0.9 * batch_value`, and in eval the buffers themselves.
The buffers start at 0 and are shared by every bitwidth of the conv.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

RANGE_MOMENTUM = 0.1  # weight of the old value, as in the released code


class _FakeQuantize(torch.autograd.Function):
    """Forward: the quantized grid value. Backward: identity to x, nothing to the range."""

    @staticmethod
    def forward(ctx, x, bits, lo, hi, stochastic):
        levels = 2.0 ** bits - 1
        scale = torch.clamp((hi - lo) / levels, min=1e-8)
        v = (x - lo) / scale
        if stochastic:  # the released code's accidental U(-0.5, 0.5) dither before rounding
            v = v + torch.empty_like(v).uniform_(-0.5, 0.5)
        q = torch.clamp(torch.round(v), 0, levels)
        return q * scale + lo

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
    """

    def __init__(self, *args, stochastic_act_rounding=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.stochastic_act_rounding = stochastic_act_rounding
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))

    def activation_range(self, x):
        """(lo, hi) for the input: batch statistics in training (updating the buffers), else buffers."""
        if not self.training:
            return self.running_min, self.running_max
        flat = x.detach().flatten(1)
        lo, hi = flat.min(1).values.mean(), flat.max(1).values.mean()
        with torch.no_grad():
            self.running_min.mul_(RANGE_MOMENTUM).add_(lo * (1 - RANGE_MOMENTUM))
            self.running_max.mul_(RANGE_MOMENTUM).add_(hi * (1 - RANGE_MOMENTUM))
        return lo, hi

    def forward(self, x, bits=None):
        if bits is None:
            return super().forward(x)
        lo, hi = self.activation_range(x)
        x = fake_quantize(x, bits, lo, hi, self.stochastic_act_rounding)
        w = self.weight
        w = fake_quantize(w, bits, w.min(), w.max())
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
