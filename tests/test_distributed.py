"""Several processes (torchrun + DistributedDataParallel, gloo on CPU) compute what the authors'
DataParallel runs compute: gradients of the global batch with batch norm per process, exact
resume, one writer, stops agreed by all, and evaluation equal to one process's.

The slow tests share two launches of two processes: stage 1 by scripts/train_base.sh with NPROC=2,
then tests/ddp_worker.py for the gradient cases, the other stages and eval.py; they check what
those wrote. The fast ones cover the data sharing and the shell launcher without launching.
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import ddp_worker  # tests/ddp_worker.py, importable as pytest puts tests/ on sys.path
import train_dfs
from core import engine, evaluation, runfolder
from core.checkpoint import load_checkpoint
from helpers import log_records
from models import build_model

eval_cli = importlib.import_module("eval")  # eval.py; `import eval` would read as the builtin

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
CASES = {"base": ("resnet20", False), "dfs above target": ("dfs_resnet20", True),
         "dfs below target": ("dfs_resnet20", True), "dfs per-option BN": ("dfs_resnet20", True, "per-option")}


def run(cmd, env=None):
    """Run a command in the repository; on failure show its output in the assertion."""
    r = subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """Stage 1 by `NPROC=2 scripts/train_base.sh`: 2 iterations of two CPU processes; (folder, stdout)."""
    save = tmp_path_factory.mktemp("ddp-scripts")
    r = run(["bash", "scripts/train_base.sh", "--dataset", "synthetic", "--device", "cpu", "--batch-size", "16",
             "--iters", "2", "--eval-every", "2", "--val-size", "32", "--print-freq", "1",
             "--data-dir", str(save / "data")],
            env={"NPROC": "2", "SAVE": str(save), "DEPTH": "20", "PYTHON": sys.executable})
    return save / "backbone" / "resnet20", r.stdout


@pytest.fixture(scope="module")
def worker(backbone, tmp_path_factory):
    """tests/ddp_worker.py in two processes: (output folder, stdout, stderr, exit statuses by process)."""
    out = tmp_path_factory.mktemp("ddp-worker")
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             str(ROOT / "tests" / "ddp_worker.py"), str(out), str(backbone[0] / "checkpoint_latest.pth.tar")])
    status = [json.loads((out / f"status-{rank}.json").read_text()) for rank in (0, 1)]
    return out, r.stdout, r.stderr, status


def files(folder):
    """The run folder's files, but the lock file that marks it as one run's (runfolder.LOCK)."""
    return sorted(p.name.split(".")[0] if p.name.startswith("events") else p.name
                  for p in folder.iterdir() if p.name != runfolder.LOCK)


# ----------------------------------------------------------------------------- gradients

def one_process_gradients(name, target, bn=None):
    """The gradients of one process that runs the two half-batches separately (batch norm per half,
    as two DataParallel replicas) and takes CE_mean + beta * s * C over the global batch."""
    model = ddp_worker.build(name, bn)
    for p in getattr(model, "unused_parameters", list)():
        p.requires_grad_(False)
    x, y = ddp_worker.global_batch()
    outs = [evaluation.split_output(model(h)) for h in x.chunk(2)]
    logits, cp = torch.cat([o[0] for o in outs]), None
    loss = F.cross_entropy(logits, y)
    if target is not None:
        decisions = torch.cat([o[1] for o in outs])  # [B, G, O]
        cost = (decisions * model.option_costs).sum(-1)  # [B, G], per image and block
        cp = 100 * cost.detach().mean()
        halves = [100 * c.mean() for c in cost.detach().chunk(2)]
        assert min(halves) < target < max(halves), "the case must put the halves on both sides"
        loss = loss + ddp_worker.BETA * (1.0 if cp > target else -1.0) * cost.sum()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, loss.item(), cp


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_gradients_equal_one_process_over_the_two_half_batches(case, worker):
    """Stage 1 and stage 3 (penalty and sign included): the DDP gradients of one step are those of
    one process over the global batch with batch norm per half."""
    out = worker[0]
    per_process = [torch.load(out / f"gradients-{rank}.pt", weights_only=True)[case] for rank in (0, 1)]
    expected, loss, cp = one_process_gradients(CASES[case][0], per_process[0]["target"], *CASES[case][2:])
    ddp = per_process[0]["grads"]
    assert ddp.keys() == expected.keys() == per_process[1]["grads"].keys()
    for name in ddp:
        assert torch.equal(ddp[name], per_process[1]["grads"][name]), name  # DDP averaged them
        torch.testing.assert_close(ddp[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    # each process's loss is its share of the global one
    assert sum(p["loss"] for p in per_process) / 2 == pytest.approx(loss, rel=1e-5)
    if cp is not None:
        assert per_process[0]["cp"] == per_process[1]["cp"] == pytest.approx(cp.item(), rel=1e-6)


# ----------------------------------------------------------------------------- stages

@pytest.mark.slow
def test_stage_1_by_the_shell_script_in_two_processes(backbone, tmp_path):
    """NPROC=2 scripts/train_base.sh: exit 0, one writer, and the checkpoint loads in one process."""
    folder, stdout = backbone
    assert stdout.count("stage base: resnet20 on synthetic, cpu x 2 processes") == 1
    assert stdout.count("eval iter 2:") == 1 and stdout.count("iter 1/2 ") == 1
    assert files(folder) == ["args.json", "checkpoint_latest.pth.tar", "events", "log.jsonl", "model_best.pth.tar",
                             "train.jsonl", "train.log"]
    assert [r["step"] for r in log_records(folder)] == [2]
    ckpt = load_checkpoint(str(folder / "checkpoint_latest.pth.tar"))
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2 and len(ckpt["rng_by_rank"]) == 2
    assert eval_cli.main([str(folder / "model_best.pth.tar"), "--device", "cpu", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["num_samples"] == 256


@pytest.mark.slow
def test_two_processes_run_each_stage_with_one_writer(worker):
    out, stdout, stderr, status = worker
    assert [s["gate_init"] for s in status] == [0, 0] and [s["straight"] for s in status] == [0, 0]
    assert stdout.count("stage gate_init: dfs_resnet20 on synthetic, cpu x 2 processes") == 1
    # stage 3: straight, interrupted, resumed, the NaN run; each printed once
    assert stdout.count("stage dfs: dfs_resnet20 on synthetic, cpu x 2 processes") == 4
    assert stdout.count("iter 1/4 ") == 2  # straight and interrupted; the NaN run stops before its line
    for run, evals in (("gate_init", [2]), ("straight", [2, 4])):
        folder = out / run / "dfs_resnet20"
        assert files(folder) == ["args.json", "checkpoint_latest.pth.tar", "events", "log.jsonl", "model_best.pth.tar",
                                 "train.jsonl", "train.log", "training.png"]
        assert [r["step"] for r in log_records(folder)] == evals
    ckpt = load_checkpoint(str(out / "straight" / "dfs_resnet20" / "checkpoint_latest.pth.tar"))
    assert ckpt["stage"] == "dfs" and ckpt["step"] == 4 and ckpt["world_size"] == 2


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_and_resume_is_exact(worker):
    """SIGTERM to process 1 only during iteration 2: both stop after it, one checkpoint; resumed to 4
    it equals the straight 4-iteration run bit for bit (slices of 7 and 8 images, dithered rounding)."""
    out, _, stderr, status = worker
    assert [s["interrupted"] for s in status] == [143, 143] and [s["resumed"] for s in status] == [0, 0]
    assert stderr.count("interrupted at iteration 2; saved") == 1
    a = load_checkpoint(str(out / "split" / "dfs_resnet20" / "checkpoint_latest.pth.tar"))
    b = load_checkpoint(str(out / "straight" / "dfs_resnet20" / "checkpoint_latest.pth.tar"))
    assert a["step"] == b["step"] == 4 and a["data_state"] == b["data_state"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sb)
    for ra, rb in zip(a["rng_by_rank"], b["rng_by_rank"]):
        assert torch.equal(ra["torch"], rb["torch"])
    assert not torch.equal(b["rng_by_rank"][0]["torch"], b["rng_by_rank"][1]["torch"])  # the test's premise
    assert log_records(out / "split" / "dfs_resnet20") == log_records(out / "straight" / "dfs_resnet20")


@pytest.mark.slow
def test_a_non_finite_loss_on_one_process_stops_both(worker):
    out, _, stderr, status = worker
    assert [s["nan"] for s in status] == [3, 3]
    assert stderr.count("error: non-finite loss at iteration 1; no checkpoint was saved yet") == 1
    assert not (out / "nan" / "dfs_resnet20" / "checkpoint_latest.pth.tar").exists()


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_is_one_line(worker, capsys):
    out = worker[0]
    ckpt = out / "split" / "dfs_resnet20" / "checkpoint_latest.pth.tar"
    rc = engine.main(train_dfs.STAGE, ["train", "dfs_resnet20", "--dataset", "synthetic", "--device", "cpu",
                                       "--batch-size", "15", "--val-size", "32", "--iters", "6", "--resume", str(ckpt),
                                       "--save-folder", str(out / "one")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "trained by 2 process(es); continue it with 2, not 1" in err[0]


# ----------------------------------------------------------------------------- evaluation

@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(worker, tmp_path):
    """eval.py in 2 processes (11 batches of 24: 5 and 6 per process) gives one process's figures."""
    out, _, _, status = worker
    assert [s["eval"] for s in status] == [0, 0]
    assert eval_cli.main([str(out / "varied.pth.tar"), "--device", "cpu", "--batch-size", "24",
                          "--json", str(tmp_path / "one.json")]) == 0
    two, one = (json.loads(p.read_text()) for p in (out / "eval-2.json", tmp_path / "one.json"))
    assert (torch.tensor(one["decision_distribution"]).max(1).values < 1).any()  # choices vary
    for key in ("num_samples", "accuracy", "computation_percentage", "bitops_percentage", "decision_distribution"):
        assert two[key] == one[key], key


@pytest.mark.slow
def test_evaluation_while_training_is_one_process_evaluation_of_the_checkpoint(worker, tmp_path):
    """Stage 2 in two processes evaluated at iteration 2 (32 held-out images, batches of 16: one per
    process, each with its own batch-norm statistics by then): exactly what one process gets from
    the checkpoint, i.e. process 0's model, the loss included (the same batches, summed in float64)."""
    folder = worker[0] / "gate_init" / "dfs_resnet20"
    ckpt = load_checkpoint(str(folder / "checkpoint_latest.pth.tar"))
    model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["options"])
    model.load_state_dict(ckpt["model"])
    _, val, _ = data.build_batches("synthetic", tmp_path, 16, val_size=32)
    stats, logged = evaluation.evaluate(model, val), log_records(folder)[-1]
    assert logged["step"] == 2 and logged["num_samples"] == 32
    for key in ("acc", "loss", "computation_percentage", "decision_distribution"):
        assert logged[key] == stats[key], key


# ----------------------------------------------------------------------------- fast: data, launcher

@pytest.mark.parametrize("world,batch", [(2, 16), (3, 15), (2, 15)])
def test_processes_share_each_global_batch_in_order(world, batch):
    """Each process gets its contiguous slice of the one-process batch; together, exactly that batch."""
    images, labels = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8), torch.arange(70)
    one = data.Batches(images, labels, batch, (0.5,) * 3, (0.25,) * 3, train=True, seed=3)
    shares = [data.Batches(images, labels, batch, (0.5,) * 3, (0.25,) * 3, train=True, seed=3, rank=r, world_size=world)
              for r in range(world)]
    streams = [data.infinite(b) for b in [one] + shares]
    for _ in range(2 * len(one)):  # two epochs
        (x, y), *parts = [next(s) for s in streams]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert max(len(p[1]) for p in parts) - min(len(p[1]) for p in parts) <= 1
    assert all(s.state_dict() == one.state_dict() for s in shares)


def test_evaluation_batches_are_shared_whole():
    images, labels = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8), torch.arange(70)
    batches = [[y.tolist() for _, y in data.Batches(images, labels, 16, (0.5,) * 3, (0.25,) * 3, train=False,
                                                    rank=r, world_size=2)] for r in range(2)]
    assert [len(b) for b in batches[0] + batches[1]] == [16, 16, 16, 16, 6]
    assert sum(batches[0] + batches[1], []) == list(range(70))


def test_a_batch_that_leaves_a_process_without_images_is_refused():
    images, labels = torch.zeros(33, 3, 32, 32, dtype=torch.uint8), torch.arange(33)
    with pytest.raises(ValueError, match="a batch of 1 images"):  # 33 = 2 x 16 + 1
        data.Batches(images, labels, 16, (0.5,) * 3, (0.25,) * 3, train=True, rank=0, world_size=2)


@pytest.mark.parametrize("env,expected", [
    ({"CUDA_VISIBLE_DEVICES": "0"}, "train_base.py train resnet38"),
    ({}, "train_base.py train resnet38"),  # the scripts' default is GPU 0
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "-m torch.distributed.run --standalone --nproc-per-node 2 train_base.py"),
    ({"CUDA_VISIBLE_DEVICES": "0", "NPROC": "3"}, "-m torch.distributed.run --standalone --nproc-per-node 3 "),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "NPROC": "1"}, "train_base.py train resnet38"),
    ({"NPROC": "4", "TORCHRUN_ARGS": "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint h:29500 --rdzv-id j"},
     "-m torch.distributed.run --nnodes 2 --rdzv-backend c10d --rdzv-endpoint h:29500 --rdzv-id j --nproc-per-node 4 "),
], ids=["one GPU", "default", "two GPUs", "NPROC=3", "NPROC=1", "cluster"])
def test_the_shell_scripts_start_one_process_per_gpu(env, expected, tmp_path):
    """What the stage scripts execute (PYTHON=echo shows the command instead of running it)."""
    base = {k: v for k, v in ENV.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC", "TORCHRUN_ARGS")}
    r = subprocess.run(["bash", "scripts/train_base.sh"], cwd=ROOT, env={**base, **env, "PYTHON": "echo"},
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(expected.split(" train_base")[0]), r.stdout
    assert expected in r.stdout and ("-m torch.distributed.run" in r.stdout) == ("-m" in expected)


def test_sync_bn_is_refused_for_a_gated_stage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        engine.main(train_dfs.STAGE, ["train", "dfs_resnet20", "--dataset", "synthetic", "--device", "cpu",
                                      "--sync-bn", "--save-folder", str(tmp_path / "save")])
    assert exc.value.code == 2 and "--sync-bn is for stage 1" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "save").exists()


def test_a_bad_nproc_is_one_line(tmp_path):
    r = subprocess.run(["bash", "scripts/train_base.sh"], cwd=ROOT, env={**ENV, "NPROC": "two", "PYTHON": "echo"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: NPROC must be a positive integer, got 'two'"
