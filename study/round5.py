"""Round 5 (results/fashion-mnist-round5/PLAN.md): what stops DFS's gate from routing per input?

    python study/round5.py --lane 1 & python study/round5.py --lane 2     # lanes share one queue
    python study/round5.py --analyse-only                                  # results.md from results.json

Each run is trained (or resumed) in RUNS/NAME, its final state released to OUT/checkpoints/NAME.pth,
its logs to OUT/logs/NAME, its test evaluation and provenance recorded in OUT/results.json (under a
lock): the single source of every number. Round 4's machinery (claims, one-thread commands) is reused.
So far the plan's tiers A and B; tiers C-E join as their features land.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core import runfolder  # noqa: E402
from study.round3 import one_thread_env  # noqa: E402
from study.round4 import LENGTHS, Round4  # noqa: E402
from study.round5_analysis import (ESTIMATORS, ORACLE, R3, R4, SEEDS, TARGET, grid_cost, routes_by_frame,  # noqa: E402
                                   write)

DATA = "fashion-mnist-marked"
ARCH = "dfs_resnet20"
# Tier B's start (PLAN.md): round 4's oracle_3000_s0 without its routing, with round 3's per-option-BN stage-2 gate
START_B = {"backbone": f"{R4}/checkpoints/oracle_3000_s0.pth", "gate": f"{R3}/checkpoints/gate_po_marked_s0.pth"}
B0 = ["--train", "gate", "--distill-marked", ",".join(["skip"] * 8), "--distill-unmarked", ORACLE["unmarked"],
      "--iters", "1000", "--lr-steps", "750", "--eval-every", "250", "--seed", "0"]
B_ARM = ["--train", "gate", "--budget-loss", "squared", "--beta", "1000", "--minimum", TARGET,
         "--iters", "3000", "--lr-steps", "2250", "--eval-every", "250", "--seed", "0"]
ESTIMATOR_FLAGS = {"argmax": [], "gumbel": ["--gate-estimator", "gumbel", "--gumbel-tau", "5:0.5"],
                   "reinforce": ["--gate-estimator", "reinforce"]}


C_ARM = ["--budget-loss", "squared", "--beta", "1000", "--minimum", TARGET,
         "--iters", "3000", "--lr-steps", "2250", "--eval-every", "250", "--seed", "0"]


def plan(records=None):
    """Every run in order: (tier, name, kind, fields, the runs it needs). Tier C's estimators beyond argmax
    appear once their tier-B arm has passed criteria 1-2 (PLAN.md)."""
    records = records or {}
    runs = [("A", f"a_oracle_shared_300_s{s}", "oracle_shared", dict(seed=s, iters=300), ()) for s in SEEDS]
    runs += [("A", f"a_oracle_shared_3000_s{s}", "oracle_shared", dict(seed=s, iters=3000), ()) for s in SEEDS]
    runs.append(("B", "b0_distill_s0", "distill", {}, ()))
    arms = [(f"b{i}_{e}_s0", e) for i, e in enumerate(ESTIMATORS, 1)]
    runs += [("B", name, "gate_only", dict(estimator=e), ()) for name, e in arms]
    passing = [e for name, e in arms if name in records and routes_by_frame(records[name]["test"])[4]]
    for e in ["argmax"] + [e for e in passing if e != "argmax"]:
        runs.append(("C", f"c_{e}_s0", "joint_from_b0", dict(estimator=e), ("b0_distill_s0",)))
    return runs


def oracle_shared_flags(seed, iters):
    """Round 4's oracle flags with the parent's (shared) BN: no --bn per-option."""
    return ["--options", "paper", "--beta", "0", "--seed", str(seed), "--route-marked", ORACLE["marked"],
            "--route-unmarked", ORACLE["unmarked"], *LENGTHS[iters]]


class Round5(Round4):
    def run(self, name, kind, f, records):
        if kind == "oracle_shared":
            seed, iters = f["seed"], f["iters"]
            parent = f"{R3}/checkpoints/gate_marked_s{seed}.pth"
            return dict(name=name, kind=kind, seed=seed, iters=iters, dataset=DATA, parent=parent, bn="shared",
                        routes=ORACLE, **self.train_final(name, parent, oracle_shared_flags(seed, iters)))
        if kind in ("distill", "gate_only"):
            parent = self.start_b()
            flags = B0 if kind == "distill" else B_ARM + ESTIMATOR_FLAGS[f["estimator"]]
            return dict(name=name, kind=kind, seed=0, dataset=DATA, parent=parent, start=START_B,
                        iters=1000 if kind == "distill" else 3000, estimator=f.get("estimator"),
                        **self.train_final(name, parent, flags))
        if kind == "joint_from_b0":  # tier C: the whole network from B0's final state (the routing known)
            parent = self.start_c(records)
            return dict(name=name, kind=kind, seed=0, dataset=DATA, parent=parent, iters=3000,
                        estimator=f["estimator"], start="b0_distill_s0",
                        **self.train_final(name, parent, C_ARM + ESTIMATOR_FLAGS[f["estimator"]]))
        raise ValueError(f"unknown kind {kind}")

    def equal_cost_static(self, name, match, records, seed=0, iters=3000):
        """Feature 6: the static network of an arm's own cost. The search (study/search_policy.py, validation,
        from the shared-BN gate_marked_s{seed}) is restricted to the one static cost nearest to the arm's final
        validation computation; at 2.344 % round 4's static_3000_s{seed} is that network (same parent, seed and
        schedule) and is reused. Returns the record."""
        import json
        import subprocess
        target = grid_cost(records[match]["val"]["computation_percentage"])
        base = dict(name=name, kind="equal_cost_static", seed=seed, iters=iters, dataset=DATA, match=match,
                    target=target, parent=f"{R3}/checkpoints/gate_marked_s{seed}.pth")
        if abs(target - float(TARGET)) < 1e-9 and iters == 3000:
            with open(os.path.join(ROOT, R4, "results.json")) as f:
                r = json.load(f)["runs"][f"static_3000_s{seed}"]
            return dict(base, same_as=f"round 4's static_3000_s{seed}", policy=r["policy"],
                        **{k: r[k] for k in ("checkpoint", "val", "test")})
        policy = os.path.relpath(os.path.join(self.out, "policies", f"{name}.json"), ROOT)
        cmd = [sys.executable, "study/search_policy.py", base["parent"], "--target", f"{target}", "--window", "0.01",
               "--out", policy, "--device", "cpu"]
        with open(os.path.join(self.runs, f"{name}.search.log"), "a") as log:
            result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.PIPE, text=True, env=one_thread_env())
        if result.returncode != 0:
            return dict(base, failed=result.stderr.strip())
        flags = ["--policy", policy, "--beta", "0", "--seed", str(seed), "--iters", str(iters),
                 "--lr-steps", str(iters * 3 // 4), "--eval-every", str(iters)]
        return dict(base, policy=policy, **self.train_final(name, base["parent"], flags))

    def park(self):
        """Copy every unfinished run's state (checkpoint_latest, its logs) to OUT/unfinished/NAME, to be
        committed: a session's end (or a fresh checkout) loses RUNS, not the work. Returns the names."""
        import shutil
        parked = []
        records = self.records()
        for _, name, *_ in plan(records):
            folder = os.path.join(self.runs, name, ARCH)
            latest = os.path.join(folder, runfolder.LATEST)
            if name in records or not os.path.exists(latest):
                continue
            keep = os.path.join(self.out, "unfinished", name)
            tmp = keep + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            shutil.copy(latest, os.path.join(tmp, "checkpoint_latest.pth"))  # .pth: *.pth.tar is not tracked
            for f in (runfolder.LOG, runfolder.TRAIN_LOG, "train.log", "args.json"):
                if os.path.exists(os.path.join(folder, f)):
                    shutil.copy(os.path.join(folder, f), tmp)
            shutil.rmtree(keep, ignore_errors=True)
            os.replace(tmp, keep)
            parked.append(name)
        return parked

    def unpark(self, name):
        """Before `name` runs: a parked state (see park) becomes its run folder, unless RUNS already has one."""
        import shutil
        keep = os.path.join(self.out, "unfinished", name)
        folder = os.path.join(self.runs, name, ARCH)
        if not os.path.isdir(keep) or os.path.exists(os.path.join(folder, runfolder.LATEST)):
            return
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(keep):
            shutil.copy(os.path.join(keep, f), os.path.join(folder, runfolder.LATEST if f == "checkpoint_latest.pth" else f))

    def start_c(self, records):
        """Tier C's start: B0's released final state re-based as a stage-2 checkpoint (core/assemble.py with
        both parts from it), so stage 3 starts a new run from it instead of continuing B0's."""
        from core.assemble import assemble
        from core.checkpoint import save_checkpoint
        path = os.path.join(self.runs, "start_c_s0.pth")
        if not os.path.exists(path):
            b0 = records["b0_distill_s0"]["checkpoint"]
            save_checkpoint(assemble(b0, b0), path)
        return os.path.relpath(path, ROOT)

    def start_b(self):
        """Tier B's assembled start (core/assemble.py), made once in RUNS (a function of two committed files)."""
        from core.assemble import assemble
        from core.checkpoint import save_checkpoint
        path = os.path.join(self.runs, "start_b_s0.pth")
        if not os.path.exists(path):
            save_checkpoint(assemble(START_B["backbone"], START_B["gate"]), path)  # atomic
        return os.path.relpath(path, ROOT)

    def plan_of(self, records):
        return plan(records)

    def tier_a_allows(self):
        return True  # round 5's tier A decides nothing below it (PLAN.md)

    def before(self, name):
        self.unpark(name)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "study-round5"))
    p.add_argument("--out", default=os.path.join(ROOT, "results", "fashion-mnist-round5"))
    p.add_argument("--lane", type=int, help="any label: lanes share the queue")
    p.add_argument("--tiers", help="only these tiers, e.g. B (default: all, in the plan's order)")
    p.add_argument("--analyse-only", action="store_true")
    p.add_argument("--park", action="store_true",
                   help="copy the unfinished runs' states to OUT/unfinished (to commit before a session ends; a lane "
                        "continues them from there in a fresh checkout)")
    args = p.parse_args()
    study = Round5(args.out, args.runs)
    if args.park:
        return print(f"parked: {', '.join(study.park()) or 'nothing'}")
    if args.lane is not None and not args.analyse_only:
        study.go(set(args.tiers) if args.tiers else None)
    write(study.records(), args.out)


if __name__ == "__main__":
    main()
