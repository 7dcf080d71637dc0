"""End-to-end: the real stage scripts, shell scripts and eval.py on the synthetic dataset."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--dataset", "synthetic", "--batch-size", "16", "--print-freq", "1"]


def run(cmd, cwd=ROOT, env=None, check=True):
    """Run a command; on failure show its output in the assertion."""
    result = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, f"{cmd} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def snapshot(folder):
    """Bytes and modification time of every file under `folder`."""
    return {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns)
            for p in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)) if os.path.isfile(p)}


def test_pipeline_script(tmp_path):
    """scripts/pipeline.sh runs the three stages and the evaluation, leaving logs, checkpoints and plots;
    run again, it continues an unfinished stage and redoes nothing."""
    save = tmp_path / "save"
    env = {"DATASET": "synthetic", "DEPTH": "20", "TARGETS": "60 30", "SAVE": str(save), "PYTHON": sys.executable,
           "BASE_ARGS": "--iters 4 --eval-every 2 --batch-size 16",
           "GATE_ARGS": "--iters 2 --batch-size 16 --options skip,8,full",
           "DFS_ARGS": "--iters 2 --batch-size 16 --beta 1e-3",
           "EVAL_ARGS": "--batch-size 64"}
    # a stage-1 run that stopped at iteration 2 (here: the same command with --iters 2)
    run(["bash", "scripts/train_base.sh", *env["BASE_ARGS"].split(), "--iters", "2"], env=env)
    out = run(["bash", "scripts/pipeline.sh"], env=env).stdout
    assert "iterations 2..4" in out  # the pipeline continued it
    backbone = save / "backbone" / "resnet20"
    assert [json.loads(line)["step"] for line in (backbone / "log.jsonl").read_text().splitlines()] == [2, 4]
    for stage, arch in [("backbone", "resnet20"), ("full_execution", "dfs_resnet20"),
                        ("DFS_cp60", "dfs_resnet20"), ("DFS_cp30", "dfs_resnet20")]:
        folder = save / stage / arch
        for name in ("checkpoint_latest.pth.tar", "model_best.pth.tar", "args.json", "log.jsonl"):
            assert (folder / name).is_file(), folder / name
        assert glob.glob(str(folder / "events.out.tfevents.*")), f"no TensorBoard events in {folder}"
    ckpt = torch.load(save / "DFS_cp30" / "dfs_resnet20" / "checkpoint_latest.pth.tar", weights_only=True)
    assert ckpt["stage"] == "dfs" and ckpt["step"] == 2 and ckpt["options"] == ["skip", 8, "full"]
    results = json.loads((save / "eval" / "results.json").read_text())
    assert [r["checkpoint"].split("/")[-3] for r in results] == ["full_execution", "DFS_cp60", "DFS_cp30"]
    for r in results:
        assert r["num_samples"] == 256 and r["option_names"] == ["skip", "8-bit", "full"]
        dist = torch.tensor(r["decision_distribution"])
        assert dist.shape == (8, 3) and torch.allclose(dist.sum(1), torch.ones(8), atol=1e-6)
        expected_cp = 100 * (dist @ torch.tensor([0.0, 1 / 16, 1.0])).mean()
        assert abs(r["computation_percentage"] - float(expected_cp)) < 1e-3
    assert "| computation % | top-1 % |" in out
    for png in ("accuracy_vs_computation.png", "decision_distribution.png"):
        assert (save / "eval" / png).stat().st_size > 1000
    # the same command again: every stage is finished, so nothing is trained or rewritten
    runs = {p: v for p, v in snapshot(save).items() if os.sep + "eval" + os.sep not in p}
    again = run(["bash", "scripts/pipeline.sh"], env=env)
    assert again.stdout.count("nothing to do") == 4 and "iter " not in again.stdout, again.stdout
    assert {p: v for p, v in snapshot(save).items() if os.sep + "eval" + os.sep not in p} == runs


@pytest.mark.slow
def test_authors_commands(tmp_path):
    """The authors' three README commands (spec §6) run as written, on synthetic data and a short schedule."""
    py, short = sys.executable, ["--dataset", "synthetic", "--iters", "2", "--batch-size", "8", "--eval-every", "2"]
    run([py, os.path.join(ROOT, "train_base.py"), "train", "cifar10_resnet_38", "--save-folder", "save_checkpoints/backbone", *short],
        cwd=tmp_path, env={"PYTHONPATH": ROOT})
    for cmd in (
        [py, "train_gate_init.py", "train", "cifar10_rnn_gate_38", "--minimum", "100", "--lr", "0.01", "--resume",
         "save_checkpoints/backbone/cifar10_resnet_38/model_best.pth.tar", "--iters", "2000",
         "--save-folder", "save_checkpoints/full_execution"],
        [py, "train_dfs.py", "train", "cifar10_rnn_gate_38", "--minimum", "50", "--lr", "0.01", "--resume",
         "save_checkpoints/full_execution/cifar10_rnn_gate_38/checkpoint_latest.pth.tar",
         "--save-folder", "save_checkpoints/DFS"],
    ):
        # the authors' words first, then our short schedule (argparse: the last value wins)
        run([os.path.join(ROOT, cmd[1]) if i == 1 else c for i, c in enumerate(cmd)] + short,
            cwd=tmp_path, env={"PYTHONPATH": ROOT})
    ckpt = torch.load(tmp_path / "save_checkpoints/DFS/cifar10_rnn_gate_38/model_best.pth.tar", weights_only=True)
    assert ckpt["stage"] == "dfs" and ckpt["arch"] == "dfs_resnet38" and len(ckpt["options"]) == 7
    test = run([py, os.path.join(ROOT, "train_dfs.py"), "test", "cifar10_rnn_gate_38", "--dataset", "synthetic",
                "--resume", "save_checkpoints/DFS/cifar10_rnn_gate_38/model_best.pth.tar"],
               cwd=tmp_path, env={"PYTHONPATH": ROOT}).stdout
    assert "computation percentage" in test and "   18 " in test  # gated blocks 2..18 of ResNet-38
