"""Round 3 of the Fashion-MNIST study: is the static network's win the per-input choice or the shared BN?

    python study/round3.py --lane A      # tier 0, the low-bit beta pilot, tier 1
    python study/round3.py --lane B      # the marked backbone, the paper-option pilot, tiers 3 and 2
    python study/round3.py --analyse-only

The plan, committed before the first run, is OUT/PLAN.md. Every run goes through the real scripts
(train_*.py, study/search_policy.py, eval.py). The two lanes may run at once (one thread each); both write
OUT/results.json, under a lock, one record per finished run: the single source of every number.
After each run its weights-only checkpoint goes to OUT/checkpoints/ and its training log to
OUT/logs/, so the study resumes where it stopped (finished runs are skipped).
"""
import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core import runfolder  # noqa: E402
from core.provenance import provenance  # noqa: E402

R1 = "results/fashion-mnist"
R2 = "results/fashion-mnist-dynamic"
BACKBONE = f"{R1}/checkpoints/backbone.pth"
ARCH = "dfs_resnet20"
GATE = ["--iters", "100", "--eval-every", "100", "--minimum", "100"]
DFS = ["--iters", "300", "--lr-steps", "225", "--eval-every", "300"]
BASE = ["--iters", "2000", "--lr-steps", "1200", "1700", "--eval-every", "2000"]
OPTIONS = {"lowbit": "skip,2,3,4", "paper": "paper"}
GATE_BETA = {"lowbit": "0.064", "paper": "1e-3"}  # round 2's stage-2 beta
PILOTS = {"lowbit": dict(target=0.8, bn="per-option", betas=("0.08", "0.32", "1.28")),
          "paper": dict(target=3.0, bn="shared", betas=("0.02", "0.08", "0.32"))}
WINDOW = {"lowbit": 0.2, "paper": 1.0}  # the search window below DFS's validation cost
SEEDS = (0, 1, 2)
BUDGETS = (0.5, 0.8, 1.2)
PAPER_BUDGET = 3.0
# round 2's 9 low-bit DFS networks and its 3 paper-option ones (a seed's three budgets trained identical networks)
R2_DFS = [f"dfs_lowbit_cp{b}_s{s}" for b in BUDGETS for s in SEEDS] + [f"dfs_paper_cp0.5_s{s}" for s in SEEDS]


def plan():
    """Every run in order: (lane, tier, name, kind, fields)."""
    runs = [("A", 0, f"r2_{n}", "reeval", dict(checkpoint=f"{R2}/checkpoints/{n}.pth")) for n in R2_DFS]
    runs.append(("A", 1, "gate_po_lowbit_s0", "gate", dict(options="lowbit", seed=0, bn="per-option")))
    for beta in PILOTS["lowbit"]["betas"]:
        runs.append(("A", 1, f"pilot_lowbit_b{beta}", "dfs", dict(options="lowbit", seed=0, bn="per-option",
                                                                  target=0.8, beta=beta, parent="gate_po_lowbit_s0")))
    for seed in SEEDS:
        if seed:
            runs.append(("A", 1, f"gate_po_lowbit_s{seed}", "gate", dict(options="lowbit", seed=seed, bn="per-option")))
        for budget in BUDGETS:
            dfs = f"dfs_po_lowbit_cp{budget}_s{seed}"
            runs += [("A", 1, dfs, "dfs", dict(options="lowbit", seed=seed, bn="per-option", target=budget,
                                                pilot="lowbit", parent=f"gate_po_lowbit_s{seed}")),
                     ("A", 1, f"static_of_{dfs}", "static", dict(options="lowbit", seed=seed, match=dfs,
                                                                  parent=f"{R2}/checkpoints/gate_lowbit_s{seed}.pth"))]
    runs.append(("B", 3, "backbone_marked", "base", dict(seed=0, dataset="fashion-mnist-marked")))
    for beta in PILOTS["paper"]["betas"]:
        runs.append(("B", 2, f"pilot_paper_b{beta}", "dfs", dict(options="paper", seed=0, bn="shared", target=3.0,
                                                                 beta=beta, parent=f"{R2}/checkpoints/gate_paper_s0.pth")))
    for seed in SEEDS:  # tier 3: the positive control
        data = "fashion-mnist-marked"
        for bn in ("shared", "per-option"):
            tag = "po_" if bn == "per-option" else ""
            gate, dfs = f"gate_{tag}marked_s{seed}", f"dfs_{tag}marked_cp{PAPER_BUDGET}_s{seed}"
            runs += [("B", 3, gate, "gate", dict(options="paper", seed=seed, bn=bn, dataset=data,
                                                 parent="backbone_marked")),
                     ("B", 3, dfs, "dfs", dict(options="paper", seed=seed, bn=bn, target=PAPER_BUDGET, dataset=data,
                                               pilot="paper", parent=gate)),
                     ("B", 3, f"static_of_{dfs}", "static", dict(options="paper", seed=seed, match=dfs, dataset=data,
                                                                  parent=f"gate_marked_s{seed}"))]
    for seed in SEEDS:  # tier 2: the paper's options at a budget below 6.25 %
        for bn in ("shared", "per-option"):
            tag = "po_" if bn == "per-option" else ""
            parent = f"{R2}/checkpoints/gate_paper_s{seed}.pth"
            if bn == "per-option":
                runs.append(("B", 2, f"gate_po_paper_s{seed}", "gate", dict(options="paper", seed=seed, bn=bn)))
                parent = f"gate_po_paper_s{seed}"
            dfs = f"dfs_{tag}paper_cp{PAPER_BUDGET}_s{seed}"
            runs += [("B", 2, dfs, "dfs", dict(options="paper", seed=seed, bn=bn, target=PAPER_BUDGET, pilot="paper",
                                               parent=parent)),
                     ("B", 2, f"static_of_{dfs}", "static", dict(options="paper", seed=seed, match=dfs,
                                                                  parent=f"{R2}/checkpoints/gate_paper_s{seed}.pth"))]
    return runs


def select_beta(records, kind):
    """The plan's rule: among the pilot runs whose validation cost is at most 1.1 x the target, the most
    accurate on validation; if none, the cheapest. Returns (beta, run name)."""
    target = PILOTS[kind]["target"]
    pilots = [(b, records[f"pilot_{kind}_b{b}"]["val"]) for b in PILOTS[kind]["betas"]]
    binding = [(v["acc"], b) for b, v in pilots if v["computation_percentage"] <= 1.1 * target]
    beta = max(binding)[1] if binding else min((v["computation_percentage"], b) for b, v in pilots)[1]
    return beta, f"pilot_{kind}_b{beta}"


class Study:
    def __init__(self, out, runs):
        self.out, self.runs = out, runs
        self.records_path = os.path.join(out, "results.json")
        for sub in ("checkpoints", "logs", "policies"):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
        os.makedirs(runs, exist_ok=True)

    @contextmanager
    def locked(self):
        with open(self.records_path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def records(self):
        with self.locked():
            return self._read()

    def _read(self):
        if not os.path.exists(self.records_path):
            return {}
        with open(self.records_path) as f:
            return json.load(f)["runs"]

    def save(self, name, record):
        """Write one run's record, with the provenance of the process that finished it (code, versions, CPU)."""
        record = {**record, "provenance": record.get("provenance") or provenance()}
        with self.locked():
            runs = self._read()
            runs[name] = record
            tmp = self.records_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"runs": dict(sorted(runs.items()))}, f, indent=1)
            os.replace(tmp, self.records_path)

    def sh(self, cmd, log):
        env = one_thread_env()
        with open(os.path.join(self.runs, log), "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            sys.exit(f"error: {' '.join(cmd[:5])} ... exited with {code}; see {os.path.join(self.runs, log)}")

    def checkpoint(self, name):
        """A released checkpoint: a path in the repository, or a run of this study by name."""
        return name if name.endswith(".pth") else os.path.relpath(os.path.join(self.out, "checkpoints", f"{name}.pth"), ROOT)

    def train(self, script, name, parent, flags, dataset, arch=ARCH):
        """Run (resume, or skip) one stage, then release its best checkpoint and its logs."""
        folder = os.path.join(self.runs, name, arch)
        latest = os.path.join(folder, runfolder.LATEST)
        common = ["--dataset", dataset, "--val-size", "5000", "--batch-size", "128", "--print-freq", "50"]
        cmd = [sys.executable, script, "train", arch, *common, "--save-folder", os.path.join(self.runs, name),
               *(["--resume", latest if os.path.exists(latest) else parent] if parent else []), *flags]
        t = time.time()
        self.sh(cmd, f"{name}.log")
        wall = time.time() - t
        from core.checkpoint import export_weights
        export_weights(os.path.join(folder, runfolder.BEST), os.path.join(ROOT, self.checkpoint(name)))
        logs = os.path.join(self.out, "logs", name)
        os.makedirs(logs, exist_ok=True)
        for f in (runfolder.LOG, "train.log", "args.json"):
            if os.path.exists(os.path.join(folder, f)):
                shutil.copy(os.path.join(folder, f), logs)
        with open(os.path.join(folder, runfolder.LOG)) as f:
            val = [json.loads(line) for line in f][-1]
        return dict(checkpoint=self.checkpoint(name), val=val, train_wall_seconds=round(wall))

    def evaluate(self, checkpoint, name, gated, dataset=None):
        path = os.path.join(self.runs, f"{name}.eval.json")
        extra = ["--controls", "--control-seed", "0", "--recalibrate", "10"] if gated else []
        self.sh([sys.executable, "eval.py", checkpoint, "--device", "cpu", "--per-image", "--json", path, *extra],
                "eval.log")
        with open(path) as f:
            record = json.load(f)
        if dataset == "fashion-mnist-marked":
            record["halves"] = halves(checkpoint)
        return record

    def run(self, name, kind, f, records):
        dataset = f.get("dataset", "fashion-mnist")
        seed = f.get("seed")
        base = dict(name=name, kind=kind, seed=seed, options=OPTIONS.get(f.get("options")), bn=f.get("bn"),
                    dataset=dataset)
        if kind == "reeval":
            return dict(base, round2=os.path.basename(f["checkpoint"])[:-4],
                        test=self.evaluate(f["checkpoint"], name, gated=True))
        if kind == "base":
            r = self.train("train_base.py", name, None, [*BASE, "--seed", str(seed)], dataset, arch="resnet20")
            return dict(base, **r, test=self.evaluate(r["checkpoint"], name, False, dataset))
        parent = self.checkpoint(f.get("parent", BACKBONE))
        if kind == "gate":
            flags = ["--options", OPTIONS[f["options"]], "--beta", GATE_BETA[f["options"]], "--seed", str(seed),
                     "--bn", f["bn"], *GATE]
            return dict(base, **self.train("train_gate_init.py", name, parent, flags, dataset))
        if kind == "dfs":
            beta, pilot = (f["beta"], None) if "beta" in f else select_beta(records, f["pilot"])
            same = records.get(pilot)
            if same and (same["seed"], same["target"], same["bn"], same["dataset"]) == (seed, f["target"], f["bn"], dataset) \
                    and same["parent"] == f["parent"].split("/")[-1].removesuffix(".pth"):
                return dict(same, name=name, same_as=pilot, beta_selected_by=pilot)  # the pilot's run is this run
            flags = ["--options", OPTIONS[f["options"]], "--beta", beta, "--minimum", str(f["target"]),
                     "--seed", str(seed), "--bn", f["bn"], *DFS]
            r = self.train("train_dfs.py", name, parent, flags, dataset)
            return dict(base, **r, target=f["target"], beta=beta, beta_selected_by=pilot,
                        parent=f["parent"].split("/")[-1].removesuffix(".pth"),
                        test=self.evaluate(r["checkpoint"], name, True, dataset))
        return self.static(name, f, base, records, parent, dataset)

    def static(self, name, f, base, records, parent, dataset):
        """The searched static counterpart of a DFS run, at or below its validation cost, fine-tuned."""
        target = records[f["match"]]["val"]["computation_percentage"]
        policy = os.path.relpath(os.path.join(self.out, "policies", f"{name}.json"), ROOT)
        cache = os.path.relpath(os.path.join(self.out, "policies", f"cache_{os.path.basename(parent)[:-4]}.json"), ROOT)
        cmd = [sys.executable, "study/search_policy.py", parent, "--target", f"{target}", "--window", str(WINDOW[f["options"]]),
               "--out", policy, "--device", "cpu", "--cache", cache]
        t = time.time()
        with open(os.path.join(self.runs, f"{name}.search.log"), "a") as log:
            result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.PIPE, text=True,
                                    env=one_thread_env())
        if result.returncode != 0:  # no static policy in the window: recorded, not fatal
            return dict(base, match=f["match"], failed=result.stderr.strip())
        with open(os.path.join(ROOT, policy)) as fh:
            search = json.load(fh)
        search = dict(search, wall_seconds=round(time.time() - t), evaluations=len(search["evaluations"]))
        twin = reusable(records, search["policy"], f["seed"], parent, dataset)
        if twin:  # the same policy from the same parent, seed and schedule: the same network
            return dict(base, match=f["match"], search=search, same_as=twin, parent=parent,
                        **{k: v for k, v in twin_record(records, twin).items() if k in ("val", "test", "checkpoint")})
        flags = ["--policy", policy, "--seed", str(f["seed"]), "--beta", "0", *DFS]
        r = self.train("train_dfs.py", name, parent, flags, dataset)
        return dict(base, **r, match=f["match"], search=search, parent=parent, policy=search["policy"],
                    test=self.evaluate(r["checkpoint"], name, False, dataset))

    def go(self, lane):
        for run_lane, tier, name, kind, fields in plan():
            records = self.records()
            if run_lane != lane or name in records:
                continue
            t = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            record = self.run(name, kind, fields, records)
            self.save(name, dict(record, tier=tier, lane=lane, code_commit=code_commit(),
                                 torch_threads=int(one_thread_env()["OMP_NUM_THREADS"]),
                                 finished=time.strftime("%Y-%m-%d %H:%M:%S")))
            print(f"[{time.strftime('%H:%M:%S')}] {name} done in {time.time() - t:.0f} s", flush=True)


def reusable(records, policy, seed, parent, dataset):
    """A finished static run (this round, or round 2 from the same parent) of this policy, seed and data."""
    for name, r in records.items():
        if r.get("kind") == "static" and r.get("policy") == policy and r.get("seed") == seed \
                and r.get("parent") == parent and r.get("dataset") == dataset and "same_as" not in r:
            return name
    if dataset == "fashion-mnist" and parent.startswith(R2):
        with open(os.path.join(ROOT, R2, "results.json")) as f:
            r2 = json.load(f)["runs"]
        gate = os.path.basename(parent)[:-4]
        for name, r in r2.items():
            if r.get("method", "").startswith("static") and r.get("seed") == seed and "test" in r \
                    and r["test"].get("policy") == policy and f"gate_{gate.split('_')[1]}_s{seed}" == gate:
                return f"round2:{name}"
    return None


def twin_record(records, twin):
    if twin.startswith("round2:"):
        with open(os.path.join(ROOT, R2, "results.json")) as f:
            return json.load(f)["runs"][twin[7:]]
    return records[twin]


def halves(checkpoint):
    """Accuracy and computation percentage on the marked (easy) and unmarked (hard) test halves."""
    import torch
    import data
    from core.evaluation import evaluate, load_model
    model, _ = load_model(os.path.join(ROOT, checkpoint), "cpu")
    batches = data.test_batches("fashion-mnist-marked", os.path.join(ROOT, "data"), 128)
    stats = evaluate(model, batches, per_image=True)
    marked = data.marked_mask(len(stats["correct"]), "test")
    if "choices" in stats:
        cost = model.option_costs[stats["choices"]].mean(1) * 100  # [N]: each image's computation %
    else:
        cost = torch.full((len(marked),), 100.0)
    return {half: {"accuracy": 100 * stats["correct"][m].float().mean().item(), "images": int(m.sum()),
                   "computation_percentage": cost[m].mean().item()}
            for half, m in (("marked", marked), ("unmarked", ~marked))}


def one_thread_env():
    """The environment of every command: one torch thread unless OMP_NUM_THREADS says otherwise."""
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def code_commit():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return commit.stdout.strip() or None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "study-round3"))
    p.add_argument("--out", default=os.path.join(ROOT, "results", "fashion-mnist-round3"))
    p.add_argument("--lane", choices=["A", "B"])
    p.add_argument("--analyse-only", action="store_true")
    args = p.parse_args()
    study = Study(args.out, args.runs)
    if args.lane and not args.analyse_only:
        study.go(args.lane)
    try:
        from study import round3_analysis
    except ImportError:  # the lanes may run from a commit that precedes the analysis
        return print("no study/round3_analysis.py here: run --analyse-only from a checkout that has it")
    round3_analysis.write(study.records(), args.out)


if __name__ == "__main__":
    main()
