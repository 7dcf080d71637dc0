"""Find a static per-block policy at a target computation percentage, on the validation split only.

    python study/search_policy.py CKPT --target 2.5 --out policy.json     # or: python -m study.search_policy ...

A baseline for the study of whether DFS's per-input choice matters (not part of the paper). CKPT
is a gated checkpoint trained with --val-size N; its options, dataset and held-out split are
read from it, and the test set is never touched. The search:

1. Sensitivity: the validation accuracy of the reference policy (every block at its most expensive
   option) and of every policy that changes one block to one other option (G x (O - 1) + 1 evaluations).
2. Knapsack: assuming the accuracy drops add up, for every reachable total cost in the window
   [target - window, target] the policies with the least predicted drop (exact dynamic programming
   over costs in units of 1/1024 of a block, where b bits cost b^2 units).
3. Verification: the `--verify` best predicted policies are evaluated; the most accurate one is written.

Before every evaluation the model's BN and activation-range statistics are recalibrated for that
policy on the same `--calibrate-batches` training batches (from the checkpoint's weights), since
the statistics of one policy are wrong for another. The output JSON holds the policy (option names,
one per gated block, for `train_dfs.py --policy FILE`), its cost and accuracy and every evaluation.
"""
import argparse
import hashlib
import json
import os
import sys

import torch

if __name__ == "__main__":  # run as `python study/search_policy.py`: the modules are at the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
from core.errors import CheckpointError, DFSError, value_error  # noqa: E402
from core.evaluation import evaluate, load_model  # noqa: E402
from core.policy_cost import UNITS, knapsack, option_units, percentage, policy_units  # noqa: E402,F401  (re-exported)


def search(accuracy, units, num_blocks, target, window=0.2, verify=5, known=None):
    """The static policy of highest measured accuracy whose percentage lies in [target - window, target].

    accuracy(policy tuple) -> validation accuracy; known: {policy: accuracy} already measured the
    same way (not measured again). Returns (policy, accuracy, log of this search's evaluations).
    Raises ValueError when no policy's cost lies in the window.
    """
    log = {}
    known = known if known is not None else {}

    def measure(policy):
        if policy not in log:
            log[policy] = known[policy] if policy in known else accuracy(policy)
        return log[policy]
    return _search(measure, log, units, num_blocks, target, window, verify)


def _search(measure, log, units, num_blocks, target, window, verify):
    top = max(range(len(units)), key=lambda k: units[k])
    reference = (top,) * num_blocks
    base = measure(reference)
    drops = [[0.0 if k == top else base - measure(reference[:g] + (k,) + reference[g + 1:])
              for k in range(len(units))] for g in range(num_blocks)]
    scale = UNITS * num_blocks / 100.0
    lo, hi = int(-(-(target - window) * scale // 1)), int(target * scale + 1e-9)
    candidates = sorted(c for entries in knapsack(drops, units, lo, hi, verify).values() for c in entries)[:verify]
    if not candidates:
        raise ValueError(f"no static policy costs between {target - window:g} and {target:g} %")
    _, _, best = max((measure(policy), -i, policy) for i, (_, policy) in enumerate(candidates))
    return best, log[best], log


def make_accuracy(model, calibration, val_batches):
    """accuracy(policy): recalibrate BN and range statistics for the policy, then validation top-1."""
    start = {k: v.clone() for k, v in model.state_dict().items()}
    num_images = sum(len(y) for _, y in val_batches)
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def accuracy(policy):
        model.load_state_dict(start)
        model.train()
        for bn in norms:  # a plain average over the calibration batches, not a running one
            bn.reset_running_stats()
            bn.momentum = None
        with torch.no_grad():
            for x, _ in calibration:
                model(x, force_option=list(policy))
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        force = torch.tensor(policy).expand(num_images, len(policy))
        return evaluate(model, val_batches, force=force)["acc"]

    return accuracy


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_cache(path, key):
    """{policy text: accuracy} from a --cache file made with the same checkpoint and settings, else {}."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"--cache {path}: cannot read it as JSON ({e})")
    if any(saved.get(k) != v for k, v in key.items()):
        raise ValueError(f"--cache {path} holds evaluations of another checkpoint or settings")
    return dict(saved["evaluations"])


def write_json(path, value):
    """Write JSON atomically (a temporary file, then a rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a gated checkpoint trained with --val-size")
    p.add_argument("--target", type=float, required=True, help="computation percentage to reach, in (0, 100]")
    p.add_argument("--window", type=float, default=0.2, help="accept costs in [target - window, target]")
    p.add_argument("--out", required=True, help="the policy JSON to write")
    p.add_argument("--verify", type=int, default=5, help="how many predicted-best policies to evaluate")
    p.add_argument("--calibrate-batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", help="a JSON file of evaluations of this checkpoint with these settings, read and "
                                   "extended (searches at several targets share their sensitivity phase)")
    args = p.parse_args(argv)
    if not 0 < args.target <= 100:
        value_error(p, f"--target must be in (0, 100], got {args.target}")
    try:
        model, ckpt = load_model(args.checkpoint, args.device)
        saved = ckpt.get("args") or {}
        if not hasattr(model, "options") or not saved.get("val_size"):
            raise CheckpointError(f"{args.checkpoint}: the search needs a gated checkpoint trained with --val-size")
        if (ckpt.get("model_config") or {}).get("costs") is not None:
            raise CheckpointError(f"{args.checkpoint} was trained with --costs; the search counts the paper's "
                                  "(b/32)^2 costs only")
        train, val, _ = data.build_batches(saved["dataset"], args.data_dir, args.batch_size, val_size=saved["val_size"],
                                           seed=saved.get("seed", 0), device=args.device)
        stream = data.infinite(train)
        calibration = [next(stream) for _ in range(args.calibrate_batches)]
        units = option_units(model.options)
        accuracy = make_accuracy(model, calibration, val)
        key = {"checkpoint_sha256": file_sha256(args.checkpoint), "calibrate_batches": args.calibrate_batches,
               "batch_size": args.batch_size}
        cache = read_cache(args.cache, key) if args.cache else {}
        known = {tuple(int(k) for k in p.split(",")): a for p, a in cache.items()}
        policy, acc, log = search(accuracy, units, len(model.gate_embeds), args.target, args.window, args.verify,
                                  known)
        if args.cache:
            cache.update({",".join(map(str, p)): a for p, a in log.items()})
            write_json(args.cache, {**key, "evaluations": cache})
    except (DFSError, ValueError) as e:  # CheckpointError, DatasetError; ValueError: the search's own
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "status", 2)
    names = [model.option_names[k] for k in policy]
    measured = sum(p not in known for p in log)
    record = {"policy": names, "computation_percentage": percentage(policy, units), "val_accuracy": acc,
              "target": args.target, "checkpoint": args.checkpoint,
              "measured_here": measured,  # the other evaluations came from --cache
              "evaluations": [{"policy": [model.option_names[k] for k in p], "val_accuracy": a,
                               "computation_percentage": percentage(p, units)} for p, a in log.items()]}
    write_json(args.out, record)
    print(f"policy {','.join(names)}: computation {record['computation_percentage']:.2f} %, "
          f"val top-1 {acc:.2f} % ({len(log)} evaluations, {measured} measured here) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
