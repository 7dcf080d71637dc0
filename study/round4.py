"""Round 4 of the Fashion-MNIST study: can a DFS gate learn to route per input at all?

    python study/round4.py --lane 1 & python study/round4.py --lane 2     # two lanes share one queue
    python study/round4.py --analyse-only

The plan, committed before the first run, is OUT/PLAN.md; this script runs its tier A (the certificate
of the positive control), then, unless the certificate fails at both lengths, tiers B (budget terms:
weight pilots of 1,000 iterations, the selected pilot continued to 3,000) and C (Gumbel-softmax) with
each arm's searched static counterpart, and, for every arm that passes on seed 0, seeds 1-2 (with their
static counterparts) and tier D (the negative control). Tier E is not written yet. A run waits for the
runs it needs (the other lane may run them). Every run goes through the real scripts (train_*.py,
study/search_policy.py, eval.py). Lanes take the next run that is neither finished nor claimed by the
other lane (a claim file under RUNS), so two lanes never train the same run. Each finished run adds one
record to OUT/results.json (under a lock): the single source of every number. Its weights-only
checkpoint (the run's final state) goes to OUT/checkpoints/ and its logs to OUT/logs/. Run again after
an interruption, a lane continues the unfinished runs from their last checkpoint and skips the
finished ones.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core import runfolder  # noqa: E402
from study import round4_analysis  # noqa: E402
from study.round2_analysis import fmt_policy  # noqa: E402
from study.round3 import Study, code_commit, one_thread_env  # noqa: E402
# The plan's definitions that the analysis judges by too live in round4_analysis (it imports no runner).
from study.round4_analysis import ARMS, GRIDS, TARGET, pilot_name, select_weight, verdict  # noqa: E402,F401

R3 = "results/fashion-mnist-round3"
ARCH = "dfs_resnet20"
DATA = "fashion-mnist-marked"
NEGATIVE = "fashion-mnist-marked-random"  # tier D: the same frames, colours independent of the label
SEEDS = (0, 1, 2)
STATIC_POLICY = "skip,skip,8,skip,skip,8,8,skip"  # round 3's static counterparts at 3.0 % (2.344 %)
ORACLE = {"marked": "skip", "unmarked": "skip,skip,8,8,8,8,8,8"}  # 0 and 4.6875 %: 2.344 % over the halves
LENGTHS = {300: ["--iters", "300", "--lr-steps", "225", "--eval-every", "300"],
           3000: ["--iters", "3000", "--lr-steps", "2250", "--eval-every", "3000"]}


# Tier B-C (PLAN.md): seed 0, from round 3's per-option-BN stage 2, 3,000 iterations at the static cost
GATED = "gate_po_marked_s0"
ARM = ["--lr-steps", "2250", "--eval-every", "250"]
PILOT_ITERS, ARM_ITERS = 1000, 3000
TERM_FLAGS = {"signed": [], "squared": [], "deadband": ["--budget-band", "0.5", "--budget-cap", "0.1"]}
GUMBEL = ["--gate-estimator", "gumbel", "--gumbel-tau", "5:0.5"]
WINDOW = 1.0  # the static counterpart's search window below the arm's validation cost (round 3's for these options)


def plan(records=None):
    """Every run in order: (tier, name, kind, fields, the runs it needs). The 300-iteration statics are round 3's;
    seeds 1-2 and tier D of the arms that pass on seed 0 appear once `records` decide them."""
    runs = [("A", f"oracle_300_s{s}", "oracle", dict(seed=s, iters=300), ()) for s in SEEDS]
    for s in SEEDS:
        runs += [("A", f"oracle_3000_s{s}", "oracle", dict(seed=s, iters=3000), ()),
                 ("A", f"static_3000_s{s}", "static", dict(seed=s, iters=3000), ())]
    tier_a = tuple(name for _, name, *_ in runs)
    for term, weights in GRIDS.items():
        runs += [("B", pilot_name(term, w), "pilot", dict(term=term, weight=w), tier_a) for w in weights]
    for term, weights in GRIDS.items():
        runs.append(("B", f"b_{term}_s0", "arm", dict(term=term), tuple(pilot_name(term, w) for w in weights)))
    arms = tuple(f"b_{term}_s0" for term in GRIDS)
    runs.append(("C", "c_gumbel_s0", "gumbel", {}, arms))
    for arm in (*arms, "c_gumbel_s0"):
        runs.append(("B" if arm.startswith("b_") else "C", f"static_of_{arm}", "searched", dict(match=arm), (arm,)))
    return runs + after_seed_0(records or {})


def after_seed_0(records):
    """The runs the plan adds once seed 0 has decided (none before): for every arm that passes, seeds 1-2
    and their searched static counterparts, and tier D, its recipe on fashion-mnist-marked-random from a
    backbone and stage 2 trained there."""
    if any(a not in records or f"static_of_{a}" not in records for a in ARMS):
        return []
    passing = [a for a in ARMS if verdict(records[a], records[f"static_of_{a}"])[4]]
    runs = []
    for arm in passing:
        for seed in SEEDS[1:]:
            name = f"{arm[:-3]}_s{seed}"
            runs += [("S", name, "seed", dict(arm=arm, seed=seed), (arm,)),
                     ("S", f"static_of_{name}", "searched", dict(match=name, seed=seed), (name,))]
    if passing:
        runs += [("D", "backbone_random", "base", {}, ()),
                 ("D", "gate_po_random_s0", "gate", {}, ("backbone_random",))]
        runs += [("D", f"d_{arm}", "negative", dict(arm=arm), (arm, "gate_po_random_s0")) for arm in passing]
    return runs


def select_gumbel_arm(records):
    """Tier C's budget term: the tier-B arm with the largest final validation gap between the unmarked and
    the marked half's cost (ties: higher validation top-1); if no gap reaches 1 point, B2 squared's."""
    def gap(name):
        h = records[name]["val"]["routing"]["halves"]
        return h["unmarked"]["computation_percentage"] - h["marked"]["computation_percentage"]
    arms = [f"b_{term}_s0" for term in GRIDS]
    best = max(arms, key=lambda a: (gap(a), records[a]["val"]["acc"]))
    return best if gap(best) >= 1 else "b_squared_s0"


def policy_text(policy):
    """A static policy as one comparable string: skip,8,... (from a list of option names or a string)."""
    return policy if isinstance(policy, str) else fmt_policy(policy)


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

    def train_final(self, name, parent, flags, test=True, script="train_dfs.py", arch=ARCH, dataset=DATA):
        """Run (resume, or skip) a stage (stage 3 unless told); release its final state (not model_best), its
        logs and, with `test`, its test-set record. A run whose folder already holds a checkpoint continues it."""
        folder = os.path.join(self.runs, name, arch)
        latest = os.path.join(folder, runfolder.LATEST)
        start = latest if os.path.exists(latest) else parent
        cmd = [sys.executable, script, "train", arch, "--dataset", dataset, "--val-size", "5000",
               "--batch-size", "128", "--print-freq", "50", "--save-folder", os.path.join(self.runs, name),
               *(["--resume", start] if start else []), *flags]
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
            history = [json.loads(line) for line in f]
        r = dict(checkpoint=self.checkpoint(name), val=history[-1], train_wall_seconds=round(wall))
        if len(history) > 1 and "routing" in history[0]:  # validation every 250 iterations: the per-half cost
            r["val_history"] = [{"step": v["step"], "acc": v["acc"], "computation_percentage": v["computation_percentage"],
                                 "halves": v["routing"]["halves"]} for v in history]
        return dict(r, test=self.test(name)) if test else r

    def test(self, name):
        path = os.path.join(self.runs, f"{name}.eval.json")
        self.sh([sys.executable, "eval.py", self.checkpoint(name), "--device", "cpu", "--per-image", "--json", path],
                "eval.log")
        with open(path) as f:
            return json.load(f)

    def run(self, name, kind, f, records):
        if kind in ("oracle", "static"):
            seed, iters = f["seed"], f["iters"]
            parent = f"{R3}/checkpoints/gate_marked_s{seed}.pth"
            if kind == "oracle":
                flags = ["--options", "paper", "--bn", "per-option", "--beta", "0", "--seed", str(seed),
                         "--route-marked", ORACLE["marked"], "--route-unmarked", ORACLE["unmarked"], *LENGTHS[iters]]
            else:
                flags = ["--policy", STATIC_POLICY, "--beta", "0", "--seed", str(seed), *LENGTHS[iters]]
            return dict(name=name, kind=kind, seed=seed, iters=iters, dataset=DATA, parent=parent,
                        **({"routes": ORACLE} if kind == "oracle" else {"policy": STATIC_POLICY}),
                        **self.train_final(name, parent, flags))
        if kind == "searched":
            return self.searched(name, f["match"], records, f.get("seed", 0))
        if kind == "base":  # tier D: round 3's marked backbone recipe on the negative-control data set
            return dict(name=name, kind=kind, seed=0, dataset=NEGATIVE, **self.train_final(
                name, None, ["--iters", "2000", "--lr-steps", "1200", "1700", "--eval-every", "2000", "--seed", "0"],
                script="train_base.py", arch="resnet20", dataset=NEGATIVE))
        if kind == "gate":  # tier D: round 3's stage 2 (100 iterations toward 100 %, beta 1e-3, per-option BN)
            parent = self.checkpoint("backbone_random")
            return dict(name=name, kind=kind, seed=0, dataset=NEGATIVE, parent=parent, **self.train_final(
                name, parent, ["--options", "paper", "--beta", "1e-3", "--seed", "0", "--bn", "per-option",
                               "--iters", "100", "--eval-every", "100", "--minimum", "100"],
                test=False, script="train_gate_init.py", dataset=NEGATIVE))
        if kind in ("seed", "negative"):  # a passing arm's recipe (term, weight, estimator), fresh, 3,000 iterations
            arm = records[f["arm"]]
            seed, dataset = f.get("seed", 0), DATA if kind == "seed" else NEGATIVE
            parent = f"{R3}/checkpoints/gate_po_marked_s{seed}.pth" if kind == "seed" else self.checkpoint("gate_po_random_s0")
            flags = ["--options", "paper", "--bn", "per-option", "--budget-loss", arm["term"], "--beta", arm["weight"],
                     "--minimum", TARGET, "--seed", str(seed), "--iters", str(ARM_ITERS), *ARM, *TERM_FLAGS[arm["term"]],
                     *(GUMBEL if arm["estimator"] == "gumbel" else [])]
            return dict(name=name, kind=kind, seed=seed, iters=ARM_ITERS, dataset=dataset, parent=parent,
                        term=arm["term"], weight=arm["weight"], target=float(TARGET), estimator=arm["estimator"],
                        recipe_of=f["arm"], **self.train_final(name, parent, flags, dataset=dataset))
        parent = f"{R3}/checkpoints/{GATED}.pth"
        if kind == "pilot":
            term, weight, iters, selected_by = f["term"], f["weight"], PILOT_ITERS, None
        elif kind == "arm":  # the selected pilot is this arm's first 1,000 iterations: continued, not rerun
            term, selected_by = f["term"], select_weight(records, f["term"])
            weight, iters = records[selected_by]["weight"], ARM_ITERS
            mine = os.path.join(self.runs, name, ARCH)
            if not os.path.exists(os.path.join(mine, runfolder.LATEST)):  # copied whole, or not at all
                copying = mine + ".copying"
                for stale in (mine, copying):
                    shutil.rmtree(stale, ignore_errors=True)
                shutil.copytree(os.path.join(self.runs, selected_by, ARCH), copying,
                                ignore=shutil.ignore_patterns(runfolder.LOCK))
                os.replace(copying, mine)
        else:  # gumbel: tier B's chosen arm's term and weight, a fresh run of 3,000 iterations
            selected_by = select_gumbel_arm(records)
            term, weight, iters = records[selected_by]["term"], records[selected_by]["weight"], ARM_ITERS
        flags = ["--options", "paper", "--bn", "per-option", "--budget-loss", term, "--beta", weight,
                 "--minimum", TARGET, "--seed", "0", "--iters", str(iters), *ARM, *TERM_FLAGS[term],
                 *(GUMBEL if kind == "gumbel" else [])]
        pilot_wall = {"pilot_train_wall_seconds": records[selected_by]["train_wall_seconds"]} if kind == "arm" else {}
        return dict(name=name, kind=kind, seed=0, iters=iters, dataset=DATA, parent=parent, term=term, weight=weight,
                    target=float(TARGET), estimator="gumbel" if kind == "gumbel" else "argmax",
                    selected_by=selected_by, **pilot_wall, **self.train_final(name, parent, flags, test=kind != "pilot"))

    def searched(self, name, match, records, seed=0):
        """An arm's static counterpart: searched on validation in [its validation cost - 1, its cost] from the
        shared-BN stage 2 of the same seed, trained as long as the arm (a run of the same policy is reused)."""
        parent = f"{R3}/checkpoints/gate_marked_s{seed}.pth"
        target = records[match]["val"]["computation_percentage"]
        policy = os.path.relpath(os.path.join(self.out, "policies", f"{name}.json"), ROOT)
        cache = os.path.relpath(os.path.join(self.out, "policies", f"cache_gate_marked_s{seed}.json"), ROOT)
        if not os.path.exists(os.path.join(ROOT, cache)):  # round 3's evaluations of the same checkpoint and settings
            shutil.copy(os.path.join(ROOT, R3, "policies", f"cache_gate_marked_s{seed}.json"), os.path.join(ROOT, cache))
        cmd = [sys.executable, "study/search_policy.py", parent, "--target", f"{target}", "--window", str(WINDOW),
               "--out", policy, "--device", "cpu", "--cache", cache]
        base = dict(name=name, kind="searched", seed=seed, iters=ARM_ITERS, dataset=DATA, parent=parent, match=match)
        with open(os.path.join(self.runs, f"{name}.search.log"), "a") as log:
            result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.PIPE, text=True, env=one_thread_env())
        if result.returncode != 0:  # no static policy in the window: recorded, not fatal
            return dict(base, failed=result.stderr.strip())
        with open(os.path.join(ROOT, policy)) as fh:
            search = json.load(fh)
        search = dict(search, evaluations=len(search["evaluations"]))
        text = policy_text(search["policy"])
        for other, r in records.items():  # the same policy, parent, seed and schedule: the same network
            if r.get("kind") in ("static", "searched") and "same_as" not in r and "test" in r and r["seed"] == seed \
                    and r["iters"] == ARM_ITERS and r["parent"] == parent and policy_text(r.get("policy", "")) == text:
                return dict(base, search=search, policy=text, same_as=other,
                            **{k: r[k] for k in ("checkpoint", "val", "test")})
        flags = ["--policy", policy, "--beta", "0", "--seed", str(seed), "--iters", str(ARM_ITERS), "--lr-steps", "2250",
                 "--eval-every", str(ARM_ITERS)]
        return dict(base, search=search, policy=text, **self.train_final(name, parent, flags))

    def go(self, tiers=None):
        """Run the plan's next runnable run (of `tiers`, default all) until none is left; wait while another
        lane runs a dependency. Round 5 reuses it with its own plan (`plan_of`) and rule (`tier_a_allows`)."""
        while True:
            records, waiting, allowed = self.records(), False, self.tier_a_allows()
            for tier, name, kind, fields, needs in self.plan_of(records):
                if name in records or (tier != "A" and not allowed) or (tiers and tier not in tiers):
                    continue
                if any(n not in records for n in needs):
                    waiting = True
                    continue
                if not self.claim(name):
                    waiting = True
                    continue
                try:
                    if name in self.records():  # finished by the other lane since the check above
                        break
                    t = time.time()
                    self.before(name)
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
                    if not allowed:
                        print("tier A's certificate fails at both lengths: tiers B-E wait for an amendment of "
                              "PLAN.md (its decision rule)")
                    return
                time.sleep(30)

    def plan_of(self, records):
        return plan(records)

    def before(self, name):
        """What a lane does just before it runs `name` (round 5: restore a parked state)."""

    def tier_a_allows(self):
        """False once tier A is complete and its certificate fails at both lengths (the plan's decision rule)."""
        records = self.records()
        _, verdicts = round4_analysis.tier_a(records, round4_analysis.round3_runs())
        return any(v[3] != "fails" for v in verdicts.values())


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
    round4_analysis.write(study.records(), args.out)


if __name__ == "__main__":
    main()
