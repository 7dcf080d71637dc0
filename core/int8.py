"""Int8 execution of the 8-bit option at inference, on CPU (`eval.py --int8`; off by default).

The spec's 8-bit grid is affine with a real-valued origin (spec §2): the input of a quantized conv
becomes x_q = lo_x + s_x k_x and its weight w_q = lo_w + s_w k_w, with codes k in 0..255, the input
range (lo_x, hi_x) from the running buffers (eval) and the weight's from its own min and max. With
c_w = lo_w + 128 s_w, so that w_q = s_w (k_w - 128) + c_w with k_w - 128 a signed int8,

    conv(x_q, w_q) = s_x s_w Σ k_x (k_w - 128)  +  s_x c_w Σ k_x  +  lo_x Σ' w_q

where Σ runs over each output pixel's window and Σ' over its real (non-padding) positions: the
fake-quantized conv pads x_q with exact zeros, and here padding is code 0, so the first two sums
need no border correction and the third is a conv of a ones image with w_q, fixed per input size.
One oneDNN u8 x s8 convolution computes the first two sums exactly in int32, the second as an extra
output channel whose weights are all 1, and scales them to fp32 (x_scale s_x, per-channel weight
scales s_w and 1). The result equals the fake-quantized fp32 conv up to fp32 rounding (int32 sums
above 2^24 round when converted, and the terms are added in another order): not bit for bit, so
this is a flag. The codes are computed with fake_quantize's own operations, so they are identical.

Whether it is faster depends on the CPU (int8 dot-product units: VNNI, AMX); docs/benchmarks.md
has the measurements. The prepared weights follow the conv's weight and range buffers (keyed on
their version counters, like QConv2d's weight cache).
"""
import functools
import os
import shutil

import torch
import torch.nn.functional as F

from quantize import QConv2d, grid_scale

BITS = 8


def grid_codes(x, lo, scale):
    """fake_quantize's codes of x on the 8-bit grid, as floats: (x - lo) / scale, rounded, clamped."""
    return (x - lo).div(scale).round().clamp(0, 2 ** BITS - 1)


def codes(x, lo, scale):
    """The codes of an input, as uint8 in channels_last (the int8 conv's input)."""
    return grid_codes(x, lo, scale).to(torch.uint8).contiguous(memory_format=torch.channels_last)


def combine(out, border, offset):
    """s_x s_w Σ k_x (k_w - 128) + c_w (s_x Σ k_x) + lo_x Σ' w_q, from the conv's C_out + 1 channels;
    channels_last, like the conv's output, so what follows stays in one memory format."""
    out = torch.addcmul(border, out[:, -1:], offset) + out[:, :-1]
    return out.contiguous(memory_format=torch.channels_last)


@functools.cache
def fused_step(name):
    """codes or combine through torch.compile. Each is five (two) passes over memory in eager mode,
    which costs more than the int8 conv itself; Inductor (a C++ compiler) fuses each into one.
    Wrapped on first request, not at import: torch.compile imports torch._dynamo, about 2 s that
    eval.py would otherwise pay without --int8; compiled on first call."""
    return torch.compile({"codes": codes, "combine": combine}[name], dynamic=True)


def can_compile():
    """Whether Inductor can build CPU kernels here (it needs a C++ compiler)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def available():
    """Whether this torch build has oneDNN's quantized convolution (x86 CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def unavailable(device):
    """Why --int8 cannot run on `device`, in one line, or None if it can."""
    if torch.device(device).type != "cpu":
        return "--int8 runs on the CPU only (oneDNN's int8 convolution); add --device cpu"
    if not available():
        return "--int8 needs a PyTorch build with oneDNN's quantized convolution (x86 CPU)"
    return None


class Int8Conv:
    """The 8-bit forward of one eval-mode QConv2d through oneDNN's u8 x s8 convolution."""

    def __init__(self, conv, fused=False):
        if conv.stochastic_act_rounding:
            raise ValueError("--int8 computes round-to-nearest codes, not the dithered activation rounding "
                             "this model uses")
        self.conv, self.key, self.border = conv, None, {}
        self.codes, self.combine = (fused_step("codes"), fused_step("combine")) if fused else (codes, combine)

    def _prepare(self):
        conv = self.conv
        w = conv.weight.detach()
        lo_w, hi_w = torch.aminmax(w)
        s_w = grid_scale(lo_w, hi_w, BITS, w.dtype)
        codes = grid_codes(w, lo_w, s_w)
        ones = torch.ones_like(codes[:1])  # the extra output channel: Σ k_x
        self.weight = torch.cat([codes - 128, ones]).to(torch.int8)
        self.weight_scales = torch.cat([s_w.expand(len(w)), ones.new_ones(1)]).float()
        self.weight_zero_points = torch.zeros(len(w) + 1, dtype=torch.int64)
        self.zero_point = torch.zeros((), dtype=torch.int64)  # of the codes: padding is code 0
        self.geometry = [list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups]
        self.packed = torch.ops.onednn.qconv_prepack(self.weight, self.weight_scales, 1.0, 0, *self.geometry, None)
        self.offset = lo_w + 128 * s_w  # c_w
        self.lo = conv.running_min.detach().clone()
        self.scale = grid_scale(conv.running_min, conv.running_max, BITS, w.dtype)
        with torch.no_grad():
            self.quantized = conv.quantized_weight(BITS)  # w_q, for the border term
        self.border = {}

    def _border(self, x):
        """lo_x Σ' w_q for this input size: [1, C_out, H_out, W_out]."""
        size = tuple(x.shape[2:])
        if size not in self.border:
            ones = x.new_ones(1, x.shape[1], *size)
            stride, padding, dilation, groups = self.geometry
            self.border[size] = self.lo * F.conv2d(ones, self.quantized, None, stride, padding, dilation, groups)
        return self.border[size]

    def __call__(self, x):
        conv = self.conv
        key = (conv.weight._version, conv.weight.data_ptr(), conv.running_min._version, conv.running_max._version)
        if key != self.key:
            self._prepare()
            self.key = key
        out = torch.ops.onednn.qconv2d_pointwise.tensor(
            self.codes(x, self.lo, self.scale), self.scale, self.zero_point, self.packed, self.weight_scales,
            self.weight_zero_points, None, *self.geometry, 1.0, 0, torch.float32, "none", [], "")
        return self.combine(out, self._border(x), self.offset)


def enable(model, fused=False):
    """Run every QConv2d of `model` at 8 bits through Int8Conv in eval mode; returns the model.

    The model is moved to channels_last (its inputs too, by a forward pre-hook), the int8 conv's
    memory format, so that no layer converts between formats; on CPUs this also speeds up the
    fp32 layers, so compare against a channels_last plain network as well (timing.py does).
    fused: the elementwise steps through torch.compile (see fused_step; needs a C++ compiler)."""
    reason = next(filter(None, (unavailable(p.device) for p in model.parameters())), None)
    if reason:
        raise RuntimeError(reason)
    for m in model.modules():
        if isinstance(m, QConv2d):
            m.int8 = Int8Conv(m, fused)
    hook = getattr(model, "_int8_hook", None)
    if hook is not None:  # enabled twice: one hook
        hook.remove()
    model._int8_hook = model.register_forward_pre_hook(to_channels_last)
    return model.to(memory_format=torch.channels_last)


def to_channels_last(module, args):
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def disable(model):
    """Back to the fake-quantized 8-bit forward, in the default memory format."""
    for m in model.modules():
        if isinstance(m, QConv2d):
            m.int8 = None
    hook = getattr(model, "_int8_hook", None)
    if hook is not None:
        hook.remove()
        model._int8_hook = None
    return model.to(memory_format=torch.contiguous_format)
