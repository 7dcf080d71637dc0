"""Eval time of a gated ResNet: dynamic execution (only the chosen option) vs mixed (all options).

    python benchmarks/eval_speed.py [--arch dfs_resnet38] [--batch-size 128] [--device cpu] [--repeats 5]

The gate is steered to one option for every sample (all full, all skip) by its head's bias,
so the dynamic path really groups and dispatches; "spread" lets each sample pick at random.
Prints milliseconds per batch (median of --repeats) and the mixed/dynamic ratio.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import build_model  # noqa: E402


def steer(model, option):
    """Make the gate choose `option` for every sample (None: a random choice per sample and block)."""
    with torch.no_grad():
        model.gate.proj.weight.zero_() if option is not None else model.gate.proj.weight.normal_(0, 5)
        model.gate.proj.bias.fill_(-10.0)
        if option is not None:
            model.gate.proj.bias[model.options.index(option)] = 10.0


def timed(fn, device, repeats):
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="dfs_resnet38")
    p.add_argument("--options", default="default")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.arch, 10, args.options).to(device)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    with torch.no_grad():  # a few training passes give non-trivial BN and activation-range statistics
        for _ in range(2):
            model(x)
    model.eval()
    print(f"{args.arch}, options {list(model.options)}, batch {args.batch_size}, {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'decisions':<10} {'cp %':>6} {'mixed ms':>10} {'dynamic ms':>11} {'mixed/dynamic':>14}")
    for option in ("full", "skip", None):
        if option is not None and option not in model.options:
            continue
        steer(model, option)
        with torch.no_grad():
            cp = float(model.computation_percentage(model(x)[1]))
            mixed = timed(lambda: model(x, execution="mixed"), device, args.repeats)
            dynamic = timed(lambda: model(x), device, args.repeats)
        print(f"{option or 'spread':<10} {cp:>6.1f} {mixed:>10.1f} {dynamic:>11.1f} {mixed / dynamic:>14.2f}")


if __name__ == "__main__":
    main()
