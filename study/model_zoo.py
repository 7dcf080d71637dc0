"""The model zoo: every released checkpoint in one table, from the studies' records and the files.

    python study/model_zoo.py     # writes docs/model_zoo.md and docs/model_zoo.json

Released: results/fashion-mnist/checkpoints/*.pth (round 1, study/round1.py) and
results/fashion-mnist-dynamic/checkpoints/*.pth (round 2, study/round2.py, and its
amendment 2, --amendment) and results/fashion-mnist-round3/checkpoints/*.pth (round 3, study/round3.py).
The numbers come from each round's results.json and round 2's amendment.json; the network,
options and data set from each file; measured time from docs/measured-time-*.json. Each test top-1
comes with its 95 % Wilson score interval on the number of test images (study/significance.py).
hubconf.py reads docs/model_zoo.json: one torch.hub entry point per row, named `hub`.
"""
import hashlib
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core.checkpoint import load_checkpoint  # noqa: E402
from models.cost import option_names  # noqa: E402
from core.intervals import accuracy_interval  # noqa: E402

ROUND1, ROUND2, ROUND3 = "results/fashion-mnist", "results/fashion-mnist-dynamic", "results/fashion-mnist-round3"
TIMES = {"fp32": ["docs/measured-time-fashion-mnist.json", "docs/measured-time-fashion-mnist-dynamic.json"],
         "int8": ["docs/measured-time-fashion-mnist-int8.json"]}
MARKDOWN, JSON = "docs/model_zoo.md", "docs/model_zoo.json"


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


def released():
    """The released checkpoint files, relative to the repository, sorted."""
    return sorted(f"{folder}/checkpoints/{name}" for folder in (ROUND1, ROUND2, ROUND3)
                  for name in os.listdir(os.path.join(ROOT, folder, "checkpoints")) if name.endswith(".pth"))


def sha256(path):
    with open(os.path.join(ROOT, path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def hub_name(name):
    """The torch.hub entry point of a checkpoint: its name with each character a Python name cannot
    hold turned into _ (dfs_lowbit_cp0.5_s0 -> dfs_lowbit_cp0_5_s0)."""
    return re.sub(r"\W", "_", name)


def measured_times():
    """{checkpoint file: {"fp32" | "int8": {"batch_128": %, "batch_1": %, "source": file}}}."""
    out = {}
    for kind, sources in TIMES.items():
        for source in sources:
            for r in read(source):
                entry = {k: round(v["time_percentage"], 1) for k, v in r["timing"].items() if k.startswith("batch_")}
                if kind in out.setdefault(r["checkpoint"], {}):
                    raise ValueError(f"{r['checkpoint']} is timed twice ({kind})")
                out[r["checkpoint"]][kind] = dict(entry, source=source)
    return out


def test_figures(accuracy, n, cp, bitops):
    low, high = accuracy_interval(accuracy, n)
    return {"top1": accuracy, "interval_95": [round(low, 4), round(high, 4)], "images": n,
            "correct": round(accuracy * n / 100), "computation_percentage": round(cp, 4),
            "bitops_percentage": round(bitops, 4)}


def add_figures(row, record):
    """The row with its test figures from a round-2/3 record, or, for a stage-2 gate (released as the
    start of stage 3, evaluated on the validation split only), its validation figures."""
    t = record.get("test")
    if t:
        row["test"] = test_figures(t["accuracy"], t["num_samples"], t["computation_percentage"],
                                   t["bitops_percentage"])
    else:
        v = record["val"]
        row["val"] = {"top1": v["acc"], "images": v["num_samples"],
                      "computation_percentage": round(v["computation_percentage"], 4)}
    return row


def records():
    """One dict per released run from the records: name, study, method, seed, target, policy,
    match, test (or val for a gate), made_by, code_commit; by study, then name."""
    rows = []
    for r in read(f"{ROUND1}/results.json"):
        rows.append(dict(name=r["name"], file=r["checkpoint"], study="round 1", method=r["method"], seed=r["seed"],
                         target=r["target"], policy=None, match=None, record_options=r["options"],
                         test=test_figures(r["accuracy"], r["num_test_images"], r["computation_percentage"],
                                           r["bitops_percentage"]),
                         made_by="python study/round1.py", code_commit=None, also=[]))
    runs = [(name, r, "round 2") for name, r in read(f"{ROUND2}/results.json")["runs"].items()]
    runs += [(name, r, "round 2, amendment 2") for name, r in read(f"{ROUND2}/amendment.json").items()]
    for name, r, study in runs:
        if r.get("kind") not in ("gate", "dfs", "static") or "failed" in r:
            continue  # the pilot, and the counterparts that could not exist (no checkpoint)
        t = r.get("test")
        row = dict(name=name, file=t["checkpoint"] if t else r["checkpoint"], study=study,
                   method=r.get("method") or "gate (stage 2)", seed=r["seed"], target=r.get("target"),
                   policy=t.get("policy") if t else None, match=r.get("match"),
                   record_options=t["option_names"] if t else None,
                   made_by=("python study/round2.py --amendment" if study.endswith("amendment 2") else
                            f"python study/round2.py --tiers {r['tier']}"),
                   code_commit=r.get("code_commit"), also=[])
        rows.append(add_figures(row, r))
    rows += round3_records()
    order = {"round 1": 0, "round 2": 1, "round 2, amendment 2": 2, "round 3": 3}
    return sorted(rows, key=lambda r: (order[r["study"]], r["name"]))


ROUND3_OPTIONS = {"skip,2,3,4": "lowbit", "paper": "paper"}


def round3_method(r):
    if r["kind"] == "base":
        return "backbone"
    if r["kind"] == "static":
        return "static-counterpart"
    bn = ", per-option BN" if r.get("bn") == "per-option" else ""
    if r["kind"] == "gate":
        return f"gate (stage 2){bn}"
    pilot = f", beta pilot {r['beta']}" if r["name"].startswith("pilot_") else ""
    return f"dfs-{ROUND3_OPTIONS[r['options']]}{bn}{pilot}"


def round3_records():
    """Round 3's rows: one per file in its checkpoints folder. A run recorded on another run's file (the
    pilot chosen for a budget, a static policy already trained) is named in that file's `also`."""
    rows, also = [], {}
    for name, r in read(f"{ROUND3}/results.json")["runs"].items():
        file = r.get("checkpoint") or (r.get("test") or {}).get("checkpoint")
        if r.get("kind") not in ("base", "gate", "dfs", "static") or not file or not file.startswith(ROUND3 + "/"):
            continue  # re-evaluations of round 2's files, counterparts trained in round 2
        if os.path.basename(file) != f"{name}.pth":
            also.setdefault(file, []).append(name)
            continue
        t = r.get("test")
        row = dict(name=name, file=file, study="round 3", method=round3_method(r), seed=r["seed"],
                   target=r.get("target"), policy=r.get("policy"), match=r.get("match"),
                   record_options=t["option_names"] if t else None,
                   made_by=f"python study/round3.py --lane {r['lane']}", code_commit=r.get("code_commit"))
        rows.append(add_figures(row, r))
    for row in rows:
        row["also"] = sorted(also.pop(row["file"], []))
    if also:
        raise ValueError(f"round 3 records name files that no run of that name made: {', '.join(sorted(also))}")
    return rows


def build():
    """(markdown, JSON rows) of the zoo; ValueError if the records, the files and the timings disagree."""
    times, files, rows = measured_times(), released(), []
    for r in records():
        if r["file"] not in files:
            raise ValueError(f"{r['name']}: {r['file']} is in the records but not released")
        ckpt = load_checkpoint(os.path.join(ROOT, r["file"]))
        options = option_names(ckpt.get("options") or ["full"])
        if r.pop("record_options") not in (None, options):
            raise ValueError(f"{r['file']}: its options {options} are not its record's")
        rows.append(dict(r, hub=hub_name(r["name"]), dataset=(ckpt.get("args") or {}).get("dataset"),
                         arch=ckpt["arch"], options=options, measured_time_percentage=times.get(r["file"], {}),
                         size_bytes=os.path.getsize(os.path.join(ROOT, r["file"])), sha256=sha256(r["file"])))
    for problem, names in (("released without a record", set(files) - {r["file"] for r in rows}),
                           ("timed but not released", set(times) - set(files)),
                           ("listed twice", {r["hub"] for r in rows if [s["hub"] for s in rows].count(r["hub"]) > 1})):
        if names:
            raise ValueError(f"{problem}: {', '.join(sorted(names))}")
    return markdown(rows), rows


def short(options):
    return ", ".join(o.removesuffix("-bit") for o in options)


def what(r):
    """The method with its target or policy."""
    if r["policy"]:
        policy = ",".join(p.removesuffix("-bit") for p in r["policy"])
        return f"{r['method']}: policy {policy}" + (f" (of {r['match']})" if r["match"] else "")
    if r["target"] is not None:
        return f"{r['method']}: target {r['target']:g} %"
    if len(r["options"]) == 1 and r["options"] != ["full"]:
        return f"{r['method']}: {r['options'][0]} everywhere"
    return r["method"]


def what_and_also(r):
    return what(r) + (f"; also recorded as {', '.join(r['also'])}" if r["also"] else "")


def markdown(rows):
    lines = [HEADER,
             "| entry point (file) | data set | network | options | method: target or policy "
             "| test top-1 % [95 % interval] | computation % | measured time %, batch 128 / 1 | size (bytes) | sha256 (first 12) | made by |",
             "|---|---|---|---|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        if "test" in r:
            t = r["test"]
            top1 = f"{t['top1']:.2f} [{t['interval_95'][0]:.2f}, {t['interval_95'][1]:.2f}]"
            cp = f"{t['computation_percentage']:.2f}"
        else:
            top1, cp = f"- (val {r['val']['top1']:.2f})", f"- (val {r['val']['computation_percentage']:.2f})"
        fp32 = r["measured_time_percentage"].get("fp32")
        measured = f"{fp32['batch_128']:.1f} / {fp32['batch_1']:.1f}" if fp32 else "-"
        made_by = f"`{r['made_by'].removeprefix('python ')}`"
        lines.append(f"| [`{r['hub']}`](../{r['file']}) | {r['dataset']} | {r['arch']} | {short(r['options'])} | "
                     f"{what_and_also(r)} | {top1} | {cp} | {measured} | {r['size_bytes']} | `{r['sha256'][:12]}` | {made_by} |")
    return "\n".join(lines) + "\n\n" + FOOTER.format(count=len(rows))


HEADER = """# Model zoo

Every released checkpoint, generated by `python study/model_zoo.py` from the studies' records
([round 1](../results/fashion-mnist/results.json), [round 2](../results/fashion-mnist-dynamic/results.json)
and its [amendment 2](../results/fashion-mnist-dynamic/amendment.json), [round 3](../results/fashion-mnist-round3/results.json)), the
[measured times](benchmarks.md#measured-time-of-the-released-checkpoints-evalpy---time-benchmarkslatency_tablepy)
and the files themselves; `tests/test_model_zoo.py` checks that this page is what the script writes
and that each file's size and sha256 are the ones below (all of them in [model_zoo.json](model_zoo.json)).
The write-ups: [round 1](../results/fashion-mnist/README.md), [round 2](../results/fashion-mnist-dynamic/README.md),
[round 3](../results/fashion-mnist-round3/README.md). Back to the [README](../README.md).

Each one loads with `eval.py` (it reads the network and its options from the file), or through
torch.hub by its entry point (the file name with `.` and `-` turned into `_`):

```python
import torch
model = torch.hub.load("path/to/this/repository", "dfs_cp20_s0", source="local")  # eval mode, CPU
model = torch.hub.load("path/to/this/repository", "dfs_cp20_s0", source="local", device="cuda")
net = torch.hub.load("path/to/this/repository", "dfs_resnet38", source="local", num_classes=100, options="paper")
```

- **test top-1 %**: on the data set's test images (10,000 for Fashion-MNIST), with its 95 % **Wilson
  score interval** on that number of images (`study.significance.wilson_interval`): the uncertainty of
  the test set alone, not of training (seeds) nor of a re-run.
- **computation %**: the paper's figure (docs/spec.md §4) on the same test images; for the plain
  backbone 100.
- **measured time %**: eval time with the gate's own decisions against the plain ResNet-20 with the
  same weights, on the project's 2-core CPU, at batch 128 and at batch 1
  ([how](benchmarks.md#measured-time-of-the-released-checkpoints-evalpy---time-benchmarkslatency_tablepy));
  `-` where not measured. The JSON also has the `eval.py --int8` times where measured.
- **gates**: a stage-2 gate (`gate_*`) was released as the start of its stage-3 runs and evaluated on the
  5,000 validation images only; its validation figures are in parentheses.
- **made by**: the command that trained, released and evaluated it. In round 2 the row's name is the
  run's (`plan()` in `study/round2.py`, the key in its results.json), `--tiers` its tier in
  [PLAN.md](../results/fashion-mnist-dynamic/PLAN.md), and the record holds the commit of the code
  (`code_commit` in the JSON). The commands are spelled as in this checkout: at the commits that
  made these files the study scripts were `scripts/study.py` (now `study/round1.py`),
  `scripts/study_dynamic.py` (now `study/round2.py`) and `scripts/study_round3.py` (now `study/round3.py`).
  In round 3, `--lane` is the lane of [its plan](../results/fashion-mnist-round3/PLAN.md) that ran it.
- **also recorded as** (round 3): a run that reused another run's network, e.g. the β pilot the plan's
  rule selected for a budget, or a static policy the search had already returned, names that file.
- **per-option BN**: a departure flag ([departures](departures.md)); such a file loads with its own
  batch norms through `eval.py` and torch.hub alike (the flag is in the file's model config).
- **dfs_paper_cp{0.5,0.8,1.2}_sN**: for each seed, the three budgets trained the same weights (their
  files differ only in the training arguments they record; [round 2](../results/fashion-mnist-dynamic/README.md)).
"""

FOOTER = "{count} checkpoints.\n"


def main():
    text, rows = build()
    with open(os.path.join(ROOT, MARKDOWN), "w") as f:
        f.write(text)
    with open(os.path.join(ROOT, JSON), "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    print(f"{MARKDOWN}, {JSON}: {len(rows)} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
