"""Wall-clock timing shared by eval.py --time, benchmarks/ and scripts/gpu_check.py.

Configurations are timed round-robin: a warm-up call each, then `repeats` rounds in which every
configuration runs back to back for about `round_ms`; each figure is the median of its rounds, so
ratios between configurations share the machine's conditions. CUDA times come from CUDA events.
"""
import copy
import platform
import statistics
import time

import torch


def milliseconds(fn, device, calls=1):
    """Milliseconds per call of `calls` back-to-back calls of fn()."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / calls
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1000 * (time.perf_counter() - t) / calls


def round_robin(jobs, device, repeats=5, round_ms=300.0):
    """{name: median milliseconds per call} of the callables in `jobs`, timed round-robin."""
    calls = {name: max(1, round(round_ms / max(milliseconds(fn, device), 1e-3))) for name, fn in jobs.items()}
    times = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, fn in jobs.items():
            times[name].append(milliseconds(fn, device, calls[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def hardware(device):
    """Where a timing was measured."""
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@torch.no_grad()
def time_against_plain(model, plain, x, device, repeats=5, round_ms=300.0):
    """Eval time of a gated model with its own decisions on `x`, against `plain`, the plain ResNet
    with the same weights (the gate removed, every block at full precision; the caller builds it,
    e.g. eval.plain_resnet), at batch len(x) and batch 1. The plain ResNet is also timed in
    channels_last (a faster fp32 layout on CPUs), the stronger full-precision baseline."""
    plain = plain.to(device)
    plain_cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    for m in (model, plain, plain_cl):
        m.eval()
    x = x.to(device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    jobs = {}
    for b in sorted({len(x), 1}, reverse=True):
        jobs[f"gated batch {b}"] = lambda b=b: model(x[:b])
        jobs[f"plain batch {b}"] = lambda b=b: plain(x[:b])
        jobs[f"plain_cl batch {b}"] = lambda b=b: plain_cl(x_cl[:b])
    ms = round_robin(jobs, device, repeats, round_ms)
    out = {"hardware": hardware(device), "repeats": repeats}
    for b in sorted({len(x), 1}, reverse=True):
        gated, base, cl = ms[f"gated batch {b}"], ms[f"plain batch {b}"], ms[f"plain_cl batch {b}"]
        out[f"batch_{b}"] = {"gated_ms": gated, "plain_ms": base, "time_percentage": 100 * gated / base,
                             "plain_channels_last_ms": cl, "time_percentage_vs_channels_last": 100 * gated / cl}
    return out
