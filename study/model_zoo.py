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
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core.checkpoint import load_checkpoint, sha256  # noqa: E402
from core.evaluation import model_config, model_from_config  # noqa: E402
from core.intervals import accuracy_interval  # noqa: E402
from models.cost import option_names  # noqa: E402
from models.dfs_resnet import module_macs  # noqa: E402

ROUND1, ROUND2, ROUND3 = "results/fashion-mnist", "results/fashion-mnist-dynamic", "results/fashion-mnist-round3"
TIMES = {"fp32": ["docs/measured-time-fashion-mnist.json", "docs/measured-time-fashion-mnist-dynamic.json"],
         "int8": ["docs/measured-time-fashion-mnist-int8.json"]}
MARKDOWN, JSON = "docs/model_zoo.md", "docs/model_zoo.json"
# The "start here" rows: the backbone, DFS at three targets, SkipNet-style skipping, static 8 bits, then
# round 3's most accurate per-option-BN DFS recipe below 1.5 % computation at the seed whose test top-1 is
# the median of its three (not the best one), followed by that seed's static counterpart
START_HERE = ("backbone", "dfs_cp10_s0", "dfs_cp20_s0", "dfs_cp50_s0", "skipnet_cp20_s0", "static-8_s0")
START_HERE_SEEDS = "dfs_po_lowbit_cp1.2_s{}"
SCRIPTS = {"base": "train_base.py", "gate_init": "train_gate_init.py", "dfs": "train_dfs.py"}
NOT_IN_COMMAND = {"cmd", "arch", "device", "data_dir", "download", "print_freq", "workers", "verbose", "tf32",
                  "overwrite", "options", "bn",  # where it ran, not what it trained (options: said below)
                  "proceed", "computation_cost", "costs"}  # the authors' one-value flags; --costs names a file


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


def released():
    """The released checkpoint files, relative to the repository, sorted."""
    return sorted(f"{folder}/checkpoints/{name}" for folder in (ROUND1, ROUND2, ROUND3)
                  for name in os.listdir(os.path.join(ROOT, folder, "checkpoints")) if name.endswith(".pth"))


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
        params, macs = size_of(ckpt)
        rows.append(dict(r, hub=hub_name(r["name"]), dataset=(ckpt.get("args") or {}).get("dataset"),
                         arch=ckpt["arch"], options=options, measured_time_percentage=times.get(r["file"], {}),
                         parameters=params, full_macs=macs, command=command(ckpt),
                         size_bytes=os.path.getsize(os.path.join(ROOT, r["file"])), sha256=sha256(os.path.join(ROOT, r["file"]))))
    for problem, names in (("released without a record", set(files) - {r["file"] for r in rows}),
                           ("timed but not released", set(times) - set(files)),
                           ("listed twice", {r["hub"] for r in rows if [s["hub"] for s in rows].count(r["hub"]) > 1})):
        if names:
            raise ValueError(f"{problem}: {', '.join(sorted(names))}")
    return markdown(rows), rows


def size_of(ckpt):
    """(parameters, MACs per image of the network at full execution): every parameter of the file's
    network (gate and per-option batch norms included); MACs of the backbone's convolutions and classifier."""
    model = model_from_config(model_config(ckpt))
    return sum(p.numel() for p in model.parameters()), int(sum(module_macs(model).values()))


def repository_path(path):
    """A path as the repository sees it: inside a study's run folder (`.../runs/...`) from runs/, a
    released file (`.../results/...`) from results/."""
    path = str(path)
    if not os.path.isabs(path):
        return path
    for top in ("runs", "results"):
        if f"/{top}/" in path:
            return f"{top}/" + path.split(f"/{top}/", 1)[1]
    return os.path.basename(path)


def command(ckpt):
    """The stage command that trained a checkpoint, from the arguments stored in it: its script, network
    and every flag whose value is not the stage's default (paths relative to the repository)."""
    from core.settings import build_parser
    import train_base
    import train_dfs
    import train_gate_init
    stage = {"base": train_base, "gate_init": train_gate_init, "dfs": train_dfs}[ckpt["stage"]].STAGE
    args = ckpt.get("args") or {}
    parser = build_parser(stage)
    defaults = vars(parser.parse_args(["train", args.get("arch", ckpt["arch"])]))
    flags = {a.dest: next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0])
             for a in parser._actions if a.option_strings}
    words = [f"python {SCRIPTS[ckpt['stage']]} train {args.get('arch', ckpt['arch'])}"]
    for dest, flag in flags.items():
        if dest in NOT_IN_COMMAND or dest not in args or args[dest] == defaults.get(dest) or dest == "help":
            continue
        value = args[dest]
        if value is True:
            words.append(flag)
        elif value is False or value is None or value == "":  # (0.0 == False: compared by identity)
            continue
        elif dest in ("policy", "route_marked", "route_unmarked") and isinstance(value, list):
            words.append(f"{flag} {','.join(str(o).removesuffix('-bit') for o in value)}")
        elif isinstance(value, list):
            words.append(f"{flag} {' '.join(map(str, value))}")
        else:
            words.append(f"{flag} {repository_path(value) if dest in ('resume', 'save_folder') else value}")
    if ckpt["stage"] != "base" and args.get("options") is not None:
        words.append(f"--options {','.join(str(o) for o in args['options'])}")
    if args.get("bn") not in (None, "shared"):
        words.append(f"--bn {args['bn']}")
    return " ".join(words)


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


def figures(r):
    """(top-1 with its interval, computation %) of a row, as the tables print them."""
    if "test" in r:
        t = r["test"]
        return (f"{t['top1']:.2f} [{t['interval_95'][0]:.2f}, {t['interval_95'][1]:.2f}]",
                f"{t['computation_percentage']:.2f}")
    return f"- (val {r['val']['top1']:.2f})", f"- (val {r['val']['computation_percentage']:.2f})"


def median_seed(by_name, stem, seeds=(0, 1, 2)):
    """The run of `stem` (a name with {} for the seed) whose test top-1 is the median of its seeds'."""
    names = sorted((stem.format(s) for s in seeds), key=lambda n: (by_name[n]["test"]["top1"], n))
    return names[len(names) // 2]


def counterpart(name):
    """The row of a round-3 DFS run's static counterpart: its own file, or the round-2 one it is the same
    network as (the same policy, parent, seed and schedule: `same_as` in round 3's record)."""
    same_as = read(f"{ROUND3}/results.json")["runs"][f"static_of_{name}"].get("same_as", "")
    return same_as.removeprefix("round2:") if same_as.startswith("round2:") else f"static_of_{name}"


def start_here(by_name):
    """The names of the start-here rows, in order."""
    dfs = median_seed(by_name, START_HERE_SEEDS)
    return START_HERE + (dfs, counterpart(dfs))


def markdown(rows):
    by_name = {r["name"]: r for r in rows}
    start = ["| entry point | what it is | test top-1 % [95 % interval] | computation % |", "|---|---|---|---:|"]
    names = start_here(by_name)
    for name in names:
        r = by_name[name]
        top1, cp = figures(r)
        text = what(r)
        if name == names[-1]:  # the counterpart: said of the row above it
            policy = ",".join(p.removesuffix("-bit") for p in r["policy"])
            text = (f"static counterpart of `{by_name[names[-2]]['hub']}`: policy {policy} for every image, "
                    f"searched on validation at its cost and trained as long")
        elif name == names[-2]:
            text += ", the median of seeds 0-2 by test top-1"
        start.append(f"| [`{r['hub']}`](../{r['file']}) | {text} ({short(r['options'])}) | {top1} | {cp} |")
    lines = [HEADER.format(start_here="\n".join(start)),
             "| entry point (file) | data set | network | options | method: target or policy "
             "| test top-1 % [95 % interval] | computation % | measured time %, batch 128 / 1 | parameters / MACs (M) "
             "| size (bytes) | sha256 (first 12) | made by |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        top1, cp = figures(r)
        fp32 = r["measured_time_percentage"].get("fp32")
        measured = f"{fp32['batch_128']:.1f} / {fp32['batch_1']:.1f}" if fp32 else "-"
        made_by = f"`{r['made_by'].removeprefix('python ')}`"
        size = f"{r['parameters'] / 1e6:.3f} / {r['full_macs'] / 1e6:.2f}"
        lines.append(f"| [`{r['hub']}`](../{r['file']}) | {r['dataset']} | {r['arch']} | {short(r['options'])} | "
                     f"{what_and_also(r)} | {top1} | {cp} | {measured} | {size} | {r['size_bytes']} | "
                     f"`{r['sha256'][:12]}` | {made_by} |")
    commands = [f"- `{r['hub']}`: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n\n" + FOOTER.format(count=len(rows), commands="\n".join(commands))


HEADER = """# Model zoo

Every released checkpoint (weights only): ResNet-20 networks trained on Fashion-MNIST by this project's
study, none on CIFAR. Back to the [README](../README.md).

## Start here

{start_here}

```python
import torch
repo = "path/to/this/repository"
model = torch.hub.load(repo, "dfs_cp20_s0", source="local")            # eval mode, CPU (device="cuda" for a GPU)
prep = torch.hub.load(repo, "transform", source="local")               # the input recipe, as a function
logits, decisions = model(prep(images))   # images: uint8 [N, 1, 28, 28] (or [N, 28, 28]), as Fashion-MNIST comes
```

- **Output.** A gated network (`dfs_resnet20`: every row but the two backbones) returns `(logits, decisions)`:
  logits `[N, 10]` and decisions `[N, 8 gated blocks, options]`, one-hot, the option each image took at
  each block. The plain `resnet20` (`backbone`, `backbone_marked`) returns logits. `python eval.py FILE` evaluates a file.
- **Input.** Float `[N, 3, 32, 32]`, made from Fashion-MNIST's 28 x 28 grey images by zero-padding 2 pixels
  on each side, repeating the grey channel three times, dividing by 255 and normalising with mean 0.2860 and
  std 0.3530 (`data.preprocess`; the hub's `transform(dataset)` returns it bound to that data set). A `*_marked_*` row
  expects the marked data set's framed images (`data.py`).
- **Names.** `cpN`: trained toward N % computation (the target of `--minimum`); `sN`: training seed N;
  `dfs`: a DFS network; `skipnet`: SkipNet-style skipping (options skip and full only); `static-8`,
  `static-16`: every block at 8 or 16 bits for every image; `static_of_X`: the static per-block policy found
  on validation at X's cost and trained like X, its counterpart in the study; `gate`: a stage-2 checkpoint,
  the start of stage 3; `po`: per-option batch norms (`--bn per-option`, a departure); `lowbit`: options
  {{skip, 2, 3, 4 bits}}; `paper`: the paper's {{skip, 8, 16 bits, full}}; `marked`: trained on
  `fashion-mnist-marked`, where half of the images carry a frame that gives their class away; `pilot`: a
  run that chose a weight of the budget term; `backbone`: stage 1, the plain ResNet-20.
- **`released`** in `dfs_released_cp20_s0` (method `dfs-released`) names the option set of the authors'
  released code, {{skip, 8, 10, 12, 14, 16 bits, full}}; every file on this page is released in the other sense.
- **Re-evaluation.** The figures are those of the CPU that made each file: 2-core AVX-512 Xeon VMs with
  VNNI and AMX for rounds 1-4 (their records do not name it; from round 5 on, every record's `provenance`
  does). On another CPU class (e.g. an AVX2 AMD EPYC), or a GPU, a row can come out a few images
  different (e.g. `static-8_s0` was re-evaluated at 93.01 % on another machine against 92.99 % here; on
  an AVX2 EPYC, `oracle_300_s0`'s unframed half at 88.28 % against 88.26 %): the convolutions' summation
  order differs between kernels, and a fake-quantized value near a rounding boundary can fall the other
  way. `tests/test_results.py` re-evaluates several rows on any CPU within 2 images of 10,000.

## Every checkpoint

Generated by `python study/model_zoo.py` from the studies' records
([round 1](../results/fashion-mnist/results.json), [round 2](../results/fashion-mnist-dynamic/results.json)
and its [amendment 2](../results/fashion-mnist-dynamic/amendment.json), [round 3](../results/fashion-mnist-round3/results.json)), the
[measured times](benchmarks.md#measured-time-of-the-released-checkpoints-evalpy---time-benchmarkslatency_tablepy)
and the files themselves; `tests/test_model_zoo.py` checks that this page is what the script writes
and that each file's size and sha256 are the ones below (all of them in [model_zoo.json](model_zoo.json)).
The write-ups: [round 1](../results/fashion-mnist/README.md), [round 2](../results/fashion-mnist-dynamic/README.md),
[round 3](../results/fashion-mnist-round3/README.md). Each file loads with `eval.py` (it reads the network
and its options from the file), or through torch.hub by its entry point (the file name with `.` and `-`
turned into `_`); an architecture builds untrained:
`torch.hub.load(repo, "dfs_resnet38", source="local", num_classes=100, options="paper")`.

- **test top-1 %**: on the data set's test images (10,000 for Fashion-MNIST), with its 95 % **Wilson
  score interval** on that number of images (`study.significance.wilson_interval`): the uncertainty of
  the test set alone, not of training (seeds) nor of a re-run.
- **computation %**: the paper's figure (docs/spec.md §4) on the same test images; for the plain
  backbone 100.
- **measured time %**: eval time with the gate's own decisions against the plain ResNet-20 with the
  same weights, on the project's 2-core CPU, at batch 128 and at batch 1
  ([how](benchmarks.md#measured-time-of-the-released-checkpoints-evalpy---time-benchmarkslatency_tablepy));
  `-` where not measured. The JSON also has the `eval.py --int8` times where measured.
- **parameters / MACs**: every parameter of the file's network (the gate and per-option batch norms
  included), and the multiply-accumulates per image of the backbone's convolutions and classifier at
  full execution (the gate's are not counted);
  the computation % says how much of the gated blocks' part a row runs, at what bitwidth.
- **gates**: a stage-2 gate (`gate_*`) was released as the start of its stage-3 runs and evaluated on the
  5,000 validation images only; its validation figures are in parentheses.
- **made by**: the command that trained, released and evaluated it; the stage command itself, rebuilt
  from the arguments stored in the file, is listed [below](#the-stage-command-of-each-file). In round 2 the row's name is the
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
- **dfs_paper_cp{{0.5,0.8,1.2}}_sN**: for each seed, the three budgets trained the same weights (their
  files differ only in the training arguments they record; [round 2](../results/fashion-mnist-dynamic/README.md)).
"""

FOOTER = """{count} checkpoints.

## The stage command of each file

Rebuilt from the arguments stored in the file (`args`): the stage script, the network and every flag
whose value differs from the stage's default, with `runs/...` the study's run folders (not released).
A `--resume` names the checkpoint the run started from (the previous stage's) or, for a run continued
past an earlier end (the `_long` rows), its own `checkpoint_latest`. `--options` and `--bn` are the
network's.

{commands}
"""


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
