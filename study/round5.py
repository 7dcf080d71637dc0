"""Round 5 (results/fashion-mnist-round5/PLAN.md): what stops DFS's gate from routing per input?

    python study/round5.py --lane 1 & python study/round5.py --lane 2     # lanes share one queue
    python study/round5.py --analyse-only                                  # results.md from results.json

Each run is trained (or resumed) in RUNS/NAME, its final state released to OUT/checkpoints/NAME.pth,
its logs to OUT/logs/NAME, its test evaluation and provenance recorded in OUT/results.json (under a
lock): the single source of every number. Round 4's machinery (claims, one-thread commands) is reused.
So far the plan's tier A; tiers B-E join as their features land.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from study.round3 import code_commit, one_thread_env  # noqa: E402
from study.round4 import LENGTHS, Round4  # noqa: E402
from study.round5_analysis import ORACLE, R3, SEEDS, write  # noqa: E402

DATA = "fashion-mnist-marked"


def plan():
    """Every run in order: (tier, name, kind, fields, the runs it needs)."""
    runs = [("A", f"a_oracle_shared_300_s{s}", "oracle_shared", dict(seed=s, iters=300), ()) for s in SEEDS]
    return runs + [("A", f"a_oracle_shared_3000_s{s}", "oracle_shared", dict(seed=s, iters=3000), ()) for s in SEEDS]


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
        raise ValueError(f"unknown kind {kind}")

    def go(self):
        """Run the plan's next runnable run until none is left; wait while another lane runs a dependency."""
        while True:
            records, waiting = self.records(), False
            for tier, name, kind, fields, needs in plan():
                if name in records:
                    continue
                if any(n not in records for n in needs) or not self.claim(name):
                    waiting = True
                    continue
                try:
                    if name in self.records():  # finished by another lane since the check above
                        break
                    t = time.time()
                    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
                    record = self.run(name, kind, fields, self.records())
                    self.save(name, dict(record, tier=tier, code_commit=code_commit(),
                                         torch_threads=int(one_thread_env()["OMP_NUM_THREADS"]),
                                         device="cpu", finished=time.strftime("%Y-%m-%d %H:%M:%S")))
                    print(f"[{time.strftime('%H:%M:%S')}] {name} done in {time.time() - t:.0f} s", flush=True)
                finally:
                    self.release(name)
                break  # the records changed: start again from the top of the plan
            else:
                if not waiting:
                    return
                time.sleep(30)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "study-round5"))
    p.add_argument("--out", default=os.path.join(ROOT, "results", "fashion-mnist-round5"))
    p.add_argument("--lane", type=int, help="any label: lanes share the queue")
    p.add_argument("--analyse-only", action="store_true")
    args = p.parse_args()
    study = Round5(args.out, args.runs)
    if args.lane is not None and not args.analyse_only:
        study.go()
    write(study.records(), args.out)


if __name__ == "__main__":
    main()
