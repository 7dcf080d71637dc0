"""Round 4 of the Fashion-MNIST study: can a DFS gate learn to route per input at all?

    python study/round4.py --lane 1 & python study/round4.py --lane 2     # two lanes share one queue
    python study/round4.py --analyse-only

The plan, committed before the first run, is OUT/PLAN.md; this script runs its tier A (the certificate
of the positive control). Every run goes through the real scripts (train_dfs.py, eval.py). Lanes take
the next run that is neither finished nor claimed by the other lane (a claim file under RUNS), so two
lanes never train the same run. Each finished run adds one record to OUT/results.json (under a lock):
the single source of every number. Its weights-only checkpoint (the run's final state) goes to
OUT/checkpoints/ and its logs to OUT/logs/. Run again after an interruption, a lane continues the
unfinished runs from their last checkpoint and skips the finished ones.
"""
import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core import runfolder  # noqa: E402
from study.round3 import Study, code_commit, one_thread_env  # noqa: E402

R3 = "results/fashion-mnist-round3"
ARCH = "dfs_resnet20"
DATA = "fashion-mnist-marked"
SEEDS = (0, 1, 2)
STATIC_POLICY = "skip,skip,8,skip,skip,8,8,skip"  # round 3's static counterparts at 3.0 % (2.344 %)
ORACLE = {"marked": "skip", "unmarked": "skip,skip,8,8,8,8,8,8"}  # 0 and 4.6875 %: 2.344 % over the halves
LENGTHS = {300: ["--iters", "300", "--lr-steps", "225", "--eval-every", "300"],
           3000: ["--iters", "3000", "--lr-steps", "2250", "--eval-every", "3000"]}


def plan():
    """Tier A in order: (tier, name, kind, fields). The 300-iteration statics are round 3's."""
    runs = [("A", f"oracle_300_s{s}", "oracle", dict(seed=s, iters=300)) for s in SEEDS]
    for s in SEEDS:
        runs += [("A", f"oracle_3000_s{s}", "oracle", dict(seed=s, iters=3000)),
                 ("A", f"static_3000_s{s}", "static", dict(seed=s, iters=3000))]
    return runs


class Round4(Study):
    """Round 3's study machinery (records under a lock, one-thread commands), with round 4's runs."""

    def claim(self, name):
        """True if this lane may run `name`: it creates RUNS/name.claim, or the claim's process is gone."""
        path = os.path.join(self.runs, f"{name}.claim")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(path) as f:
                pid = int(f.read().strip() or 0)
            try:
                os.kill(pid, 0)
                return False  # another live lane runs it
            except (ProcessLookupError, PermissionError, ValueError):
                os.remove(path)  # a stale claim (its lane was stopped): take it over
                return self.claim(name)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True

    def release(self, name):
        path = os.path.join(self.runs, f"{name}.claim")
        if os.path.exists(path):
            os.remove(path)

    def train_final(self, name, parent, flags):
        """Run (resume, or skip) stage 3; release its final state (not model_best) and its logs."""
        folder = os.path.join(self.runs, name, ARCH)
        latest = os.path.join(folder, runfolder.LATEST)
        cmd = [sys.executable, "train_dfs.py", "train", ARCH, "--dataset", DATA, "--val-size", "5000",
               "--batch-size", "128", "--print-freq", "50", "--save-folder", os.path.join(self.runs, name),
               "--resume", latest if os.path.exists(latest) else parent, *flags]
        t = time.time()
        self.sh(cmd, f"{name}.log")
        wall = time.time() - t
        from core.checkpoint import export_weights
        export_weights(latest, os.path.join(ROOT, self.checkpoint(name)))
        logs = os.path.join(self.out, "logs", name)
        os.makedirs(logs, exist_ok=True)
        for f in (runfolder.LOG, runfolder.TRAIN_LOG, "train.log", "args.json"):
            if os.path.exists(os.path.join(folder, f)):
                shutil.copy(os.path.join(folder, f), logs)
        with open(os.path.join(folder, runfolder.LOG)) as f:
            val = [json.loads(line) for line in f][-1]
        return dict(checkpoint=self.checkpoint(name), val=val, train_wall_seconds=round(wall))

    def test(self, name):
        path = os.path.join(self.runs, f"{name}.eval.json")
        self.sh([sys.executable, "eval.py", self.checkpoint(name), "--device", "cpu", "--per-image", "--json", path],
                "eval.log")
        with open(path) as f:
            return json.load(f)

    def run(self, name, kind, f, records):
        seed, iters = f["seed"], f["iters"]
        parent = f"{R3}/checkpoints/gate_marked_s{seed}.pth"
        if kind == "oracle":
            flags = ["--options", "paper", "--bn", "per-option", "--beta", "0", "--seed", str(seed),
                     "--route-marked", ORACLE["marked"], "--route-unmarked", ORACLE["unmarked"], *LENGTHS[iters]]
        else:
            flags = ["--policy", STATIC_POLICY, "--beta", "0", "--seed", str(seed), *LENGTHS[iters]]
        r = self.train_final(name, parent, flags)
        return dict(name=name, kind=kind, seed=seed, iters=iters, dataset=DATA, parent=parent,
                    **({"routes": ORACLE} if kind == "oracle" else {"policy": STATIC_POLICY}),
                    **r, test=self.test(name))

    def go(self):
        for tier, name, kind, fields in plan():
            if name in self.records() or not self.claim(name):
                continue
            try:
                if name in self.records():  # finished by the other lane since the check above
                    continue
                t = time.time()
                print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
                record = self.run(name, kind, fields, self.records())
                self.save(name, dict(record, tier=tier, code_commit=code_commit(),
                                     torch_threads=int(one_thread_env()["OMP_NUM_THREADS"]),
                                     device="cpu", finished=time.strftime("%Y-%m-%d %H:%M:%S")))
                print(f"[{time.strftime('%H:%M:%S')}] {name} done in {time.time() - t:.0f} s", flush=True)
            finally:
                self.release(name)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "study-round4"))
    p.add_argument("--out", default=os.path.join(ROOT, "results", "fashion-mnist-round4"))
    p.add_argument("--lane", type=int, help="any label: lanes share the queue")
    p.add_argument("--analyse-only", action="store_true")
    args = p.parse_args()
    study = Round4(args.out, args.runs)
    if args.lane is not None and not args.analyse_only:
        study.go()
    try:
        from study import round4_analysis
    except ImportError:  # the lanes run from a commit that may precede the analysis
        return print("no study/round4_analysis.py here: run --analyse-only from a checkout that has it")
    round4_analysis.write(study.records(), args.out)


if __name__ == "__main__":
    main()
