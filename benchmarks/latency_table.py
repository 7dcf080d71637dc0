"""Per-block, per-option eval latency of a DFS network, and a cost table for train_dfs.py --costs.

    python benchmarks/latency_table.py [--depth 38] [--batch-size 128] [--options default] [--int8] \
        [--json latency.json] [--costs-out costs.json]

Each gated block runs each option on its real input shape (the features a random batch reaches it
with), eval mode, no autograd; skip is the block's shortcut. Timed round-robin, medians
(core/timing.py). --costs-out writes, per gated block, each option's time divided by that block's
full-precision time: a latency-true cost table (a departure from the paper's (b/32)^2).
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core import cli, distributed, int8  # noqa: E402
from core.errors import value_error  # noqa: E402
from core.timing import hardware, round_robin  # noqa: E402
from models import build_model  # noqa: E402


@torch.no_grad()
def latency_table(depth, batch_size, options, device, repeats=5, round_ms=200.0, use_int8=False):
    """{"ms": [G][O] milliseconds, "option_names", ...} for the gated blocks of a DFS-ResNet;
    use_int8: the 8-bit option through int8.Int8Conv (eval.py --int8)."""
    torch.manual_seed(0)
    model = build_model(f"dfs_resnet{depth}", 10, options).to(device)
    if use_int8:
        int8.enable(model, fused=int8.can_compile())
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    model.train()
    model(x)  # non-trivial activation ranges and BN statistics
    model.eval()
    inputs, h = [], model.blocks[0](model.stem(x))
    for block in model.blocks[1:]:
        inputs.append(h)
        h = block(h)
    jobs = {(g, k): (lambda block=block, h=h, k=k: model.run_option(block, h, k))
            for g, (block, h) in enumerate(zip(model.blocks[1:], inputs)) for k in range(len(model.options))}
    ms = round_robin(jobs, device, repeats, round_ms)
    table = [[ms[(g, k)] for k in range(len(model.options))] for g in range(len(inputs))]
    return {"depth": depth, "batch_size": batch_size, "option_names": model.option_names, "ms": table,
            "hardware": hardware(device), "repeats": repeats, "int8": use_int8}


def cost_table(result):
    """Per block, each option's time relative to full precision (for --costs)."""
    full = result["option_names"].index("full")
    return [{name: row[k] / row[full] for k, name in enumerate(result["option_names"])} for row in result["ms"]]


def main(argv=None):
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=38)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--options", default="default")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--round-ms", type=float, default=200.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--int8", action="store_true", help="the 8-bit option through oneDNN int8 (eval.py --int8)")
    p.add_argument("--json", help="write the table here")
    p.add_argument("--costs-out", help="write the per-block cost table for train_dfs.py --costs here")
    args = p.parse_args(argv)
    if distributed.unusable(args.device):  # e.g. --device cuda without a GPU: one line, exit 2
        value_error(p, distributed.unusable(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    result = latency_table(args.depth, args.batch_size, args.options, torch.device(args.device), args.repeats,
                           args.round_ms, args.int8)
    print("block " + "".join(f"{n:>9}" for n in result["option_names"]) + "   (ms, relative to full)")
    costs = cost_table(result) if "full" in result["option_names"] else None
    for g, row in enumerate(result["ms"]):
        rel = "" if costs is None else "  " + " ".join(f"{v:.2f}" for v in costs[g].values())
        print(f"{g + 2:>5} " + "".join(f"{v:>9.3f}" for v in row) + rel)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.costs_out:
        if costs is None:
            value_error(p, "--costs-out needs 'full' among the options (costs are relative to it)")
        with open(args.costs_out, "w") as f:
            json.dump(costs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
