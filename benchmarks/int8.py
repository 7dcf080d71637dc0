"""Can an 8-bit block run faster than full precision? Each conv shape of a CIFAR ResNet, every path.

    python benchmarks/int8.py [--depth 38] [--batch-sizes 128,1] [--json int8.json]

Per conv shape (eval, no autograd), timed round-robin (core/timing.py), with each path's largest
difference from the spec's fake-quantized 8-bit conv on the same input (relative to its largest
value):
  fp32 / fp32 channels_last  full precision (F.conv2d), the two memory formats
  fake-quant 8-bit           the spec's path (QConv2d: quantize the input, conv the cached weight)
  int8 direct                int8.Int8Conv's direct path: codes, one u8 x s8 conv to fp32, two
                             corrections (exact only where oneDNN's kernel is: VNNI/AMX CPUs)
  int8 direct, fused         the same with the codes and the corrections fused by torch.compile
  int8 split, fused          the split path (k = 2q + r, two saturation-free convs stacked along the
                             batch), fused: what CPUs without VNNI run
  torch.ao x86 (approx.)     quantize_per_tensor (integer zero point), quantized Conv2d whose
                             output is requantized to 8 bits, dequantize: not the spec's numbers
  _int_mm GEMM only          torch._int_mm on already unfolded int8 patches (im2col not counted)
  _int_mm + unfold           the same with F.unfold (im2col) counted
Then the whole network at every batch size: plain fp32 (NCHW and channels_last), every block at
8 bits fake-quantized (both formats), and every block at 8 bits through int8.enable (direct eager
and fused, split fused; channels_last). The record names the CPU, the path the self-check chooses
here and ONEDNN_MAX_CPU_ISA (set it to AVX2 to run oneDNN's kernel for CPUs without VNNI).
"""
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core import cli, int8  # noqa: E402
from core.provenance import cpu as cpu_info  # noqa: E402
from core.timing import hardware, round_robin  # noqa: E402
from models import build_model  # noqa: E402
from quantize import fake_quantize, grid_scale  # noqa: E402


def conv_shapes(model, images):
    """Distinct (in, out, kernel, stride, input size) of the gated blocks' convs, with one input each
    (the features `images` reach it with)."""
    shapes, h = {}, model.blocks[0](model.stem(images))
    for block in model.blocks[1:]:
        for name in ("conv1", "conv2", "shortcut_conv"):
            conv = getattr(block, name, None)
            x = h if name != "conv2" else torch.relu(block.bn1(block.conv1(h)))
            if conv is not None:
                key = (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], x.shape[-1])
                shapes.setdefault(key, (conv, x))
        h = block(h)
    return shapes


def ao_conv(conv, x):
    """torch.ao's affine int8 conv for the same grid: zero points rounded, output requantized."""
    import torch.ao.nn.quantized as nnq
    lo, hi = conv.running_min, conv.running_max
    scale = grid_scale(lo, hi, 8, x.dtype).item()
    zero = int(round(-lo.item() / scale))
    w = conv.weight.detach()
    w_scale = w.abs().max().item() / 127
    q = nnq.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    q.set_weight_bias(torch.quantize_per_tensor(w, w_scale, 0, torch.qint8), None)
    ref = F.conv2d(fake_quantize(x, 8, lo, hi), conv.quantized_weight(8), None, conv.stride, conv.padding)
    lo_out, hi_out = ref.min().item(), ref.max().item()
    q.scale = (hi_out - lo_out) / 255
    q.zero_point = int(round(-lo_out / q.scale))
    return lambda: q(torch.quantize_per_tensor(x, scale, zero, torch.quint8)).dequantize()


def int_mm_jobs(conv, x):
    """torch._int_mm over unfolded patches: the GEMM alone, and with F.unfold."""
    k = conv.kernel_size[0]
    codes = int8.grid_codes(x, conv.running_min, grid_scale(conv.running_min, conv.running_max, 8, x.dtype))
    weight = torch.randint(-128, 128, (conv.in_channels * k * k, conv.out_channels), dtype=torch.int8)

    def rows():
        """The signed int8 patches, one row per output pixel (im2col)."""
        p = F.unfold(codes, k, padding=conv.padding, stride=conv.stride).sub_(128).to(torch.int8)
        return p.transpose(1, 2).reshape(-1, p.shape[1])
    unfolded = rows().contiguous()
    if len(unfolded) <= 16:  # _int_mm needs more than 16 rows
        return {}
    return {"_int_mm GEMM only": lambda: torch._int_mm(unfolded, weight),
            "_int_mm + unfold": lambda: torch._int_mm(rows(), weight)}


@torch.no_grad()
def measure(depth, batch_sizes, repeats, round_ms):
    torch.manual_seed(0)
    model = build_model(f"dfs_resnet{depth}", 10, "default")
    model.train()
    model(torch.randn(256, 3, 32, 32))  # non-trivial activation ranges and BN statistics
    model.eval()
    eight = model.option_names.index("8-bit")
    plain = build_model(f"resnet{depth}", 10).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    plain_cl = build_model(f"resnet{depth}", 10).eval().to(memory_format=torch.channels_last)
    plain_cl.load_state_dict(plain.state_dict())
    cpu = torch.device("cpu")
    out = {"hardware": hardware(cpu), "cpu": cpu_info(), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
           "path": int8.choose_path(int8.probes(model)), "depth": depth, "repeats": repeats, "convs": [],
           "network": []}
    print(f"{out['cpu']}, ONEDNN_MAX_CPU_ISA={out['onednn_max_cpu_isa']}: the self-check chooses the "
          f"{out['path']} path", flush=True)
    paths = {"int8 direct": ("direct", False), "int8 direct, fused": ("direct", True),
             "int8 split, fused": ("split", True)}
    for b in batch_sizes:
        images = torch.randn(b, 3, 32, 32)
        for (cin, cout, k, stride, size), (conv, x) in conv_shapes(model, images).items():
            int8.disable(model)
            ref = conv(x, 8)
            convs = {name: int8.Int8Conv(conv, fused, path) for name, (path, fused) in paths.items()}
            cl = torch.channels_last
            x_cl, w_cl = x.contiguous(memory_format=cl), conv.weight.contiguous(memory_format=cl)
            jobs = {"fp32": lambda: F.conv2d(x, conv.weight, None, conv.stride, conv.padding),
                    "fp32 channels_last": lambda: F.conv2d(x_cl, w_cl, None, conv.stride, conv.padding),
                    "fake-quant 8-bit": lambda: conv(x, 8),
                    **{name: (lambda c=c: c(x)) for name, c in convs.items()},
                    "torch.ao x86 (approx.)": ao_conv(conv, x),
                    **int_mm_jobs(conv, x)}
            scale = ref.abs().max()
            error = {name: ((jobs[name]() - ref).abs().max() / scale).item()
                     for name in (*paths, "torch.ao x86 (approx.)")}
            ms = round_robin(jobs, cpu, repeats, round_ms)
            row = {"batch": b, "in": cin, "out": cout, "kernel": k, "stride": stride, "size": size, "ms": ms,
                   "relative_error": error}
            out["convs"].append(row)
            print(f"batch {b:>3} conv {k}x{k} {cin:>2}->{cout:<2} s{stride} {size:>2}x{size:<2} "
                  + "  ".join(f"{n} {v:.3f}" for n, v in ms.items())
                  + "  | error: " + ", ".join(f"{n} {e:.1e}" for n, e in error.items()),
                  flush=True)
        x = images
        models = {name: int8.enable(build_model(f"dfs_resnet{depth}", 10, "default"), fused, path)
                  for name, (path, fused) in paths.items()}
        for m in models.values():
            m.load_state_dict(model.state_dict())
            m.eval()
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fake_cl = build_model(f"dfs_resnet{depth}", 10, "default").eval().to(memory_format=torch.channels_last)
        fake_cl.load_state_dict(model.state_dict())
        jobs = {"plain fp32": lambda: plain(x), "plain fp32 channels_last": lambda: plain_cl(x_cl),
                "all 8-bit fake-quant": lambda: model(x, force_option=eight),
                "all 8-bit fake-quant channels_last": lambda: fake_cl(x_cl, force_option=eight),
                **{f"all 8-bit {name}": (lambda m=m: m(x, force_option=eight)) for name, m in models.items()}}
        ms = round_robin(jobs, cpu, repeats, round_ms)
        ref = model(x, force_option=eight)[0]
        diff = {name: (m(x, force_option=eight)[0] - ref).abs().max().item() for name, m in models.items()}
        out["network"].append({"batch": b, "ms": ms, "max_logit_difference": diff,
                               "steps": {name: int8.steps_of(m) for name, m in models.items()}})
        base = ms["plain fp32"]
        print(f"batch {b:>3} ResNet-{depth}: " + "  ".join(f"{n} {v:.2f} ms ({v / base:.2f}x)" for n, v in ms.items())
              + "  | max logit difference from fake-quant: " + ", ".join(f"{n} {d:.2e}" for n, d in diff.items())
              + f"; steps {out['network'][-1]['steps']}", flush=True)
    return out


def main(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=38)
    p.add_argument("--batch-sizes", default="128,1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--round-ms", type=float, default=200.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args(argv)
    if not int8.available():
        print("this PyTorch build has no oneDNN quantized convolution; nothing to measure")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    result = measure(args.depth, [int(b) for b in args.batch_sizes.split(",")], args.repeats, args.round_ms)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
