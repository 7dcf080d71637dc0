"""What the command line says: --help with defaults and groups, the authors' flags and script names,
the stage scripts' folders and Python, and one-line errors where a user would otherwise get a traceback."""
import os
import subprocess
import sys

import pytest
import torch

import settings
import train_base
import train_dfs
import train_gate_init

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
    for group in ("the authors' flags:", "data:", "run (ours):", "departures from the paper (off by default; README):"):
        assert group in text
    if stage.gated:
        assert "(default: 1e-05)" in text and f"(default: {stage.target_cp})" in text
        assert "--sync-bn" not in text  # refused there, so not offered
    else:
        assert "--sync-bn" in text and "--minimum" not in text


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
    import engine
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    assert engine.main(train_gate_init.STAGE, ["train", "dfs_resnet20", "--resume", str(bad), "--device", "cpu",
                                               "--dataset", "synthetic", "--save-folder", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a checkpoint of this project or of the authors' code" in err[0]
    assert "weights_only" not in err[0]


@pytest.mark.slow
def test_the_authors_readme_commands_under_their_script_names(tmp_path):
    """Their three commands, with their script names (and the run folder their code really saves to)."""
    py = sys.executable
    short = ["--dataset", "synthetic", "--iters", "2", "--batch-size", "8", "--eval-every", "2", "--device", "cpu"]
    env = {"PYTHONPATH": ROOT}
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
        r = run([py, os.path.join(ROOT, script), *args, *short], env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "save_checkpoints/DFS/cifar10_rnn_gate_38/model_best.pth.tar", weights_only=True)
    assert ckpt["stage"] == "dfs" and ckpt["step"] == 2 and ckpt["arch"] == "dfs_resnet38" and len(ckpt["options"]) == 7
    test = run([py, os.path.join(ROOT, "train_sp_integrate_dynamic_quantization.py"), "test", "cifar10_rnn_gate_38",
                "--dataset", "synthetic", "--device", "cpu", "--resume",
                "save_checkpoints/DFS/cifar10_rnn_gate_38/model_best.pth.tar"], env=env, cwd=tmp_path).stdout
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
