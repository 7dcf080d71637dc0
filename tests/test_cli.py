"""What the command line says: --help with defaults and groups, the authors' flags and script names,
the stage scripts' folders and Python, and one-line errors where a user would otherwise get a traceback."""
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

import train_base
import train_dfs
import train_gate_init
from core import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, env=None, cwd=ROOT):
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True)


@pytest.mark.parametrize("stage,iters,lr", [(train_base.STAGE, 64000, 0.1), (train_gate_init.STAGE, 2000, 0.01),
                                            (train_dfs.STAGE, 64000, 0.01)])
def test_help_shows_each_stages_defaults_in_groups(stage, iters, lr):
    text = " ".join(settings.build_parser(stage).format_help().split())
    assert f"--iters ITERS iterations of this stage (default: {iters})" in text
    assert f"--lr LR learning rate (default: {lr})" in text
    assert settings.TITLES[stage.name] in text
    for group in ("the authors' flags:", "data:", "run (ours):", "departures from the paper (off by default; docs/departures.md):"):
        assert group in text
    if stage.gated:
        assert "(default: 1e-05)" in text and f"(default: {stage.target_cp})" in text
        assert "--sync-bn" not in text  # refused there, so not offered
    else:
        assert "--sync-bn" in text and "--minimum" not in text


def test_help_states_each_default_once(capsys):
    """A help that says its own default gets no "(default: ...)" after it, and no option shows "(default: None)"."""
    import eval as eval_script
    with pytest.raises(SystemExit):
        eval_script.main(["--help"])
    texts = {"eval.py": " ".join(capsys.readouterr().out.split())}
    texts.update({stage.name: " ".join(settings.build_parser(stage).format_help().split())
                  for stage in (train_base.STAGE, train_gate_init.STAGE, train_dfs.STAGE)})
    assert "the test set (default: the one the checkpoint was trained on) --data-dir" in texts["eval.py"]
    assert "(default: data)" in texts["eval.py"]  # a plain default is still shown
    for name, text in texts.items():
        assert "(default: None)" not in text and "(default: )" not in text, name
        doubled = [chunk for chunk in text.split(" --") if chunk.count("default:") > 1]  # one option's help each
        assert not doubled, (name, doubled)
    assert "default: from the arch alias, else cifar10 --eval-every" in texts["base"]


@pytest.mark.parametrize("script,argv,closest", [
    ("train_dfs.py", ["train", "dfs_resnet20", "--minimun", "50"], "--minimum"),
    ("eval.py", ["m.pth", "--datset", "synthetic"], "--dataset"),
    ("train_base.py", ["train", "resnet20", "--no-such-flag-at-all"], None),
    ("train_base.py", ["train", "resnet20", "--dataset", "imagenet"], None),  # a choice: argparse lists them
])
def test_a_mistyped_command_line_is_one_line_naming_the_closest_option(script, argv, closest):
    r = run([sys.executable, script, *argv, "--device", "cpu"])
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith(f"{script}: error: "), r.stderr
    assert err[0].endswith("(see --help)") and "usage:" not in r.stderr
    assert (f"did you mean {closest}?" in err[0]) if closest else "did you mean" not in err[0]


def test_the_readme_quick_check_logs_an_interval_in_every_stage():
    """docs/training.md: train.jsonl and training.png come every --print-freq iterations. The README's quick
    check (20 and 10 iterations) sets --print-freq at most its --iters, so every stage's folder has them."""
    import shlex
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("A quick check of the three stages", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    stages = [shlex.split(line) for line in block.splitlines() if line.startswith("python train_")]
    assert len(stages) == 3
    for words in stages:
        iters, freq = (int(words[words.index(flag) + 1]) for flag in ("--iters", "--print-freq"))
        assert freq <= iters and iters % freq == 0, words


def test_the_authors_harmless_flags_are_accepted():
    args = settings.parse_args(train_dfs.STAGE, [
        "train", "cifar10_rnn_gate_38", "-d", "cifar10", "--verbose", "--pretrained", "--gate-type", "rnn",
        "--start-iter", "0", "--proceed", "False", "--computation_cost", "True", "--device", "cpu"])
    assert args.dataset == "cifar10" and args.verbose and args.pretrained


@pytest.mark.parametrize("flag,value,words", [("--start-iter", "100", "continues exactly"),
                                              ("--proceed", "True", "--proceed True is not needed"),
                                              ("--gate-type", "ff", "only the paper's recurrent gate"),
                                              ("--computation_cost", "False", "--beta 0")])
def test_the_authors_other_flags_say_what_to_use_instead(flag, value, words, capsys):
    with pytest.raises(SystemExit) as e:
        settings.parse_args(train_dfs.STAGE, ["train", "cifar10_rnn_gate_38", flag, value, "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and words in err[-1] and err[-1].startswith("usage:") is False


def test_a_garbage_checkpoint_never_suggests_weights_only_false(tmp_path, capsys):
    from core import engine
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    assert engine.main(train_gate_init.STAGE, ["train", "dfs_resnet20", "--resume", str(bad), "--device", "cpu",
                                               "--dataset", "synthetic", "--save-folder", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a checkpoint of this project or of the authors' code" in err[0]
    assert "weights_only" not in err[0]


def run_script(script, argv, cwd, monkeypatch):
    """`python SCRIPT ARGV` run from `cwd`, in this process (runpy runs the file as __main__, as
    python does); its exit status. In-process saves a torch import per command."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    return e.value.code


def test_the_authors_readme_commands_under_their_script_names(tmp_path, monkeypatch, capsys):
    """Their three commands, with their script names (and the run folder their code really saves to)."""
    from helpers import small_synthetic
    short = ["--dataset", "synthetic", "--iters", "2", "--batch-size", "8", "--eval-every", "2", "--device", "cpu"]
    with small_synthetic(32, 16):
        for script, args in [
            ("train_base.py", ["train", "cifar10_resnet_38", "--dataset", "cifar10", "--save-folder", "save_checkpoints/backbone"]),
            ("train_sp_integrate_dynamic_quantization_initial.py",
             ["train", "cifar10_rnn_gate_38", "--minimum", "100", "--lr", "0.01", "--resume",
              "save_checkpoints/backbone/cifar10_resnet_38/model_best.pth.tar", "--iters", "2000",
              "--save-folder", "save_checkpoints/full_execution"]),
            ("train_sp_integrate_dynamic_quantization.py",
             ["train", "cifar10_rnn_gate_38", "--minimum", "50", "--lr", "0.01", "--resume",
              "save_checkpoints/full_execution/cifar10_rnn_gate_38/checkpoint_latest.pth.tar",
              "--save-folder", "save_checkpoints/DFS"]),
        ]:
            assert run_script(script, [*args, *short], tmp_path, monkeypatch) == 0, capsys.readouterr().err
        ckpt = torch.load(tmp_path / "save_checkpoints/DFS/cifar10_rnn_gate_38/model_best.pth.tar", weights_only=True)
        assert ckpt["stage"] == "dfs" and ckpt["step"] == 2 and ckpt["arch"] == "dfs_resnet38" and len(ckpt["options"]) == 7
        capsys.readouterr()
        assert run_script("train_sp_integrate_dynamic_quantization.py", [
            "test", "cifar10_rnn_gate_38", "--dataset", "synthetic", "--device", "cpu", "--resume",
            "save_checkpoints/DFS/cifar10_rnn_gate_38/model_best.pth.tar"], tmp_path, monkeypatch) == 0
    test = capsys.readouterr().out
    assert "computation percentage" in test and "   18 " in test  # gated blocks 2..18 of ResNet-38


def test_stage_scripts_find_a_hand_typed_stage_and_name_a_missing_one(tmp_path):
    env = {"SAVE": str(tmp_path), "DATASET": "synthetic", "DEPTH": "20", "PYTHON": sys.executable}
    r = run(["bash", "scripts/train_dfs.sh", "--device", "cpu"], env=env)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: {tmp_path}/full_execution/dfs_resnet20/checkpoint_latest.pth.tar is missing; "
        "it is made by scripts/train_gate_init.sh (stage 2)")
    # a stage-1 folder typed by hand with the authors' spelling is the one the stage-2 script reads
    (tmp_path / "backbone" / "cifar10_resnet_20").mkdir(parents=True)
    r = run(["bash", "scripts/train_gate_init.sh", "--device", "cpu", "--iters", "1"], env={**env, "DATASET": "cifar10"})
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: {tmp_path}/backbone/cifar10_resnet_20/model_best.pth.tar is missing; "
        "it is made by scripts/train_base.sh (stage 1)")


def test_stage_scripts_say_how_to_make_the_environment(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    r = run(["bash", "scripts/train_base.sh"], env={"PYTHON": str(fake), "SAVE": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.strip() == f"error: {fake} has no torch; create the environment with: bash scripts/setup.sh"


def test_a_gated_run_records_each_interval_and_plots_its_budget(tmp_path):
    """train.jsonl per logging interval (loss, accuracy, lr, computation % against the target, each
    block's option shares), train.log with the console lines and their time, training.png at the end."""
    from core import engine
    from core import plots
    from helpers import small_synthetic
    common = ["--dataset", "synthetic", "--device", "cpu", "--batch-size", "16", "--print-freq", "2"]
    with small_synthetic(64, 32):
        assert engine.main(train_base.STAGE, ["train", "resnet20", *common, "--iters", "2",
                                              "--save-folder", str(tmp_path / "base")]) == 0
        assert engine.main(train_gate_init.STAGE, [
            "train", "dfs_resnet20", *common, "--iters", "4", "--options", "skip,8,full", "--minimum", "40",
            "--resume", str(tmp_path / "base/resnet20/model_best.pth.tar"), "--save-folder", str(tmp_path / "g")]) == 0
    folder = tmp_path / "g" / "dfs_resnet20"
    records = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(r["split"] == "train" for r in records)
    for r in records:
        shares = torch.tensor(r["block_shares"])
        assert shares.shape == (8, 3) and torch.allclose(shares.sum(1), torch.ones(8))
        cp = 100 * (shares @ torch.tensor([0.0, 1 / 16, 1.0])).mean()
        assert abs(r["computation_percentage"] - float(cp)) < 1e-4  # the last batch's, as its shares
        assert r["target"] == 40 and r["lr"] == 0.01 and r["option_names"] == ["skip", "8-bit", "full"]
    text = (folder / "train.log").read_text().splitlines()
    assert text[0].endswith(f"saving to {folder}") and any(" iter 4/4  loss " in line for line in text)
    assert all(line[:4].isdigit() and line[10] == " " for line in text)  # a timestamp on every line
    png = folder / "training.png"
    assert png.stat().st_size > 5000
    png.unlink()
    assert plots.main([str(folder)]) == 0 and png.is_file()  # on demand, from the run folder
    assert plots.main([str(tmp_path / "base" / "resnet20")]) == 2  # no gate, nothing to plot


@pytest.mark.filterwarnings("ignore:No artists with labels")  # bar() is replaced below, so no bar reaches the legend
def test_plots_keep_one_colour_per_option_name(tmp_path, monkeypatch):
    from core import plots
    drawn = []
    real = plots._pyplot()
    monkeypatch.setattr(real.Axes, "bar", lambda self, *a, **kw: drawn.append((kw["label"], kw["color"])))
    records = [{"arch": "a", "computation_percentage": 10.0, "accuracy": 90.0, "option_names": ["skip", "8-bit", "full"],
                "decision_distribution": [[0.2, 0.3, 0.5]]},
               {"arch": "b", "computation_percentage": 5.0, "accuracy": 89.0, "option_names": ["skip", "4-bit", "8-bit", "16-bit", "full"],
                "decision_distribution": [[0.2, 0.2, 0.2, 0.2, 0.2]]}]
    plots.plot_decisions(records, str(tmp_path / "d.png"))
    colours = {}
    for name, colour in drawn:
        assert colours.setdefault(name, colour) == colour  # the same name, the same colour, in every panel
    assert len(set(map(str, colours.values()))) == len(colours) == 5
    plots.plot_accuracy([dict(r, checkpoint=f"save/run{r['arch']}/dfs_resnet20/model_best.pth.tar") for r in records],
                        str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").stat().st_size > 1000
    assert plots.run_label({"checkpoint": "save/DFS_cp50/dfs_resnet20/model_best.pth.tar"}) == "DFS_cp50"


def test_measured_time_and_a_latency_table_that_feeds_costs(tmp_path, capsys):
    """eval.py --time reports measured time next to computation percentage; the latency table's
    --costs-out file is a valid --costs table (the timing values themselves are not asserted)."""
    import importlib
    import sys as _sys
    _sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    latency = importlib.import_module("latency_table")
    from models import build_model
    from models.cost import parse_costs
    out, costs = tmp_path / "lat.json", tmp_path / "costs.json"
    assert latency.main(["--depth", "20", "--batch-size", "2", "--options", "skip,8,full", "--repeats", "1",
                         "--round-ms", "1", "--device", "cpu", "--json", str(out), "--costs-out", str(costs)]) == 0
    table = json.loads(costs.read_text())
    assert len(table) == 8 and all(row["full"] == 1.0 for row in table)
    assert parse_costs(table, ("skip", 8, "full"), 8).shape == (8, 3)
    assert json.loads(out.read_text())["hardware"]["threads"] >= 1
    import eval as eval_script
    from core.timing import time_against_plain
    model = build_model("dfs_resnet20", options="skip,8,full").eval()
    plain = eval_script.plain_resnet(model)
    assert type(plain).__name__ == "CifarResNet" and not hasattr(plain, "gate")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in plain.state_dict().items())
    t = time_against_plain(model, plain, torch.randn(4, 3, 32, 32), torch.device("cpu"), repeats=1, round_ms=1)
    assert set(t) == {"hardware", "repeats", "batch_4", "batch_1"}
    assert t["batch_4"]["time_percentage"] == 100 * t["batch_4"]["gated_ms"] / t["batch_4"]["plain_ms"]
    assert t["batch_1"]["time_percentage_vs_channels_last"] == \
        100 * t["batch_1"]["gated_ms"] / t["batch_1"]["plain_channels_last_ms"]


def test_eval_time_flag_end_to_end(tmp_path, capsys):
    import eval as eval_script
    from core.checkpoint import save_checkpoint
    from models import build_model
    model = build_model("dfs_resnet20", options="skip,8,full")
    path = tmp_path / "m.pth.tar"
    save_checkpoint({"model": model.state_dict(), "stage": "dfs", "arch": "dfs_resnet20", "num_classes": 10,
                     "step": 0, "options": ["skip", 8, "full"], "args": {"dataset": "synthetic"}}, str(path))
    out = tmp_path / "r.json"
    assert eval_script.main([str(path), str(path), "--device", "cpu", "--time", "--time-repeats", "1",
                             "--batch-size", "8", "--json", str(out), "--plot-dir", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert "measured eval time vs the plain ResNet with the same weights: batch 8 " in printed
    assert "| computation % | measured time %, eval batch / batch 1 | top-1 % |" in printed
    records = json.loads(out.read_text())
    assert all(set(r["timing"]) >= {"batch_8", "batch_1", "hardware"} for r in records)


def test_eval_warns_of_another_data_set_and_shows_progress_in_a_pipe(tmp_path, capsys):
    """A checkpoint of one data set tested on another: one warning line naming both. Without a terminal
    (a pipe, a log) the progress is a line at every tenth of the batches, the last one n/n."""
    import eval as eval_script
    from core.checkpoint import save_checkpoint
    from helpers import small_synthetic
    from models import build_model
    model = build_model("dfs_resnet20", options="skip,8,full")
    path = tmp_path / "m.pth.tar"
    ckpt = {"model": model.state_dict(), "stage": "dfs", "arch": "dfs_resnet20", "num_classes": 10, "step": 0,
            "options": ["skip", 8, "full"], "args": {"dataset": "fashion-mnist"}}
    save_checkpoint(ckpt, str(path))
    with small_synthetic(16, 40):
        assert eval_script.main([str(path), "--dataset", "synthetic", "--device", "cpu", "--batch-size", "2"]) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0] == (f"warning: {path} was trained on fashion-mnist, not synthetic: its figures here are on "
                          "images of another data set (leave out --dataset to test it on its own)")
        assert [line.split(" batches,")[0] for line in err[1:]] == [f"m.pth.tar: {i}/20" for i in range(2, 21, 2)]
        save_checkpoint(dict(ckpt, args={"dataset": "synthetic"}), str(path))
        assert eval_script.main([str(path), "--dataset", "synthetic", "--device", "cpu", "--batch-size", "16"]) == 0
        own = capsys.readouterr().err.strip().splitlines()  # its own data set: no warning; 3 batches, a line each
        assert [line.split(" batches,")[0] for line in own] == [f"m.pth.tar: {i}/3" for i in (1, 2, 3)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("script", ["eval.py", "benchmarks/speed.py", "benchmarks/latency_table.py",
                                    "train_base.py"])
def test_a_device_this_machine_lacks_stops_in_one_line(script, tmp_path):
    """--device cuda without a usable GPU: one line naming the device and CUDA's reason, exit 2 (no
    traceback), from the evaluation and the benchmarks as from the stages."""
    args = {"eval.py": [str(tmp_path / "m.pth")], "train_base.py": ["train", "resnet20", "--dataset", "synthetic"]}
    out = subprocess.run([sys.executable, script, *args.get(script, []), "--device", "cuda"], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert "--device cuda is not usable here" in err[0]
