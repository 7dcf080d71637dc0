"""End-to-end: the real stage scripts, shell scripts and eval.py on the synthetic dataset."""
import glob
import json
import os
import subprocess
import sys

import torch

from helpers import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--dataset", "synthetic", "--batch-size", "16", "--print-freq", "1"]


def run(cmd, cwd=ROOT, env=None, check=True):
    """Run a command; on failure show its output in the assertion."""
    result = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, f"{cmd} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


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
    runs = {p: v for p, v in snapshot(save).items() if "eval" not in p.parts}
    again = run(["bash", "scripts/pipeline.sh"], env=env)
    assert again.stdout.count("nothing to do") == 4 and "iter " not in again.stdout, again.stdout
    assert {p: v for p, v in snapshot(save).items() if "eval" not in p.parts} == runs
