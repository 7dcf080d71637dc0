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

On CPUs without int8 dot-product units (AVX2 only, or AVX-512 without VNNI: AMD Zen 1-3, Intel
before Cascade Lake, many cloud VMs), oneDNN's u8 x s8 kernel adds pairs of u8*s8 products in int16
(vpmaddubsw) and saturates: 255*127*2 > 32767, so the direct path above is wrong there by up to 14 %
of the output's scale, silently. Which kernel oneDNN picks is its own choice (CPU flags, ONEDNN_MAX_CPU_ISA),
so the path is chosen by a self-check, not by the CPU's name: one tiny conv per geometry of the
model, with extreme codes, against the exact integer sums (check_kernel). When the direct kernel
is exact, PATHS "direct"; else "split": every input code k = 2q + r (q = k >> 1 in 0..127, r = k & 1)
and the conv runs on q and r, stacked along the batch, then 2 conv(q) + conv(r): no pair exceeds
127*128*2 = 32512, so nothing saturates, and the result is again the fake-quantized conv up to fp32
rounding, at twice the int8 work. When neither is exact, --int8 refuses in one line.

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
PATHS = ("direct", "split")  # one u8 conv; the codes split in two saturation-free convs (module docstring)


def grid_codes(x, lo, scale):
    """fake_quantize's codes of x on the 8-bit grid, as floats: (x - lo) / scale, rounded, clamped."""
    return (x - lo).div(scale).round().clamp(0, 2 ** BITS - 1)


def codes(x, lo, scale):
    """The codes of an input, as uint8 in channels_last (the int8 conv's input)."""
    return grid_codes(x, lo, scale).to(torch.uint8).contiguous(memory_format=torch.channels_last)


def split_codes(x, lo, scale):
    """The codes k = 2q + r as [q; r] stacked along the batch, uint8 in channels_last (the split path)."""
    k = grid_codes(x, lo, scale)
    q = k.div(2, rounding_mode="floor")
    return torch.cat([q, k - 2 * q]).to(torch.uint8).contiguous(memory_format=torch.channels_last)


def combine(out, border, offset):
    """s_x s_w Σ k_x (k_w - 128) + c_w (s_x Σ k_x) + lo_x Σ' w_q, from the conv's C_out + 1 channels;
    channels_last, like the conv's output, so what follows stays in one memory format."""
    out = torch.addcmul(border, out[:, -1:], offset) + out[:, :-1]
    return out.contiguous(memory_format=torch.channels_last)


def split_combine(out, border, offset):
    """combine() of 2 conv(q) + conv(r), from the split path's [q; r] output."""
    half = len(out) // 2
    return combine(torch.add(out[half:], out[:half], alpha=2), border, offset)


STEPS = {"direct": (codes, combine), "split": (split_codes, split_combine)}


@functools.cache
def fused_step(name):
    """codes or combine through torch.compile. Each is five (two) passes over memory in eager mode,
    which costs more than the int8 conv itself; Inductor (a C++ compiler) fuses each into one.
    Wrapped on first request, not at import: torch.compile imports torch._dynamo, about 2 s that
    eval.py would otherwise pay without --int8; compiled on first call."""
    steps = {f.__name__: f for f in (codes, combine, split_codes, split_combine)}
    return torch.compile(steps[name], dynamic=True)


def can_compile():
    """Whether Inductor can build CPU kernels here (it needs a C++ compiler)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def available():
    """Whether this torch build has oneDNN's quantized convolution (x86 CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


def onednn_kernel(codes, weight, geometry):
    """Σ k_x w over each window from uint8 codes [N, C, H, W] and int8 weights, through oneDNN's
    u8 x s8 convolution with unit scales, as fp32: the kernel that Int8Conv runs."""
    ones = torch.ones(len(weight))
    zeros = torch.zeros(len(weight), dtype=torch.int64)
    packed = torch.ops.onednn.qconv_prepack(weight, ones, 1.0, 0, *geometry, None)
    return torch.ops.onednn.qconv2d_pointwise.tensor(
        codes.contiguous(memory_format=torch.channels_last), torch.tensor(1.0), torch.zeros((), dtype=torch.int64),
        packed, ones, zeros, None, *geometry, 1.0, 0, torch.float32, "none", [], "")


def check_kernel(probe, path, kernel=onednn_kernel):
    """Whether `kernel` computes one conv shape's integer sums exactly (up to fp32 rounding) along `path`.

    probe: (geometry [stride, padding, dilation, groups], C_in, C_out, kernel size), a shape of the
    model (oneDNN picks its kernel by shape). The probe is the worst case for int16 pair sums: input
    codes of 255 and random ones, weights of -128, 127 and random ones, so that a kernel which
    saturates is off by about 32,000 per pair while an exact one is off by fp32 rounding at most."""
    geometry, in_channels, out_channels, (kh, kw) = probe
    stride, padding, dilation, groups = geometry
    g = torch.Generator().manual_seed(0)
    size = 2 * max(kh, kw) + 2
    k = torch.randint(0, 256, (2, in_channels, size, size), generator=g)
    k[0, :, : size // 2] = 255
    w = torch.randint(-128, 128, (out_channels + 1, in_channels // groups, kh, kw), generator=g)
    w[0], w[1] = -128, 127
    exact = F.conv2d(k.double(), w.double(), None, stride, padding, dilation, groups)
    codes, w8 = k.to(torch.uint8), w.to(torch.int8)
    if path == "direct":
        got = kernel(codes, w8, geometry).double()
    else:
        q = codes // 2
        got = 2 * kernel(q, w8, geometry).double() + kernel(codes - 2 * q, w8, geometry).double()
    # int32 sums above 2^24 round when converted to fp32: 3 half-ulps at most (the split path's 2a + b)
    return got.shape == exact.shape and (got - exact).abs().max().item() <= 3 * 2.0 ** -24 * exact.abs().max().item()


def probe(conv):
    """A QConv2d's shape, as check_kernel's probe."""
    geometry = [list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups]
    return geometry, conv.in_channels, conv.out_channels, tuple(conv.kernel_size)


def probes(model):
    """The distinct shapes of the model's QConv2d layers."""
    return list({repr(probe(m)): probe(m) for m in model.modules() if isinstance(m, QConv2d)}.values())


def choose_path(shapes, kernel=onednn_kernel):
    """The first of PATHS whose kernel is exact for every probe in `shapes`, or None (about 50 ms a probe)."""
    return next((path for path in PATHS if all(check_kernel(p, path, kernel) for p in shapes)), None)


def cpu_name():
    """The CPU's model name and torch's capability, e.g. 'AMD EPYC 7B13 (torch AVX2)'."""
    from core.provenance import cpu
    info = cpu()
    return f"{info['cpu']} (torch {info['cpu_capability']})"


def unavailable(device):
    """Why --int8 cannot run on `device`, in one line, or None if it can."""
    if torch.device(device).type != "cpu":
        return "--int8 runs on the CPU only (oneDNN's int8 convolution); add --device cpu"
    if not available():
        return "--int8 needs a PyTorch build with oneDNN's quantized convolution (x86 CPU)"
    return None


class InexactKernel(RuntimeError):
    """oneDNN's int8 convolution is exact along no path on this CPU (see check_kernel)."""


def inexact_message():
    return (f"--int8: oneDNN's int8 convolution is not exact on this CPU ({cpu_name()}), not even with the "
            f"codes split in two; evaluate without --int8")


class Int8Conv:
    """The 8-bit forward of one eval-mode QConv2d through oneDNN's u8 x s8 convolution."""

    def __init__(self, conv, fused=False, path=None):
        """path: one of PATHS, or None for the first that check_kernel finds exact for this conv."""
        if conv.stochastic_act_rounding:
            raise ValueError("--int8 computes round-to-nearest codes, not the dithered activation rounding "
                             "this model uses")
        path = path or choose_path([probe(conv)])
        if path is None:
            raise InexactKernel(inexact_message())
        if path not in PATHS:
            raise ValueError(f"unknown int8 path {path!r}; one of {', '.join(PATHS)}")
        self.conv, self.key, self.border, self.path = conv, None, {}, path
        self.eager = STEPS[path]
        self.fused = tuple(fused_step(f.__name__) for f in self.eager) if fused else None
        self.checked = set()  # the (shape, strides) of inputs on which the fused steps were checked
        self.fused_failed = False  # whether they disagreed with the eager ones once (then eager from there on)

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
        codes, combine = self._steps(x)
        out = self._conv(codes(x, self.lo, self.scale))
        return combine(out, self._border(x), self.offset)

    def _conv(self, codes):
        return torch.ops.onednn.qconv2d_pointwise.tensor(
            codes, self.scale, self.zero_point, self.packed, self.weight_scales, self.weight_zero_points, None,
            *self.geometry, 1.0, 0, torch.float32, "none", [], "")

    def _steps(self, x):
        """The fused steps where they agree with the eager ones, checked on the first input of each
        shape and strides; else the eager ones. Inductor has miscompiled the codes step (CPUs where
        torch's capability is AVX2, single-threaded, dynamic shapes: wrong codes for a third of the
        elements), so the fused steps are trusted only where they were seen to agree: the codes
        exactly, the corrections up to fp32 rounding (Inductor may contract them into an FMA). On
        the CPU only, so comparing on the host synchronises nothing."""
        if self.fused is None or self.fused_failed:
            return self.eager
        key = (tuple(x.shape), x.stride())
        if key not in self.checked:
            codes = self.eager[0](x, self.lo, self.scale)
            out = self._conv(codes)
            border = self._border(x)
            eager, fused = self.eager[1](out, border, self.offset), self.fused[1](out, border, self.offset)
            tolerance = 1e-6 * eager.abs().max().item()
            if not (torch.equal(self.fused[0](x, self.lo, self.scale), codes)
                    and (fused - eager).abs().max().item() <= tolerance):
                self.fused_failed = True
                return self.eager
            self.checked.add(key)
        return self.fused




def enable(model, fused=False, path=None, kernel=onednn_kernel):
    """Run every QConv2d of `model` at 8 bits through Int8Conv in eval mode; returns the model.

    path: one of PATHS, or None to take the first that check_kernel finds exact for every conv
    shape of the model (`kernel`, the one under test); InexactKernel if there is none. A forced
    path is not checked (the tests force "split" on CPUs whose direct kernel is exact).
    path_of(model) tells which path runs.

    The model is moved to channels_last (its inputs too, by a forward pre-hook), the int8 conv's
    memory format, so that no layer converts between formats; on CPUs this also speeds up the
    fp32 layers, so compare against a channels_last plain network as well (timing.py does).
    fused: the elementwise steps through torch.compile (see fused_step; needs a C++ compiler)."""
    reason = next(filter(None, (unavailable(p.device) for p in model.parameters())), None)
    if reason:
        raise RuntimeError(reason)
    path = path or choose_path(probes(model), kernel)
    if path is None:
        raise InexactKernel(inexact_message())
    for m in model.modules():
        if isinstance(m, QConv2d):
            m.int8 = Int8Conv(m, fused, path)
    hook = getattr(model, "_int8_hook", None)
    if hook is not None:  # enabled twice: one hook
        hook.remove()
    model._int8_hook = model.register_forward_pre_hook(to_channels_last)
    return model.to(memory_format=torch.channels_last)


def describe(path):
    """One line on what `path` means, naming this CPU (eval.py --int8 prints it)."""
    why = {"direct": "one u8 x s8 convolution; its kernel is exact on this CPU",
           "split": "each code split in two saturation-free convolutions, twice the int8 work; "
                    "the one-conv kernel saturates on this CPU (no int8 dot-product units)"}[path]
    return f"the {path} path ({why}: {cpu_name()})"


def steps_of(model):
    """How the elementwise steps ran: "fused", "eager", or "eager (fused steps disagreed)" when the
    fused ones failed their check in some conv (Int8Conv._steps); None when int8 is not enabled."""
    convs = [m.int8 for m in model.modules() if isinstance(m, QConv2d) and m.int8 is not None]
    if not convs:
        return None
    if any(c.fused_failed for c in convs):
        return "eager (fused steps disagreed)"
    return "fused" if convs[0].fused is not None else "eager"


def path_of(model):
    """The int8 path enable() chose for `model` (one of PATHS), or None when int8 is not enabled."""
    return next((m.int8.path for m in model.modules() if isinstance(m, QConv2d) and m.int8 is not None), None)


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
