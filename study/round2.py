"""Round 2 of the Fashion-MNIST study: does DFS's per-input choice beat a static network of the same cost?

    python study/round2.py [--runs runs/study-dynamic] [--out results/fashion-mnist-dynamic]
    python study/round2.py --analyse-only        # tables and plots from results.json

The plan, fixed before the first run, is OUT/PLAN.md. Every run goes through the real scripts
(train_gate_init.py, train_dfs.py, study/search_policy.py, eval.py) from round 1's released ResNet-20
backbone. Work is done in tiers (PLAN.md); within a tier, run by run. After each run its
weights-only checkpoint goes to OUT/checkpoints/ and its record to OUT/results.json, so the study
resumes where it stopped, in this checkout (unfinished runs continue from runs/) or in a fresh one
(finished runs are skipped; their released checkpoints are the parents of what is left).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core import runfolder  # noqa: E402

BACKBONE = os.path.join(ROOT, "results", "fashion-mnist", "checkpoints", "backbone.pth")
ARCH = "dfs_resnet20"
COMMON = ["--dataset", "fashion-mnist", "--val-size", "5000", "--batch-size", "128", "--print-freq", "50"]
# Round 1's schedules: stage 2 100 iterations at beta 1e-3; stage 3 300 iterations, lr step at 225.
GATE = ["--iters", "100", "--eval-every", "100", "--minimum", "100"]
DFS = ["--iters", "300", "--lr-steps", "225", "--eval-every", "300"]
LONG = ["--iters", "1200", "--lr-steps", "900", "--eval-every", "1200"]  # the schedule question: 4x
OPTION_SETS = {"lowbit": "skip,2,3,4", "paper": "paper", "skipnet": "skipnet"}
# beta makes beta * cost(most expensive option) equal round 1's 5e-3 (1e-3 in stage 2): the lowbit
# set's most expensive option, 4 bits, costs 1/64 of a full block, so its beta is 64 times larger.
BETA = {"lowbit": (0.064, 0.32), "paper": (1e-3, 5e-3), "skipnet": (1e-3, 5e-3)}  # (stage 2, stage 3)
SEEDS = (0, 1, 2)
BUDGETS = (0.5, 0.8, 1.2)
PILOT_BITS = (2, 3, 4, 5, 6, 7, 8)


def plan():
    """Every run, in order: (tier, name, kind, fields). Kinds: gate, dfs, static, search."""
    runs = [(0, "pilot", "pilot", {})]
    for seed in SEEDS:
        runs.append((1, f"gate_lowbit_s{seed}", "gate", dict(options="lowbit", seed=seed)))
        for budget in BUDGETS:
            dfs = f"dfs_lowbit_cp{budget}_s{seed}"
            runs += [(1, dfs, "dfs", dict(options="lowbit", seed=seed, target=budget)),
                     (1, f"static_of_{dfs}", "static", dict(options="lowbit", seed=seed, match=dfs))]
    for seed in SEEDS:
        for bits in (2, 3):
            runs.append((1, f"uniform{bits}_s{seed}", "static", dict(options="lowbit", seed=seed, policy=str(bits))))
    for options in ("skipnet", "paper"):
        runs += [(2, f"gate_{options}_s0", "gate", dict(options=options, seed=0)),
                 (2, f"{options}_cp20_s0_long", "dfs", dict(options=options, seed=0, target=20, long=True))]
    for seed in SEEDS:
        if seed:
            runs.append((3, f"gate_paper_s{seed}", "gate", dict(options="paper", seed=seed)))
        for budget in BUDGETS:
            dfs = f"dfs_paper_cp{budget}_s{seed}"
            runs += [(3, dfs, "dfs", dict(options="paper", seed=seed, target=budget)),
                     (3, f"static_of_{dfs}", "static", dict(options="lowbit", seed=seed, match=dfs))]
    return runs


class Study:
    def __init__(self, runs, out):
        self.runs, self.out = runs, out
        self.results_path = os.path.join(out, "results.json")
        self.results = json.load(open(self.results_path)) if os.path.exists(self.results_path) else {"runs": {}}
        os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
        os.makedirs(os.path.join(out, "policies"), exist_ok=True)
        os.makedirs(runs, exist_ok=True)

    def save(self):
        tmp = self.results_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1)
        os.replace(tmp, self.results_path)

    def sh(self, cmd, log):
        with open(os.path.join(self.runs, log), "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if code != 0:
            sys.exit(f"error: {' '.join(cmd[:5])} ... exited with {code}; see {os.path.join(self.runs, log)}")

    def released(self, name):
        return os.path.join(self.out, "checkpoints", f"{name}.pth")

    def train(self, script, name, parent, flags):
        """Run (resume, or skip) one stage; returns (run folder, wall seconds)."""
        folder = os.path.join(self.runs, name, ARCH)
        latest = os.path.join(folder, runfolder.LATEST)
        cmd = [sys.executable, script, "train", ARCH, *COMMON, "--save-folder", os.path.join(self.runs, name),
               "--resume", latest if os.path.exists(latest) else parent, *flags]
        t = time.time()
        self.sh(cmd, f"{name}.log")
        return folder, time.time() - t

    def evaluate(self, checkpoint, name, controls):
        path = os.path.join(self.runs, f"{name}.eval.json")
        self.sh([sys.executable, "eval.py", checkpoint, "--device", "cpu", "--per-image", "--json", path,
                 *(["--controls", "--control-seed", "0"] if controls else [])], "eval.log")
        record = json.load(open(path))
        record["checkpoint"] = os.path.relpath(checkpoint, ROOT)
        return record

    def release(self, folder, name):
        from core.checkpoint import export_weights
        export_weights(os.path.join(folder, runfolder.BEST), self.released(name))
        return self.released(name)

    def val_record(self, folder):
        with open(os.path.join(folder, runfolder.LOG)) as f:
            return [json.loads(line) for line in f][-1]

    def run_pilot(self):
        import torch
        import data
        from core.checkpoint import load_checkpoint
        from models import build_model
        from study.search_policy import make_accuracy
        model = build_model(ARCH, 10, PILOT_BITS + ("full",))
        model.load_backbone(load_checkpoint(BACKBONE)["model"])
        train, val, _ = data.build_batches("fashion-mnist", os.path.join(ROOT, "data"), 256, val_size=5000, seed=0)
        stream = data.infinite(train)
        accuracy = make_accuracy(model, [next(stream) for _ in range(10)], val)
        torch.manual_seed(0)
        return {"val_accuracy": {name: accuracy((k,) * 8) for k, name in enumerate(model.option_names)},
                "calibration": "10 training batches of 256, BN as a plain average, then the 5,000 validation images"}

    def run(self, name, kind, f):
        seed, options = f.get("seed"), f.get("options")
        base = dict(name=name, kind=kind, seed=seed, options=OPTION_SETS.get(options))
        if kind == "gate":
            folder, wall = self.train("train_gate_init.py", name, BACKBONE,
                                      ["--options", OPTION_SETS[options], "--beta", str(BETA[options][0]),
                                       "--seed", str(seed), *GATE])
            return dict(base, checkpoint=os.path.relpath(self.release(folder, name), ROOT),
                        val=self.val_record(folder), train_wall_seconds=round(wall))
        parent = self.released(f"gate_{options}_s{seed}")
        if kind == "dfs":
            folder, wall = self.train("train_dfs.py", name, parent,
                                      ["--options", OPTION_SETS[options], "--beta", str(BETA[options][1]),
                                       "--minimum", str(f["target"]), "--seed", str(seed),
                                       *(LONG if f.get("long") else DFS)])
            test = self.evaluate(self.release(folder, name), name, controls=True)
            return dict(base, method=f"dfs-{options}" + ("-long" if f.get("long") else ""), target=f["target"],
                        val=self.val_record(folder), test=test, train_wall_seconds=round(wall))
        # static: a uniform policy, or the searched counterpart of a DFS run at its validation cost
        search = None
        if "match" in f:
            target = self.results["runs"][f["match"]]["val"]["computation_percentage"]
            policy = os.path.join(self.out, "policies", f"{name}.json")
            t = time.time()
            cmd = [sys.executable, "study/search_policy.py", parent, "--target", f"{target}", "--out", policy, "--device", "cpu",
                   *(["--window", str(f["window"])] if "window" in f else [])]
            with open(os.path.join(self.runs, f"{name}.search.log"), "a") as log:
                result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.PIPE, text=True)
            if result.returncode != 0:  # e.g. no static policy of that cost: recorded, not fatal
                return dict(base, method="static-counterpart", match=f["match"], failed=result.stderr.strip())
            search = json.load(open(policy))
            search = dict(search, wall_seconds=round(time.time() - t), evaluations=len(search["evaluations"]))
        else:
            policy = f["policy"]
        # beta 0: a static network's cost is fixed, so the penalty would only add a constant to the loss
        folder, wall = self.train("train_dfs.py", name, parent, ["--policy", policy, "--seed", str(seed),
                                                                 "--beta", "0", *DFS])
        test = self.evaluate(self.release(folder, name), name, controls=False)
        method = "static-counterpart" if search else f"static-uniform-{f['policy']}"
        return dict(base, method=method, match=f.get("match"), search=search, val=self.val_record(folder),
                    test=test, train_wall_seconds=round(wall))

    def go(self, tiers):
        for tier, name, kind, fields in plan():
            if tier not in tiers or name in self.results["runs"]:
                continue
            if "match" in fields and fields["match"] not in self.results["runs"]:
                continue  # its DFS run is in a tier not asked for
            t = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            record = self.run_pilot() if kind == "pilot" else self.run(name, kind, fields)
            self.results["runs"][name] = dict(record, tier=tier, code_commit=code_commit(),
                                              torch_threads=torch_threads())
            self.save()
            print(f"[{time.strftime('%H:%M:%S')}] {name} done in {time.time() - t:.0f} s", flush=True)


def posthoc(out, runs_dir):
    """The control added after the first results (PLAN.md, amendment): each DFS checkpoint evaluated
    after re-estimating its BN statistics under its own decisions (eval.py --recalibrate 10).
    Kept in OUT/posthoc.json, apart from the planned records."""
    path = os.path.join(out, "posthoc.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    runs = json.load(open(os.path.join(out, "results.json")))["runs"]
    os.makedirs(runs_dir, exist_ok=True)
    for name, r in sorted(runs.items()):
        if not r.get("method", "").startswith("dfs") or name in done:
            continue
        result = os.path.join(runs_dir, f"{name}.recalibrated.json")
        cmd = [sys.executable, "eval.py", os.path.join(ROOT, r["test"]["checkpoint"]), "--device", "cpu",
               "--recalibrate", "10", "--json", result]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        done[name] = json.load(open(result))["recalibrated"]
        with open(path, "w") as f:
            json.dump(done, f, indent=1)
        print(f"{name}: recalibrated top-1 {done[name]['accuracy']:.2f} %", flush=True)


def amendment(study):
    """Amendment 2 (added after tier 3, outside the plan's rule; PLAN.md): the paper-option DFS runs
    that skip per input (seeds 1 and 2) never reached a budget where the planned {skip, 2, 3, 4}
    counterpart exists, so each gets a static counterpart with its own options, searched below its
    validation cost (window 1 point: those options' static costs are multiples of 0.78 %) and
    fine-tuned like every static run. Kept in OUT/amendment.json, apart from the planned records."""
    path = os.path.join(study.out, "amendment.json")
    done = json.load(open(path)) if os.path.exists(path) else {}
    for seed in (1, 2):
        dfs = f"dfs_paper_cp0.5_s{seed}"
        name = f"paper_static_of_{dfs}"
        if name in done or dfs not in study.results["runs"]:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        record = study.run(name, "static", dict(options="paper", seed=seed, match=dfs, window=1.0))
        done[name] = dict(record, code_commit=code_commit(), torch_threads=torch_threads())
        with open(path, "w") as f:
            json.dump(done, f, indent=1)


def code_commit():
    """The short hash of the checkout a run's code came from (None outside git)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return commit.stdout.strip() or None


def torch_threads():
    import torch
    return torch.get_num_threads()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "study-dynamic"))
    p.add_argument("--out", default=os.path.join(ROOT, "results", "fashion-mnist-dynamic"))
    p.add_argument("--tiers", default="0,1,2,3", help="which tiers of PLAN.md to run")
    p.add_argument("--analyse-only", action="store_true")
    p.add_argument("--posthoc", action="store_true", help="run the amendment's recalibrated control, then analyse")
    p.add_argument("--amendment", action="store_true", help="run amendment 2's paper-option static counterparts")
    args = p.parse_args()
    study = Study(args.runs, args.out)
    if args.posthoc:
        posthoc(args.out, args.runs)
    elif args.amendment:
        amendment(study)
    elif not args.analyse_only:
        study.go({int(t) for t in args.tiers.split(",")})
    from study import round2_analysis
    round2_analysis.write(study.results, args.out)


if __name__ == "__main__":
    main()
