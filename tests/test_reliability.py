"""Reliability of training, checkpoints and evaluation: exact resume, atomic checkpoints,
interruption, non-finite loss, bad checkpoints, bad arguments and odd-but-valid input.

Everything trains resnet20 / dfs_resnet20 on the synthetic dataset shrunk (in this module) to
64 training images (4 batches of 16 per epoch) and 40 test images (16 + 16 + 8), on one CPU
thread. Stages run in-process through `engine.main`; real subprocesses only where a process
is the point (signals, exit status, what reaches stderr).
"""
import argparse
import builtins
import dataclasses
import errno
import importlib
import io
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import models
import train_base
import train_dfs
import train_gate_init
from core import checkpoint, engine, evaluation, losses
from helpers import log_records, small_synthetic, snapshot
from models.dfs_resnet import DFSResNet

eval_cli = importlib.import_module("eval")  # eval.py; `import eval` would read as the builtin

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"base": train_base.STAGE, "gate_init": train_gate_init.STAGE, "dfs": train_dfs.STAGE}
ARCH = {"base": "resnet20", "gate_init": "dfs_resnet20", "dfs": "dfs_resnet20"}
TRAIN_SIZE, TEST_SIZE = 64, 40
N, K = 6, 3  # a 6-iteration run crosses the epoch boundary at 4; stops happen mid-epoch at 3
SUBPROCESS_ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(scope="module", autouse=True)
def small_world():
    """A small synthetic dataset and one thread."""
    with small_synthetic(TRAIN_SIZE, TEST_SIZE):
        yield


# ----------------------------------------------------------------------------- helpers

def train(stage, save, extra=(), *, iters, hook=None, stage_def=None, settings=True):
    """engine.main for `stage` in-process; returns (exit status, [(iteration, loss, batch size)]).

    hook(run, x) runs before each step and may return a replacement batch x. settings=False
    leaves out --dataset synthetic --batch-size 16 (a resume takes them from the checkpoint).
    """
    argv = ["train", ARCH[stage], *(["--dataset", "synthetic", "--batch-size", "16"] if settings else []),
            "--device", "cpu", "--data-dir", str(Path(save).parent / "data"), "--save-folder", str(save),
            "--iters", str(iters), *map(str, extra)]
    steps, real_step = [], engine.train_step

    def recording_step(run, loss_fn, x, y):
        changed = hook(run, x) if hook is not None else None
        x = x if changed is None else changed
        out = real_step(run, loss_fn, x, y)
        steps.append((run.step + 1, out[0].item(), len(y)))  # run.step counts finished iterations
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "train_step", recording_step)
        rc = engine.main(stage_def or STAGES[stage], argv)
    return rc, steps


def latest(save, stage):
    return Path(save) / ARCH[stage] / "checkpoint_latest.pth.tar"


def best(save, stage):
    return Path(save) / ARCH[stage] / "model_best.pth.tar"


def load(path):
    return checkpoint.load_checkpoint(str(path))


def stage_records(save, stage):
    return log_records(Path(save) / ARCH[stage])


def assert_same_training_state(a, b, same_evaluations=True):
    """Model, optimizer, position in the data and random state are identical (torch.equal)."""
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"model tensors differ: {differ[:5]}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa and sa.keys() == sb.keys()
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    assert a["data_state"] == b["data_state"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["python"] == b["rng"]["python"]
    if same_evaluations:
        assert a["best_acc"] == b["best_acc"]


def one_line_error(text, *needles):
    """stderr is exactly one line, an error naming each of `needles`, without a traceback."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("error: ") and "Traceback" not in text
    for needle in needles:
        assert str(needle) in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def parents(small_world, tmp_path_factory):
    """A 2-iteration stage-1 checkpoint and a 2-iteration stage-2 one (options skip,8,full) from it."""
    root = tmp_path_factory.mktemp("parents")
    assert train("base", root / "base", iters=2)[0] == 0
    assert train("gate_init", root / "gate", ["--resume", latest(root / "base", "base"),
                                              "--options", "skip,8,full"], iters=2)[0] == 0
    return {"base": latest(root / "base", "base"), "gate_init": latest(root / "gate", "gate_init")}


@pytest.fixture(scope="module")
def start(parents):
    """How each stage starts: from scratch, from the stage-1, from the stage-2 checkpoint."""
    return {"base": [],
            "gate_init": ["--resume", parents["base"], "--options", "skip,8,full"],
            # dithered rounding draws from the global RNG in training and in evaluation
            "dfs": ["--resume", parents["gate_init"], "--stochastic-act-rounding"]}


@pytest.fixture(scope="module")
def reference(start, tmp_path_factory):
    """Uninterrupted N-iteration run of a stage (evaluating at 4 and 6), computed once per stage."""
    cache = {}

    def get(stage):
        if stage not in cache:
            save = tmp_path_factory.mktemp(f"reference-{stage}")
            rc, steps = train(stage, save, start[stage] + ["--eval-every", "4"], iters=N)
            assert rc == 0 and [s for s, _, _ in steps] == list(range(1, N + 1))
            cache[stage] = save, steps
        return cache[stage]
    return get


# ----------------------------------------------------------------------------- 1. exact resume

@pytest.mark.parametrize("stage", list(STAGES))
def test_resume_after_iters_k_equals_uninterrupted_run(stage, start, reference, tmp_path):
    """--iters K, then --resume checkpoint_latest --iters N == N straight, with evaluations elsewhere."""
    ref_save, ref_steps = reference(stage)
    save = tmp_path / "save"
    rc1, first = train(stage, save, start[stage] + ["--eval-every", "2"], iters=K)
    rc2, second = train(stage, save, start[stage] + ["--eval-every", "5", "--resume", latest(save, stage)],
                        iters=N)
    assert (rc1, rc2) == (0, 0)
    assert [s for s, _, _ in first] == [1, 2, 3] and [s for s, _, _ in second] == [4, 5, 6]
    assert first + second == ref_steps  # every training loss, exactly
    assert_same_training_state(load(latest(save, stage)), load(latest(ref_save, stage)), same_evaluations=False)
    # evaluations at 2, 3, 5 (here) and 4 (there) change nothing: the final ones agree exactly
    assert [r["step"] for r in stage_records(save, stage)] == [2, 3, 5, 6]
    assert stage_records(save, stage)[-1] == stage_records(ref_save, stage)[-1]


@pytest.mark.parametrize("stage", ["gate_init", "dfs"])
def test_execution_mixed_trains_the_same_run(stage, start, reference, tmp_path, monkeypatch):
    """--execution mixed (every option with autograd) then a resume with the default sparse
    backward: the same losses and the same final state as the uninterrupted default run."""
    ref_save, ref_steps = reference(stage)
    save, seen = tmp_path / "save", []
    real_run_all = DFSResNet.run_all

    def recording_run_all(self, g, block, x, hard, sparse):
        seen.append(sparse)
        return real_run_all(self, g, block, x, hard, sparse)
    monkeypatch.setattr(DFSResNet, "run_all", recording_run_all)
    rc1, first = train(stage, save, start[stage] + ["--eval-every", "4", "--execution", "mixed"], iters=K)
    dense, seen[:] = list(seen), []
    rc2, second = train(stage, save, start[stage] + ["--eval-every", "4", "--resume", latest(save, stage)],
                        iters=N)
    assert (rc1, rc2) == (0, 0)
    assert dense and not any(dense) and seen and all(seen)  # the flag reached the training forward
    assert load(latest(save, stage))["args"]["execution"] == "dynamic"
    assert first + second == ref_steps
    assert_same_training_state(load(latest(save, stage)), load(latest(ref_save, stage)), same_evaluations=False)


@pytest.mark.parametrize("stage", list(STAGES))
def test_resuming_a_finished_run_is_a_clean_no_op(stage, start, reference, capsys):
    ref_save, _ = reference(stage)
    before = snapshot(ref_save)
    capsys.readouterr()
    rc, steps = train(stage, ref_save, start[stage] + ["--resume", latest(ref_save, stage)], iters=N)
    out, err = capsys.readouterr()
    assert rc == 0 and steps == [] and err == ""
    assert "already finished 6 of --iters 6" in out and "nothing to do" in out
    assert snapshot(ref_save) == before  # same files, bytes and modification times


def bare_resume(stage, checkpoint, extra=(), hook=None):
    """`train ARCH --resume CHECKPOINT` with nothing else a run defines (no --iters, --save-folder or
    data settings), as a user following the refusal's advice types it; returns (status, steps)."""
    argv = ["train", ARCH[stage], "--device", "cpu", "--data-dir", str(Path(checkpoint).parents[1] / "data"),
            "--resume", str(checkpoint), *map(str, extra)]
    steps, real_step = [], engine.train_step

    def recording_step(run, loss_fn, x, y):
        if hook is not None:
            hook(run, x)
        out = real_step(run, loss_fn, x, y)
        steps.append((run.step + 1, out[0].item(), len(y)))
        return out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "train_step", recording_step)
        return engine.main(STAGES[stage], argv), steps


@pytest.mark.parametrize("stage", ["base", "dfs"])
def test_a_bare_resume_of_a_finished_run_writes_nothing(stage, reference, tmp_path, monkeypatch, capsys):
    """Before: the default --iters (64,000) extended the finished run, into ./save_checkpoints."""
    ref_save, _ = reference(stage)
    before = snapshot(ref_save)
    monkeypatch.chdir(tmp_path)  # where a default --save-folder would land
    capsys.readouterr()
    rc, steps = bare_resume(stage, latest(ref_save, stage))
    out, err = capsys.readouterr()
    assert rc == 0 and steps == [] and err == "", err
    assert f"already finished {N} of --iters {N} iterations; nothing to do (a larger --iters N continues it to N)" in out
    assert snapshot(ref_save) == before and os.listdir(tmp_path) == []


@pytest.mark.parametrize("stage", ["gate_init", "dfs"])
def test_an_interrupted_run_resumed_bare_ends_where_an_uninterrupted_one_ends(stage, start, reference,
                                                                              tmp_path, monkeypatch, capsys):
    ref_save, ref_steps = reference(stage)
    save = tmp_path / "save"
    rc, first = train(stage, save, start[stage] + ["--eval-every", "4"], iters=N, hook=signal_at(K, signal.SIGTERM))
    assert rc == 128 + signal.SIGTERM and [s for s, _, _ in first] == [1, 2, 3]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    rc, second = bare_resume(stage, latest(save, stage))  # its own --iters and --eval-every too
    assert rc == 0 and first + second == ref_steps, capsys.readouterr().err  # to its own N, every loss exactly
    assert f"saving to {run_folder(save, stage)}" in capsys.readouterr().out
    assert os.listdir(elsewhere) == []  # the run's own folder, not ./save_checkpoints
    assert_same_training_state(load(latest(save, stage)), load(latest(ref_save, stage)))
    assert stage_records(save, stage) == stage_records(ref_save, stage)


def test_an_extension_says_so_and_keeps_the_earlier_record(tmp_path, capsys):
    save = tmp_path / "save"
    assert train("base", save, ["--eval-every", "2"], iters=2)[0] == 0
    folder = run_folder(save)
    first = (folder / "args.json").read_bytes()
    capsys.readouterr()
    rc, steps = train("base", save, ["--resume", latest(save, "base")], iters=4)
    out = capsys.readouterr().out
    assert rc == 0 and [s for s, _, _ in steps] == [3, 4]
    assert f"extending the run of {latest(save, 'base')} from 2 to 4 iterations" in out
    assert (folder / "args.until-2.json").read_bytes() == first  # what the finished run was
    assert json.loads((folder / "args.json").read_text())["iters"] == 4
    before = snapshot(save)
    capsys.readouterr()
    assert bare_resume("base", latest(save, "base")) == (0, [])  # the extended run is now 4 iterations
    assert "nothing to do" in capsys.readouterr().out and snapshot(save) == before
    assert train("base", save, ["--overwrite"], iters=2)[0] == 0  # a new run leaves nothing of the old one here
    assert not (folder / "args.until-2.json").exists()
    aside, = save.glob("resnet20.replaced-*")  # ... and the old one, moved aside whole
    assert (aside / "args.until-2.json").read_bytes() == first and load(str(aside / "checkpoint_latest.pth.tar"))["step"] == 4


def test_a_bare_resume_under_another_spelling_of_the_network_continues_in_the_runs_folder(tmp_path, monkeypatch):
    """A run trained as the authors' alias (its folder named so) and resumed as the canonical name, or
    the other way round: the run's own folder, not a copy under the other name."""
    save = tmp_path / "save"
    argv = ["train", "cifar10_resnet_20", "--dataset", "synthetic", "--batch-size", "16", "--device", "cpu",
            "--data-dir", str(tmp_path / "data"), "--save-folder", str(save), "--iters", "2"]
    assert engine.main(STAGES["base"], argv) == 0
    folder = save / "cifar10_resnet_20"
    monkeypatch.chdir(tmp_path)
    rc = engine.main(STAGES["base"], ["train", "resnet20", "--device", "cpu", "--data-dir", str(tmp_path / "data"),
                                      "--resume", str(folder / "checkpoint_latest.pth.tar"), "--iters", "3"])
    assert rc == 0 and load(folder / "checkpoint_latest.pth.tar")["step"] == 3
    assert sorted(os.listdir(save)) == ["cifar10_resnet_20"] and not (tmp_path / "save_checkpoints").exists()


def test_args_and_checkpoints_record_the_code_and_booleans_as_booleans(tmp_path):
    save = tmp_path / "save"
    assert train("base", save, ["--proceed", "False"], iters=1)[0] == 0
    args = json.loads((run_folder(save) / "args.json").read_text())
    assert args["proceed"] is False
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    from core.provenance import code_commit, cpu
    for record in (args["provenance"], load(latest(save, "base"))["provenance"]):
        assert record["torch"] == torch.__version__ and type(record["torch"]) is str
        assert record["code_commit"] is None if not commit else record["code_commit"].startswith(commit)
        assert record["code_commit"] == code_commit()  # "-dirty" when this checkout's code is uncommitted
        assert {k: record[k] for k in ("cpu", "cpu_capability", "vnni", "amx")} == cpu()
    release = tmp_path / "release.pth"
    checkpoint.export_weights(str(latest(save, "base")), str(release))
    assert load(release)["provenance"] == args["provenance"]


def test_a_finished_run_without_its_state_is_refused_not_skipped(start, reference, tmp_path, capsys):
    """'Nothing to do' is said before the data and optimizer are built, but still after checking
    that the file holds a run: here a finished checkpoint without its optimizer state."""
    ref_save, _ = reference("base")
    ckpt = load(latest(ref_save, "base"))
    del ckpt["optimizer"]
    torch.save(ckpt, tmp_path / "weights.pth.tar")
    capsys.readouterr()
    rc, steps = train("base", tmp_path / "save", start["base"] + ["--resume", tmp_path / "weights.pth.tar"], iters=N)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and steps == [] and len(err) == 1, err
    assert err[0] == f"error: {tmp_path / 'weights.pth.tar'} lacks optimizer, so it cannot continue a run"


# ----------------------------------------------------------------------------- 2. atomic checkpoints

class SimulatedCrash(Exception):
    pass


def crashing_save(real_save, crash_on_call):
    """torch.save that, on call number `crash_on_call`, writes half a checkpoint and then dies."""
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) != crash_on_call:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04" + b"\0" * 1000)
        f.flush()
        raise SimulatedCrash("power cut")
    return save


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "checkpoint_latest.pth.tar"
    checkpoint.save_checkpoint({"model": {"w": torch.ones(3)}, "stage": "base", "arch": "resnet20",
                                "num_classes": 10, "step": 1}, str(path))
    renames = []
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((a, b)), os.rename(a, b)))
    monkeypatch.setattr(torch, "save", crashing_save(torch.save, 1))
    with pytest.raises(SimulatedCrash):
        checkpoint.save_checkpoint({"model": {"w": torch.zeros(3)}, "stage": "base", "arch": "resnet20",
                                    "num_classes": 10, "step": 2}, str(path))
    assert renames == []  # the half-written file never took the checkpoint's name
    assert os.listdir(path.parent) == [path.name]  # and the temporary file is gone
    ckpt = load(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((a, b)), os.rename(a, b)))
    checkpoint.save_checkpoint(dict(ckpt, step=3), str(path))  # a good save: temp file + rename
    assert len(renames) == 1 and Path(renames[0][0]).parent == path.parent and renames[0][1] == str(path)
    assert load(path)["step"] == 3 and os.listdir(path.parent) == [path.name]


def test_a_crash_while_training_saves_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """Saves: latest@2, best@2, latest@4 (crashes half-way): latest@2 is intact and loads."""
    save = tmp_path / "save"
    monkeypatch.setattr(torch, "save", crashing_save(torch.save, 3))
    with pytest.raises(SimulatedCrash):
        train("base", save, ["--eval-every", "2"], iters=4)
    folder = save / ARCH["base"]
    assert not [p for p in os.listdir(folder) if p.startswith(".tmp")]
    assert load(latest(save, "base"))["step"] == 2 and load(best(save, "base"))["step"] == 2


def scripted_evaluate(monkeypatch, accuracies):
    accuracies = list(accuracies)
    monkeypatch.setattr(engine, "evaluate", lambda model, batches, **kwargs: {
        "acc": accuracies.pop(0), "loss": 1.0, "num_samples": TEST_SIZE})


def test_model_best_is_only_replaced_by_a_better_one(tmp_path, monkeypatch):
    save = tmp_path / "save"
    scripted_evaluate(monkeypatch, [50.0, 70.0, 60.0, 65.0, 70.0])
    assert train("base", save, ["--eval-every", "1"], iters=2)[0] == 0
    # across a resume too: best_acc travels in the checkpoint
    assert train("base", save, ["--eval-every", "1", "--resume", latest(save, "base")], iters=5)[0] == 0
    best_ckpt, last = load(best(save, "base")), load(latest(save, "base"))
    assert best_ckpt["step"] == 2 and best_ckpt["best_acc"] == 70.0  # not 4 (60), 5 (65) or 5 (tie 70)
    assert last["step"] == 5 and last["best_acc"] == 70.0


def test_model_best_is_written_even_when_the_first_evaluation_scores_zero(tmp_path, monkeypatch):
    save = tmp_path / "save"
    scripted_evaluate(monkeypatch, [0.0, 0.0])
    assert train("base", save, ["--eval-every", "1"], iters=2)[0] == 0
    assert load(best(save, "base"))["step"] == 1


# ----------------------------------------------------------------------------- 3. interruption

def signal_at(iteration, signum):
    """Hook that signals this process during the given iteration (as a user or scheduler would)."""
    def hook(run, x):
        if run.step + 1 == iteration and not getattr(hook, "sent", False):
            # never SIG_DFL here: that would kill pytest instead of failing the test
            assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler)
            hook.sent = True
            os.kill(os.getpid(), signum)
    return hook


def signal_name(value):
    return value.name if isinstance(value, signal.Signals) else None


@pytest.mark.parametrize("stage,signum", [("base", signal.SIGTERM), ("gate_init", signal.SIGINT),
                                          ("dfs", signal.SIGTERM), ("dfs", signal.SIGINT)], ids=signal_name)
def test_signal_saves_at_the_step_boundary_and_resume_is_exact(stage, signum, start, reference,
                                                               tmp_path, capsys):
    ref_save, ref_steps = reference(stage)
    save, command = tmp_path / "save", start[stage] + ["--eval-every", "4"]  # the reference's command
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    rc, first = train(stage, save, command, iters=N, hook=signal_at(K, signum))
    err = capsys.readouterr().err
    assert rc == 128 + signum
    one = err.strip().splitlines()
    assert len(one) == 1 and f"interrupted at iteration {K}" in one[0]
    assert f"--resume {latest(save, stage)}" in one[0]
    assert [s for s, _, _ in first] == [1, 2, 3] and load(latest(save, stage))["step"] == K
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back
    rc, second = train(stage, save, command + ["--resume", latest(save, stage)], iters=N)
    assert rc == 0 and first + second == ref_steps
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert_same_training_state(load(latest(save, stage)), load(latest(ref_save, stage)))
    assert stage_records(save, stage) == stage_records(ref_save, stage)


def read_until(proc, text, timeout):
    """Lines of proc.stdout up to the first containing `text`."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"no {text!r} within {timeout} s; stdout {seen}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=signal_name)
def test_signal_to_a_real_training_process(signum, tmp_path, monkeypatch, capsys):
    save = tmp_path / "save"
    options = ["--val-size", "448", "--print-freq", "1"]  # 64 training images, as in the other tests
    cmd = [sys.executable, str(ROOT / "train_base.py"), "train", "resnet20", "--dataset", "synthetic",
           "--batch-size", "16", "--iters", "1000", "--device", "cpu", "--save-folder", str(save),
           "--data-dir", str(tmp_path / "data"), *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=SUBPROCESS_ENV, cwd=tmp_path)
    try:
        seen = read_until(proc, "iter 1/1000", timeout=120)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
        out = "".join(seen) + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    k = int(re.search(r"interrupted at iteration (\d+)", lines[0]).group(1))
    assert f"--resume {latest(save, 'base')}" in lines[0]
    assert 1 <= k < 1000 and re.findall(r"iter (\d+)/1000", out)[-1] == str(k)  # stopped right there
    assert load(latest(save, "base"))["step"] == k
    # the same command plus --resume continues from iteration k (here for one more iteration)
    monkeypatch.setattr(data, "SYNTHETIC_SIZES", (512, 256))
    capsys.readouterr()
    rc, steps = train("base", save, options + ["--resume", latest(save, "base")], iters=k + 1)
    assert rc == 0 and [s for s, _, _ in steps] == [k + 1]
    assert f"iterations {k}..{k + 1}" in capsys.readouterr().out
    assert load(latest(save, "base"))["step"] == k + 1


# ----------------------------------------------------------------------------- 4. non-finite loss

def nan_loss_at(iteration, save, seen):
    """Stage-1 loss that turns NaN at `iteration`, noting checkpoint_latest as it is just then."""
    def make_loss(args):
        calls, inner = [], losses.cross_entropy_loss(args)

        def loss_fn(*a):
            calls.append(1)
            loss, cp = inner(*a)
            if len(calls) == iteration:
                seen.update(snapshot(save))
                loss = loss * float("nan")
            return loss, cp
        return loss_fn
    return make_loss


def nan_input_at(iteration, save, seen):
    """Hook: the batch of `iteration` holds a NaN (so the model's output and loss do too)."""
    def hook(run, x):
        if run.step + 1 == iteration:
            seen.update(snapshot(save))
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
            return x
    return hook


@pytest.mark.parametrize("stage", ["base", "dfs"])
def test_non_finite_loss_stops_with_status_3_and_keeps_the_checkpoint(stage, start, tmp_path, capsys):
    save, seen = tmp_path / "save", {}
    if stage == "base":
        stage_def = dataclasses.replace(STAGES["base"], make_loss=nan_loss_at(3, save, seen))
        rc, steps = train(stage, save, ["--eval-every", "2"], iters=4, stage_def=stage_def)
    else:
        rc, steps = train(stage, save, start[stage] + ["--eval-every", "2"], iters=4,
                          hook=nan_input_at(3, save, seen))
    assert rc == 3 and [s for s, _, _ in steps] == [1, 2]
    one_line_error(capsys.readouterr().err, "non-finite loss at iteration 3", save / ARCH[stage])
    assert latest(save, stage) in seen and snapshot(save) == seen  # nothing written since
    assert load(latest(save, stage))["step"] == 2


def test_non_finite_loss_before_any_checkpoint_names_none(tmp_path, capsys):
    """Diverging before the first evaluation: no checkpoint exists, and the message must not claim one."""
    save = tmp_path / "save"
    stage_def = dataclasses.replace(STAGES["base"], make_loss=nan_loss_at(1, save, {}))
    rc, steps = train("base", save, ["--eval-every", "2"], iters=4, stage_def=stage_def)
    assert rc == 3 and steps == []
    line = one_line_error(capsys.readouterr().err, "non-finite loss at iteration 1", "no checkpoint")
    assert "kept" not in line and not latest(save, "base").exists()


# ----------------------------------------------------------------------------- 5. loading

class Mkdir:
    """Unpickling this runs os.mkdir: the kind of payload weights_only=True must refuse."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def write_bad(kind, path, parents):
    """Write a bad 'checkpoint' of the given kind at `path`."""
    good = load(parents["base"])
    if kind == "truncated":
        raw = parents["base"].read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
    elif kind == "random bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind.startswith("pickle "):  # tiny pickles that break the unpickler in various ways
        path.write_bytes({"pickle stack": b"\x80\x02.", "pickle memo": b"\x80\x02h\x05.",
                          "pickle int": b"\x80\x02J\x01", "pickle protocol": b"\x80\x5f."}[kind])
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "dict without keys":
        torch.save({"model": good["model"], "epoch": 3}, path)
    elif kind == "wrong types":
        torch.save(dict(good, model=torch.zeros(3), arch=20), path)
    elif kind == "namespace args":
        torch.save(dict(good, args=argparse.Namespace(**good["args"])), path)
    elif kind == "code":
        torch.save(dict(good, args=Mkdir(path.parent / "pwned")), path)
    return path


BAD_FILES = ["missing", "truncated", "random bytes", "pickle stack", "pickle memo", "pickle int",
             "pickle protocol", "tensor", "dict without keys", "wrong types", "namespace args", "code"]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_a_bad_checkpoint_file_is_one_line_and_status_2(kind, parents, tmp_path, capsys):
    bad = write_bad(kind, tmp_path / "bad.pth.tar", parents)
    save = tmp_path / "save"
    capsys.readouterr()
    rc, steps = train("gate_init", save, ["--resume", bad], iters=2)
    assert rc == 2 and steps == []
    one_line_error(capsys.readouterr().err, bad)
    assert not save.exists()
    assert not (tmp_path / "pwned").exists()


def test_the_code_payload_would_run_without_weights_only(parents, tmp_path):
    """Guards the test above: the 'code' file really executes when unpickled unsafely."""
    bad = write_bad("code", tmp_path / "bad.pth.tar", parents)
    torch.load(bad, weights_only=False)
    assert (tmp_path / "pwned").is_dir()


def test_checkpoints_are_always_read_with_weights_only(parents, monkeypatch):
    seen, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: (seen.append(kw.get("weights_only")), real(*a, **kw))[1])
    load(parents["base"])
    eval_cli.load_model(str(parents["gate_init"]), "cpu")
    assert seen == [True, True]


def crafted(tmp_path, name, arch, num_classes, stage="base", options=None, weights_of=None):
    """A checkpoint holding `weights_of` (default: `arch`) but claiming arch/classes/stage."""
    model = models.build_model(weights_of or arch, num_classes, options)
    path = tmp_path / name
    checkpoint.save_checkpoint({"model": model.state_dict(), "stage": stage, "arch": arch,
                                "num_classes": num_classes, "step": 0, "options": options}, str(path))
    return path


def mismatch(case, parents, tmp_path):
    """(stage, --resume file, extra args, words the error must contain) for each mismatch."""
    if case == "other architecture":
        return "gate_init", crafted(tmp_path, "r32.pth.tar", "resnet32", 10), [], ["resnet32", "dfs_resnet20"]
    if case == "weights of another architecture":
        path = crafted(tmp_path, "lies.pth.tar", "resnet20", 10, weights_of="resnet32")
        return "gate_init", path, [], ["does not fit", "dfs_resnet20"]
    if case == "other number of classes":
        return "gate_init", crafted(tmp_path, "c100.pth.tar", "resnet20", 100), [], ["100 classes", "10"]
    if case == "other options":
        return "dfs", parents["gate_init"], ["--options", "skip,full"], ["skip", "8", "full"]
    if case == "stage 3 from a backbone":
        return "dfs", parents["base"], [], ["'base' checkpoint", "'gate_init'"]
    if case == "stage 2 from a stage-3 checkpoint":
        path = tmp_path / "dfs.pth.tar"
        checkpoint.save_checkpoint(dict(load(parents["gate_init"]), stage="dfs"), str(path))
        return "gate_init", path, [], ["'dfs' checkpoint", "'base'", "'gate_init'"]
    if case == "stage 1 from a stage-2 checkpoint":
        return "base", parents["gate_init"], [], ["'gate_init' checkpoint", "'base'"]
    if case == "continuing without training state":
        path = tmp_path / "bare.pth.tar"
        good = load(parents["gate_init"])
        checkpoint.save_checkpoint({k: good[k] for k in [*checkpoint.REQUIRED, "options"]}, str(path))
        return "gate_init", path, [], ["optimizer"]
    if case == "continuing with another batch size":  # stopped after 2 of 4 batches; 1 batch now
        return "gate_init", parents["gate_init"], ["--batch-size", "64"], ["--batch-size"]
    raise AssertionError(case)


MISMATCHES = ["other architecture", "weights of another architecture", "other number of classes",
              "other options", "stage 3 from a backbone", "stage 2 from a stage-3 checkpoint",
              "stage 1 from a stage-2 checkpoint", "continuing without training state",
              "continuing with another batch size"]


@pytest.mark.parametrize("case", MISMATCHES)
def test_a_checkpoint_that_does_not_fit_is_one_line_and_status_2(case, parents, tmp_path, capsys):
    stage, path, extra, words = mismatch(case, parents, tmp_path)
    save = tmp_path / "save"
    capsys.readouterr()
    rc, steps = train(stage, save, ["--resume", path, *extra], iters=4)
    assert rc == 2 and steps == []
    one_line_error(capsys.readouterr().err, path, *words)
    assert not save.exists()


@pytest.mark.parametrize("kind", ["missing", "truncated", "random bytes", "pickle memo", "tensor",
                                  "dict without keys", "wrong types", "namespace args", "code"])
def test_eval_rejects_a_bad_checkpoint_in_one_line(kind, parents, tmp_path, capsys):
    bad = write_bad(kind, tmp_path / "bad.pth.tar", parents)
    capsys.readouterr()
    rc = eval_cli.main([str(bad), "--dataset", "synthetic", "--device", "cpu",
                        "--data-dir", str(tmp_path / "data"), "--json", str(tmp_path / "out.json")])
    assert rc == 2
    one_line_error(capsys.readouterr().err, bad)
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "pwned").exists()


def test_eval_process_prints_one_line_for_a_corrupt_checkpoint(tmp_path):
    """A real process: warnings the unpickler emits must not reach stderr either."""
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"\x80\x5f.")  # pickle protocol 95 (torch warns), then STOP on an empty stack
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), str(bad), "--dataset", "synthetic",
                        "--device", "cpu", "--data-dir", str(tmp_path / "data")],
                       capture_output=True, text=True, env=SUBPROCESS_ENV, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    one_line_error(r.stderr, bad)


def test_a_folder_given_as_a_checkpoint_says_so_and_names_the_checkpoints_in_it(tmp_path, capsys):
    """A save folder or run folder where a checkpoint belongs (eval.py, --resume): one line saying it is a
    folder, naming the checkpoints in it and one level down, or saying it holds none."""
    save = tmp_path / "save"
    (save / "dfs_resnet20").mkdir(parents=True)
    for name in ("checkpoint_latest.pth.tar", "model_best.pth.tar", "log.jsonl"):
        (save / "dfs_resnet20" / name).write_bytes(b"")
    capsys.readouterr()
    assert eval_cli.main([str(save), "--dataset", "synthetic", "--device", "cpu"]) == 2
    line = one_line_error(capsys.readouterr().err, f"{save} is a folder, not a checkpoint",
                          save / "dfs_resnet20" / "checkpoint_latest.pth.tar", save / "dfs_resnet20" / "model_best.pth.tar")
    assert "log.jsonl" not in line and "not found" not in line
    rc, _ = train("gate_init", tmp_path / "s", ["--resume", save / "dfs_resnet20"], iters=1)
    assert rc == 2
    one_line_error(capsys.readouterr().err, "is a folder", save / "dfs_resnet20" / "model_best.pth.tar")
    (tmp_path / "empty").mkdir()
    assert eval_cli.main([str(tmp_path / "empty"), "--device", "cpu"]) == 2
    one_line_error(capsys.readouterr().err, "is a folder, not a checkpoint: it holds no checkpoint")
    assert not (tmp_path / "s").exists()


def test_eval_matches_the_training_evaluation(parents, tmp_path, capsys):
    """eval.py on a good checkpoint (the positive control for the tests above)."""
    out = tmp_path / "out.json"
    assert eval_cli.main([str(parents["gate_init"]), "--device", "cpu", "--batch-size", "7",
                          "--data-dir", str(tmp_path / "data"), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    last = stage_records(parents["gate_init"].parent.parent, "gate_init")[-1]
    assert record["num_samples"] == TEST_SIZE and record["dataset"] == "synthetic"
    assert record["accuracy"] == last["acc"] and record["decision_distribution"] == last["decision_distribution"]


def test_eval_of_one_checkpoint_gives_its_interval_and_says_what_it_wrote(parents, tmp_path, capsys):
    """One checkpoint: the 95 % Wilson interval printed and in the JSON (as the several-checkpoint
    table gives it), computed here from the count correct; each output file named."""
    from core.intervals import wilson_interval
    out, plots = tmp_path / "out.json", tmp_path / "plots"
    capsys.readouterr()
    assert eval_cli.main([str(parents["gate_init"]), "--device", "cpu", "--data-dir", str(tmp_path / "data"),
                          "--json", str(out), "--plot-dir", str(plots)]) == 0
    text, record = capsys.readouterr().out, json.loads(out.read_text())
    correct = round(record["accuracy"] * record["num_samples"] / 100)
    low, high = (100 * v for v in wilson_interval(correct, record["num_samples"]))
    assert record["interval_95"] == [round(low, 4), round(high, 4)] and low <= record["accuracy"] <= high
    assert f"[{low:.2f}, {high:.2f}] %" in text
    assert f"wrote {out}" in text and f"wrote the plots to {plots}/" in text and any(plots.iterdir())


# ----------------------------------------------------------------------------- 6. bad arguments

BAD_ARGS = [  # (stage, architecture, arguments)
    ("dfs", None, ["--minimum", "0"]), ("dfs", None, ["--minimum", "-5"]),
    ("dfs", None, ["--minimum", "101"]), ("dfs", None, ["--minimum", "nan"]),
    ("dfs", None, ["--minimum", "inf"]), ("dfs", None, ["--options", "skip,7x"]),
    ("dfs", None, ["--options", "skip,33"]), ("dfs", None, ["--options", "skip,0"]),
    ("dfs", None, ["--options", "skip,8,8"]), ("gate_init", None, ["--beta", "nan"]),
    ("base", "resnet21", []), ("gate_init", "resnet20", []), ("base", None, ["--dataset", "imagenet"]),
    ("base", None, ["--iters", "0"]), ("base", None, ["--batch-size", "0"]),
    ("base", None, ["--batch-size", "-1"]), ("base", None, ["--eval-every", "0"]),
    ("base", None, ["--lr", "-0.1"]), ("base", None, ["--lr", "nan"]), ("base", None, ["--momentum", "-1"]),
    ("base", None, ["--weight-decay", "-1e-4"]), ("base", None, ["--device", "nodevice"]),
]


@pytest.mark.parametrize("stage,arch,extra", BAD_ARGS,
                         ids=[f"{s} {a or ''} {' '.join(e)}" for s, a, e in BAD_ARGS])
def test_bad_arguments_are_usage_errors_and_write_nothing(stage, arch, extra, tmp_path, capsys):
    save = tmp_path / "save"
    argv = ["train", arch or ARCH[stage], "--dataset", "synthetic", "--device", "cpu",
            "--save-folder", str(save), "--data-dir", str(tmp_path / "data"), *extra]
    with pytest.raises(SystemExit) as exc:
        engine.main(STAGES[stage], argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # a syntax error that argparse refuses (a choice; "-1e-4" reads as a flag) or a value error: one line
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"\S+: error: .+ \(see --help\)", lines[0]) and "Traceback" not in err
    assert not save.exists() and not (tmp_path / "data").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        engine.main(STAGES["base"], ["train", "resnet20", "--dataset", "synthetic", "--device", "cuda",
                                     "--save-folder", str(tmp_path / "save")])
    assert exc.value.code == 2 and "--device" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "save").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_visible_devices_without_cuda_warns_once_and_runs_on_the_cpu(tmp_path, monkeypatch, capsys):
    """As scripts/*.sh on a machine whose GPU cannot be used: one warning line, then the CPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    argv = ["train", "resnet20", "--dataset", "synthetic", "--batch-size", "16", "--iters", "1",
            "--data-dir", str(tmp_path / "data"), "--save-folder", str(tmp_path / "save")]
    capsys.readouterr()
    assert engine.main(STAGES["base"], argv) == 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: CUDA_VISIBLE_DEVICES=0 is set but CUDA cannot be used")
    assert lines[0].endswith("running on the CPU") and "resnet20 on synthetic, cpu," in out
    assert engine.main(STAGES["base"], argv[:-4] + ["--device", "cpu", "--save-folder", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().err == ""  # asked for the CPU: nothing to warn about


@pytest.mark.parametrize("extra", [[], ["--val-size", "64"]], ids=["missing cifar10", "val-size too big"])
def test_a_missing_dataset_is_one_line_and_writes_nothing(extra, tmp_path, capsys):
    save, empty = tmp_path / "save", tmp_path / "empty"
    empty.mkdir()
    dataset = "synthetic" if extra else "cifar10"
    rc = engine.main(STAGES["base"], ["train", "resnet20", "--dataset", dataset, "--data-dir", str(empty),
                                      "--device", "cpu", "--save-folder", str(save), *extra])
    assert rc == 2
    one_line_error(capsys.readouterr().err, *([empty, "--download"] if not extra else ["val_size 64"]))
    assert not save.exists() and os.listdir(empty) == []


# ----------------------------------------------------------------------------- 7. odd but valid input

@pytest.mark.parametrize("stage", ["gate_init", "dfs"])
def test_a_batch_of_one_trains_and_evaluates(stage, start, tmp_path):
    save = tmp_path / "save"
    rc, steps = train(stage, save, start[stage] + ["--batch-size", "1"], iters=2)
    assert rc == 0 and [(s, n) for s, _, n in steps] == [(1, 1), (2, 1)]
    assert all(math.isfinite(loss) for _, loss, _ in steps)
    record = stage_records(save, stage)[-1]  # evaluated 40 images one at a time
    assert record["step"] == 2 and record["num_samples"] == TEST_SIZE and math.isfinite(record["loss"])
    assert sum(record["decision_distribution"][0]) == pytest.approx(1.0)


@pytest.mark.parametrize("stage,batch,sizes", [("base", 24, [24, 24, 16, 24]),
                                               ("dfs", 21, [21, 21, 21, 1, 21])])
def test_a_short_last_batch_trains(stage, batch, sizes, start, tmp_path):
    save = tmp_path / "save"
    rc, steps = train(stage, save, start[stage] + ["--batch-size", batch], iters=len(sizes))
    assert rc == 0 and [n for _, _, n in steps] == sizes
    assert all(math.isfinite(loss) for _, loss, _ in steps)
    assert load(latest(save, stage))["data_state"] == {"epoch": 1, "batch": 1}


def test_evaluation_does_not_depend_on_the_batch_size(parents, tmp_path):
    ckpt = load(parents["gate_init"])
    model = models.build_model(ckpt["arch"], ckpt["num_classes"], ckpt["options"])
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():  # a gate whose choices vary from image to image
        g = torch.Generator().manual_seed(0)
        model.gate.proj.weight.copy_(5 * torch.randn(model.gate.proj.weight.shape, generator=g))
    stats = {bs: evaluation.evaluate(model, data.test_batches("synthetic", tmp_path, bs)) for bs in (1, 7, TEST_SIZE)}
    whole = stats[TEST_SIZE]
    dist = torch.tensor(whole["decision_distribution"])
    assert whole["num_samples"] == TEST_SIZE and (dist.max(1).values < 1).any()  # not trivially equal
    for bs in (1, 7):
        for key in ("num_samples", "acc", "decision_distribution", "computation_percentage", "bitops_percentage"):
            assert stats[bs][key] == whole[key], (bs, key)
        for key in ("loss", "macs_per_image"):  # float32 sums of per-batch values
            assert stats[bs][key] == pytest.approx(whole[key], rel=1e-4), (bs, key)


# ----------------------------------------------------------------------------- 8. run folders

def run_folder(save, stage="base"):
    return Path(save) / ARCH[stage]


def temporary_files(folder):
    return [p for p in os.listdir(folder) if p.startswith(".tmp")]


def event_steps(folder, tag):
    """Steps of a TensorBoard scalar as TensorBoard shows them (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


@pytest.mark.parametrize("case", ["same stage", "another stage"])
def test_a_second_run_in_a_folder_refuses_and_leaves_the_first_untouched(case, parents, tmp_path, capsys):
    if case == "same stage":
        stage, save, start_from = "base", tmp_path / "save", []
        assert train(stage, save, ["--eval-every", "1"], iters=2)[0] == 0
        held, there = stage, "stage base"
    else:  # stage 3 into the folder of the stage-2 run it starts from (both save under dfs_resnet20/)
        stage, save = "dfs", tmp_path / "gate"
        shutil.copytree(parents["gate_init"].parent.parent, save)
        start_from, held, there = ["--resume", parents["gate_init"]], "gate_init", "stage gate_init"
    ckpt = load(latest(save, held))
    before = snapshot(save)
    capsys.readouterr()
    rc, steps = train(stage, save, start_from + ["--lr", "0.05"], iters=2)  # another --lr, no --resume
    assert rc == 2 and steps == []
    line = one_line_error(capsys.readouterr().err, there, f"iteration {ckpt['step']} of 2",
                          f"{ckpt['best_acc']:.2f}", f"--resume {latest(save, held)}", "--overwrite")
    assert "already holds" in line
    assert snapshot(save) == before  # bytes and times of every file


def test_overwrite_starts_over_with_exactly_one_run_and_moves_the_old_one_aside(tmp_path, capsys):
    save, folder = tmp_path / "save", run_folder(tmp_path / "save")
    assert train("base", save, ["--eval-every", "1", "--print-freq", "1"], iters=2)[0] == 0
    (folder / ".tmp-checkpoint_latest.pth.tar-left-by-a-killed-writer").write_bytes(b"PK")
    (folder / "notes.txt").write_text("mine")  # not a file of the run: it stays
    old = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name not in (".lock", "notes.txt")
           and not p.name.startswith(".tmp-")}
    capsys.readouterr()
    rc, steps = train("base", save, ["--overwrite", "--lr", "0.05", "--eval-every", "3"], iters=3)
    assert rc == 0 and [s for s, _, _ in steps] == [1, 2, 3]
    aside, = save.glob("resnet20.replaced-*")  # the finished run, whole: nothing was deleted
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == old and {"checkpoint_latest.pth.tar", "log.jsonl"} <= set(old)
    out = capsys.readouterr().out
    assert f"moved the run in {folder} (stage base, iteration 2 of 2" in out
    assert f") to {aside}; delete that folder when it is no longer needed" in out
    assert (folder / "notes.txt").read_text() == "mine"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1 and not temporary_files(folder)
    assert [r["step"] for r in stage_records(save, "base")] == [3]
    assert json.loads((folder / "args.json").read_text())["lr"] == 0.05
    assert load(latest(save, "base"))["step"] == 3 and load(best(save, "base"))["step"] == 3
    assert event_steps(folder, "test/acc") == [3]


def test_overwrite_cannot_continue_the_run_it_would_delete(tmp_path, capsys):
    save = tmp_path / "save"
    assert train("base", save, [], iters=1)[0] == 0
    before = snapshot(save)
    capsys.readouterr()
    rc, steps = train("base", save, ["--overwrite", "--resume", latest(save, "base")], iters=2)
    assert rc == 2 and steps == []
    one_line_error(capsys.readouterr().err, "--overwrite", "--resume")
    assert snapshot(save) == before


def test_a_second_process_on_a_live_run_folder_refuses_naming_it(tmp_path, monkeypatch, capsys):
    """A real training process holds its folder; any second run there refuses, until the holder dies."""
    save, folder = tmp_path / "save", run_folder(tmp_path / "save")
    options = ["--eval-every", "1", "--print-freq", "1"]
    cmd = [sys.executable, str(ROOT / "train_base.py"), "train", "resnet20", "--dataset", "synthetic",
           "--batch-size", "16", "--iters", "1000", "--device", "cpu", "--save-folder", str(save),
           "--data-dir", str(tmp_path / "data"), *options]
    holder = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=SUBPROCESS_ENV, cwd=tmp_path)
    monkeypatch.setattr(data, "SYNTHETIC_SIZES", (512, 256))  # the process's dataset
    try:
        read_until(holder, "eval iter 1:", timeout=300)  # minutes only on a crowded machine
        holder.send_signal(signal.SIGSTOP)  # frozen, it still holds the folder (and leaves the CPU to us)
        k = load(latest(save, "base"))["step"]
        for extra, iters in [([], 3), (["--overwrite"], 3), (["--resume", latest(save, "base")], k + 2),
                             (["--resume", latest(save, "base")], 1)]:  # the last: a finished run
            capsys.readouterr()
            rc, steps = train("base", save, options + extra, iters=iters)
            assert rc == 2 and steps == [], extra
            one_line_error(capsys.readouterr().err, folder, f"process {holder.pid}")
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own; the OS drops its lock
        holder.wait()
    k = load(latest(save, "base"))["step"]
    rc, steps = train("base", save, options + ["--resume", latest(save, "base")], iters=k + 1)
    assert rc == 0 and [s for s, _, _ in steps] == [k + 1] and not temporary_files(folder)


def fail_if_under(root, error):
    """os.mkdir that fails with `error` below `root`, as on a read-only or full filesystem."""
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(os.path.abspath(path)).is_relative_to(root):
            raise OSError(error, os.strerror(error), str(path))
        return real(path, *args, **kwargs)
    return mkdir


@pytest.mark.parametrize("case", ["a file in the way", "a file above it", "a read-only parent"])
def test_an_unusable_save_folder_is_one_line_and_status_2_before_training(case, tmp_path, monkeypatch, capsys):
    save = tmp_path / "save"
    if case == "a file in the way":
        save.write_text("not a folder")
        words = [save, "Not a directory"]
    elif case == "a file above it":
        (tmp_path / "file").write_text("not a folder")
        save = tmp_path / "file" / "save"
        words = [save, "Not a directory"]
    else:  # as root chmod does not stop writes; the real read-only mount is in the test below
        (tmp_path / "ro").mkdir()
        save = tmp_path / "ro" / "save"
        monkeypatch.setattr(os, "mkdir", fail_if_under(tmp_path / "ro", errno.EROFS))
        words = [save, "Read-only file system"]
    capsys.readouterr()
    rc, steps = train("base", save, [], iters=2)
    assert rc == 2 and steps == []
    one_line_error(capsys.readouterr().err, *words)
    assert not (tmp_path / "ro" / "save").exists()


class FullDisk:
    """Writes to files whose name contains `name` fail with ENOSPC while `full` (half the bytes land)."""

    def __init__(self, monkeypatch, name):
        self.name, self.full, self.failures = name, False, 0
        real_open, real_fdopen = builtins.open, os.fdopen

        def opened(f, path, mode):
            path = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else str(path)
            writing = any(c in mode for c in "wax+")
            return FailingFile(f, self) if self.full and writing and name in os.path.basename(path) else f

        def open_(file, mode="r", *args, **kwargs):
            return opened(real_open(file, mode, *args, **kwargs), file, mode)

        def fdopen(fd, mode="r", *args, **kwargs):
            return opened(real_fdopen(fd, mode, *args, **kwargs), fd, mode)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)  # TensorBoard's writer thread opens through io.open
        monkeypatch.setattr(os, "fdopen", fdopen)


class FailingFile:
    def __init__(self, f, disk):
        self._f, self._disk = f, disk

    def write(self, data):
        self._f.write(data[:len(data) // 2])
        self._f.flush()
        self._disk.failures += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("name", ["checkpoint_latest", "model_best", "log.jsonl", "events.out.tfevents",
                                  "args.json"])
def test_a_write_failure_is_one_line_with_status_4_and_the_run_continues(name, tmp_path, monkeypatch, capsys):
    """ENOSPC on each file a run writes: evaluations at 2, 4 (fails), then resume to 6."""
    save, folder = tmp_path / "save", run_folder(tmp_path / "save")
    scripted_evaluate(monkeypatch, [50.0 + i for i in range(6)])  # each better: model_best is written
    disk = FullDisk(monkeypatch, name)
    disk.full = name == "args.json"  # written before training; the others fail from iteration 3 on

    def hook(run, x):
        disk.full = disk.full or run.step + 1 >= 3
    command = ["--eval-every", "2", "--print-freq", "1"]
    capsys.readouterr()
    rc, steps = train("base", save, command, iters=6, hook=hook)
    err = capsys.readouterr().err
    assert disk.failures >= 1 and rc == 4
    line = one_line_error(err, folder, name, "No space left on device")
    assert not temporary_files(folder)
    if name == "args.json":
        assert steps == [] and not latest(save, "base").exists() and "run the same command again" in line
        resume = []
    else:  # TensorBoard's writes are asynchronous: its failure may surface at iteration 3 or 4
        assert [s for s, _, _ in steps][:3] == [1, 2, 3] and len(steps) <= 4
        assert f"the same command plus --resume {latest(save, 'base')}" in line
        # the previous checkpoint, intact; model_best is written first, so only a failed
        # checkpoint_latest leaves the (complete) model_best of iteration 4 beside it
        assert torch.load(latest(save, "base"), weights_only=True)["step"] == 2
        assert torch.load(best(save, "base"), weights_only=True)["step"] == (4 if name == "checkpoint_latest" else 2)
        resume = ["--resume", latest(save, "base")]
    disk.full = False  # space freed: continue as the message says
    capsys.readouterr()
    rc, steps = train("base", save, command + resume, iters=6)
    assert rc == 0 and capsys.readouterr().err == ""
    assert [s for s, _, _ in steps] == ([3, 4, 5, 6] if resume else [1, 2, 3, 4, 5, 6])
    assert [r["step"] for r in stage_records(save, "base")] == [2, 4, 6]  # each evaluation once
    assert event_steps(folder, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert event_steps(folder, "test/acc") == [2, 4, 6]


TMPFS = """
mount -t tmpfs -o size={size}k none "$FULL" && mount -t tmpfs -o ro,size=64k none "$READONLY" || exit 99
"$PY" "$ROOT/train_base.py" "$@" --save-folder "$FULL/save" >"$OUT/full.out" 2>"$OUT/full.err"
echo $? >"$OUT/full.rc"
cp -a "$FULL/save" "$OUT/save"
"$PY" "$ROOT/train_base.py" "$@" --save-folder "$READONLY/save" >"$OUT/ro.out" 2>"$OUT/ro.err"
echo $? >"$OUT/ro.rc"
"""


def test_a_real_full_and_a_real_read_only_filesystem(tmp_path, monkeypatch, capsys):
    """A tmpfs with room for two checkpoints (model_best and checkpoint_latest at iteration 2) fills up
    at the next save; a read-only tmpfs refuses the run folder. Needs mount rights (root, or a user
    namespace) and is skipped without them."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) to mount a small tmpfs")
    full, readonly, out = tmp_path / "full", tmp_path / "readonly", tmp_path / "out"
    for d in (full, readonly, out):
        d.mkdir()
    size = 5632  # KiB: a resnet20 checkpoint with momentum is ~2.2 MB; two fit, a third's temp file not
    args = ["train", "resnet20", "--dataset", "synthetic", "--batch-size", "16", "--device", "cpu",
            "--val-size", "448", "--iters", "6", "--eval-every", "2", "--data-dir", str(tmp_path / "data")]
    env = dict(SUBPROCESS_ENV, FULL=str(full), READONLY=str(readonly), OUT=str(out), PY=sys.executable,
               ROOT=str(ROOT))
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        TMPFS.format(size=size), "sh", *args], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0 or not (out / "full.rc").exists():
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")
    folder, mounted = out / "save" / "resnet20", full / "save" / "resnet20"
    assert (out / "full.rc").read_text().strip() == "4", (out / "full.err").read_text()
    line = one_line_error((out / "full.err").read_text(), mounted, "pth.tar", "No space left on device",
                          f"--resume {mounted / 'checkpoint_latest.pth.tar'}")
    assert "Traceback" not in line and not temporary_files(folder)
    assert torch.load(folder / "checkpoint_latest.pth.tar", weights_only=True)["step"] == 2
    assert (out / "ro.rc").read_text().strip() == "2"
    one_line_error((out / "ro.err").read_text(), readonly / "save", "Read-only file system")
    # space freed (here: the run copied out of the tmpfs), the printed --resume continues it
    monkeypatch.setattr(data, "SYNTHETIC_SIZES", (512, 256))
    rc, steps = train("base", out / "save", ["--val-size", "448", "--eval-every", "2", "--resume",
                                             folder / "checkpoint_latest.pth.tar"], iters=6)
    assert rc == 0 and [s for s, _, _ in steps] == [3, 4, 5, 6]
    assert [r["step"] for r in stage_records(out / "save", "base")] == [2, 4, 6]


def test_a_resume_logs_each_step_once(tmp_path):
    """A process that died after logging iteration 4 but before saving it: resumed at 2, the log and
    TensorBoard show every iteration once."""
    save, folder = tmp_path / "save", run_folder(tmp_path / "save")
    command = ["--eval-every", "2", "--print-freq", "1"]
    assert train("base", save, command, iters=2)[0] == 0
    at_two = latest(save, "base").read_bytes()
    assert train("base", save, command + ["--resume", latest(save, "base")], iters=4)[0] == 0
    latest(save, "base").write_bytes(at_two)  # the save at iteration 4 never happened
    rc, steps = train("base", save, command + ["--resume", latest(save, "base")], iters=6)
    assert rc == 0 and [s for s, _, _ in steps] == [3, 4, 5, 6]
    assert [r["step"] for r in stage_records(save, "base")] == [2, 4, 6]
    assert event_steps(folder, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert event_steps(folder, "test/acc") == [2, 4, 6]


RUN_SETTINGS = [  # (flag and the value given on resume, the run's value as the error shows it)
    (["--dataset", "fashion-mnist"], "synthetic"), (["--val-size", "8"], "0"), (["--batch-size", "8"], "16"),
    (["--seed", "1"], "0"), (["--stochastic-act-rounding"], "off"), (["--lr", "0.5"], "0.01"),
    (["--beta", "0.001"], "1e-05"), (["--lr-steps", "1"], "32000 48000"),
]


@pytest.mark.parametrize("given,saved", RUN_SETTINGS, ids=[g[0] for g, _ in RUN_SETTINGS])
def test_resume_refuses_a_setting_that_differs_from_the_run(given, saved, parents, tmp_path, capsys):
    save = tmp_path / "save"
    capsys.readouterr()
    rc, steps = train("gate_init", save, ["--resume", parents["gate_init"], *given], iters=4, settings=False)
    assert rc == 2 and steps == []
    line = one_line_error(capsys.readouterr().err, parents["gate_init"], given[0], saved)
    assert len(given) == 1 or given[1] in line
    assert not save.exists()


def test_resume_takes_the_settings_it_is_not_given_from_the_run(tmp_path):
    save = tmp_path / "save"
    first = ["--batch-size", "8", "--seed", "3", "--val-size", "16", "--lr", "0.05", "--momentum", "0.5",
             "--lr-steps", "3", "--eval-every", "2"]
    rc, steps = train("base", save, ["--dataset", "synthetic", *first], iters=2, settings=False)
    assert rc == 0 and [n for _, _, n in steps] == [8, 8]
    saved = load(latest(save, "base"))["args"]
    # neither --dataset nor --batch-size, and the same --seed given explicitly: both are fine
    rc, steps = train("base", save, ["--seed", "3", "--resume", latest(save, "base")], iters=4, settings=False)
    assert rc == 0 and [(s, n) for s, _, n in steps] == [(3, 8), (4, 8)]
    now = load(latest(save, "base"))["args"]
    for name in ("dataset", "batch_size", "seed", "val_size", "lr", "momentum", "lr_steps"):
        assert now[name] == saved[name], name
    assert [r["split"] for r in stage_records(save, "base")] == ["val", "val"]


def test_the_interrupt_message_says_how_to_continue_from_the_command_as_typed(tmp_path):
    folder = tmp_path / "run"
    latest_path = str(folder / "checkpoint_latest.pth.tar")
    assert engine.continue_with("", str(folder)).endswith(f"Continue with the same command plus --resume {latest_path}")
    assert engine.continue_with(latest_path, str(folder)).endswith("Continue with the same command")  # already there
    other = str(tmp_path / "parent.pth")
    assert engine.continue_with(other, str(folder)).endswith(
        f"the same command, --resume {latest_path} in place of --resume {other}")


def test_the_test_command_takes_the_checkpoints_data_set(parents, tmp_path, monkeypatch, capsys):
    """Before: `test` defaulted to cifar10 whatever the checkpoint was trained on."""
    argv = ["test", "resnet20", "--device", "cpu", "--data-dir", str(tmp_path / "data"), "--resume", str(parents["base"])]
    capsys.readouterr()
    assert engine.main(STAGES["base"], argv) == 0  # synthetic, from the checkpoint
    out = capsys.readouterr().out
    # as eval.py: the checkpoint, the network and the data set, the figures and the interval
    assert out.startswith(f"== {parents['base']} (resnet20, synthetic)\n") and "top-1" in out
    low, high = map(float, re.search(r"95 % interval of the top-1 \(Wilson score on the \d+ test images\): "
                                     r"\[([\d.]+), ([\d.]+)\] %", out).groups())
    acc = float(re.search(r"top-1[^\d]*([\d.]+)", out).group(1))
    assert low < acc < high
    released = ROOT / "results" / "fashion-mnist" / "checkpoints" / "dfs_cp20_s0.pth"
    asked = []

    def no_data(dataset, *args, **kwargs):  # the data set it looks for, without the 20 s evaluation
        asked.append(dataset)
        raise data.DatasetError(f"{dataset}: not loaded in this test")
    monkeypatch.setattr(data, "test_batches", no_data)
    rc = engine.main(STAGES["dfs"], ["test", "dfs_resnet20", "--device", "cpu", "--resume", str(released)])
    assert rc == 2 and asked == ["fashion-mnist"]
    one_line_error(capsys.readouterr().err, "fashion-mnist")


def test_eval_creates_the_folders_of_its_outputs(parents, tmp_path):
    out, plots = tmp_path / "new" / "deeper" / "r.json", tmp_path / "plots" / "here"
    assert eval_cli.main([str(parents["gate_init"]), "--device", "cpu", "--data-dir", str(tmp_path / "data"),
                          "--json", str(out), "--plot-dir", str(plots)]) == 0
    assert json.loads(out.read_text())["checkpoint"] == str(parents["gate_init"])
    assert (plots / "accuracy_vs_computation.png").is_file()


@pytest.mark.parametrize("flag", ["--json", "--plot-dir"])
def test_eval_refuses_an_output_it_cannot_write_before_evaluating(flag, parents, tmp_path, monkeypatch, capsys):
    folder, file = tmp_path / "a folder", tmp_path / "a file"
    folder.mkdir()
    file.write_text("x")
    evaluated = []
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a: evaluated.append(a))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        eval_cli.main([str(parents["gate_init"]), "--device", "cpu", "--data-dir", str(tmp_path / "data"),
                       flag, str(folder if flag == "--json" else file)])
    assert exc.value.code == 2 and evaluated == []
    err = capsys.readouterr().err
    assert "Traceback" not in err and flag in err.strip().splitlines()[-1]
