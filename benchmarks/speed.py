"""Speed of DFS training and inference against the plain ResNet, measured in one process.

    python benchmarks/speed.py [--depths 38 74] [--batch-size 128] [--repeats 5] [--only "DFS eval"] [--json out.json]

For each depth: plain train step and eval; DFS train step, sparse (default) and dense (`mixed`,
every option in the autograd graph), with every sample of every block on one option (8 bits)
and spread over two (8 bits, full); DFS eval with the gate running and its decisions steered to
all-full, all-8-bit, all-skip and a spread pattern near 30 % computation, and the mixed
reference; batch-1 latency; memory of each train step (CUDA: peak allocated; CPU: bytes saved
for backward). The configurations are timed round-robin, `--repeats` rounds after a warm-up
round, and each figure is the median of its rounds, so ratios share the machine's conditions.
On CUDA, times come from CUDA events. Prints a table of times and ratios to plain; --json
writes every figure with the settings (device, threads, torch, TF32, compile).
"""
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core import cli, distributed  # noqa: E402
from core.errors import value_error  # noqa: E402
from core.timing import milliseconds  # noqa: E402
from models import build_model  # noqa: E402
from models.gate import straight_through  # noqa: E402

# Option shares of the steered patterns (options of the default set; others get 0).
PATTERNS = {
    "all-full": {"full": 1.0}, "all-8-bit": {8: 1.0}, "all-skip": {"skip": 1.0},
    "two options": {8: 0.5, "full": 0.5},  # about two options chosen per block (training)
    "spread ~30%": {"skip": 0.35, 8: 0.3, 16: 0.1, "full": 0.25},  # 29.4 % expected
}


class SteeredGate(nn.Module):
    """Runs the real gate (its cost counts) but replaces its choices by draws from `shares`."""

    def __init__(self, gate, options, shares, seed=0):
        super().__init__()
        self.gate = gate
        self.probs = torch.tensor([float(shares.get(o, 0.0)) for o in options])
        self.generator = torch.Generator().manual_seed(seed)

    def init_state(self, *args, **kwargs):
        return self.gate.init_state(*args, **kwargs)

    def forward(self, feat, state):
        probs, _, state = self.gate(feat, state)
        choice = torch.multinomial(self.probs, feat.shape[0], replacement=True, generator=self.generator)
        hard = F.one_hot(choice.to(feat.device), len(self.probs)).to(probs.dtype)
        if self.training:
            hard = straight_through(hard, probs)
        return probs, hard, state


def saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward during fn() (distinct storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


class Bench:
    """Named callables timed round-robin; memory measured once per train step."""

    def __init__(self, device, only=None):
        self.device, self.only, self.jobs, self.times, self.memory = device, only, {}, {}, {}

    def add(self, name, fn, train=False):
        """Register a configuration (the plain references always; others if they match --only)."""
        if self.only and " plain " not in name and not any(o in name for o in self.only):
            return
        self.jobs[name] = (fn, train)

    def once(self, fn, calls=1):
        """Milliseconds per call of `calls` back-to-back calls."""
        return milliseconds(fn, self.device, calls)

    def run(self, repeats, round_ms=500):
        """Warm-up round (and memory), then `repeats` rounds; a short job repeats within a round
        until it lasts about `round_ms`, so every figure averages over comparable time."""
        calls = {}
        for name, (fn, train) in self.jobs.items():
            calls[name] = max(1, round(round_ms / self.once(fn)))
            if train:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    fn()
                    torch.cuda.synchronize()
                    self.memory[name] = torch.cuda.max_memory_allocated()
                else:
                    self.memory[name] = saved_bytes(fn)
        for _ in range(repeats):
            for name, (fn, _) in self.jobs.items():
                self.times.setdefault(name, []).append(self.once(fn, calls[name]))
        return {name: statistics.median(t) for name, t in self.times.items()}


def train_step(model, x, y, execution=None):
    """Forward, cross entropy (plus the cost term's graph for DFS), backward; no optimizer."""
    out = model(x) if execution is None else model(x, execution=execution)
    logits, decisions = out if isinstance(out, tuple) else (out, None)
    loss = F.cross_entropy(logits, y)
    if decisions is not None:
        loss = loss + 1e-5 * (decisions * model.option_costs).sum()
    model.zero_grad(set_to_none=True)
    loss.backward()


def add_depth(bench, depth, args, device):
    """Register every configuration of one depth; returns the names of the plain references."""
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    plain = build_model(f"resnet{depth}", 10).to(device)
    dfs = {name: build_model(f"dfs_resnet{depth}", 10, "default").to(device) for name in PATTERNS}
    with torch.no_grad():  # non-trivial BN and activation-range statistics for eval, plain's too
        plain(x)
        for name, model in dfs.items():
            model(x)
    for name, model in dfs.items():
        model.gate = SteeredGate(model.gate, model.options, PATTERNS[name])
    tag = f"ResNet-{depth}"

    def eval_fn(model, inputs, **kw):
        def fn():
            model.eval()
            with torch.no_grad():
                model(inputs, **kw)
        return fn

    def train_fn(model, execution=None):
        def fn():
            model.train()
            train_step(model, x, y, execution)
        return fn

    bench.add(f"{tag} plain train", train_fn(plain), train=True)
    for pattern in ("all-8-bit", "two options"):
        bench.add(f"{tag} DFS train sparse, {pattern}", train_fn(dfs[pattern]), train=True)
        bench.add(f"{tag} DFS train dense, {pattern}", train_fn(dfs[pattern], "mixed"), train=True)
    bench.add(f"{tag} plain eval", eval_fn(plain, x))
    for pattern in ("all-full", "all-8-bit", "all-skip", "spread ~30%"):
        bench.add(f"{tag} DFS eval, {pattern}", eval_fn(dfs[pattern], x))
    bench.add(f"{tag} DFS eval mixed, spread ~30%", eval_fn(dfs["spread ~30%"], x, execution="mixed"))
    x1 = x[:1]
    bench.add(f"{tag} plain eval, batch 1", eval_fn(plain, x1))
    for pattern in ("all-full", "all-8-bit", "all-skip", "spread ~30%"):
        bench.add(f"{tag} DFS eval, {pattern}, batch 1", eval_fn(dfs[pattern], x1))


def reference(name):
    """The plain configuration a figure is compared with."""
    tag = name.split(" ")[0]
    if "batch 1" in name:
        return f"{tag} plain eval, batch 1"
    return f"{tag} plain train" if " train" in name else f"{tag} plain eval"


def main():
    p = cli.Parser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[38, 74])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="+", help="only configurations whose name contains one of these "
                   "(e.g. 'DFS eval'); the plain references always run")
    p.add_argument("--json", help="write the figures and settings here")
    args = p.parse_args()
    if distributed.unusable(args.device):  # e.g. --device cuda without a GPU: one line, exit 2
        value_error(p, distributed.unusable(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    bench = Bench(device, args.only)
    for depth in args.depths:
        add_depth(bench, depth, args, device)
    medians = bench.run(args.repeats)
    settings = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": args.batch_size,
                "repeats": args.repeats, "tf32": False, "compile": False, "options": "default (7)",
                "date": time.strftime("%Y-%m-%d")}
    print(" ".join(f"{k} {v}," for k, v in settings.items()))
    print(f"| configuration | ms | x plain | memory MB |\n|---|---:|---:|---:|")
    rows = []
    for name, ms in medians.items():
        ratio = ms / medians[reference(name)]
        mem = bench.memory.get(name)
        rows.append({"name": name, "ms": ms, "ratio_to_plain": ratio, "memory_bytes": mem, "times_ms": bench.times[name]})
        print(f"| {name} | {ms:.1f} | {ratio:.2f} | {'' if mem is None else f'{mem / 2**20:.0f}'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": settings, "memory": "CUDA peak allocated" if device.type == "cuda"
                       else "bytes saved for backward", "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
