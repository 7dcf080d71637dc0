"""Test scaffolding for tests/test_distributed.py, run there as
`torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT PARENT` (gloo, CPU).

Both processes do, writing what the test checks into OUT:
1. gradients: one DDP training step through engine.train_step of stage 1 and of stage 3 (a
   target above and one below the global computation percentage); each process saves its
   gradients, and the test compares them with one process's over the two half-batches.
2. stages, through engine.main (all that train_*.py do): stage 2 from PARENT (a two-process
   stage-1 checkpoint); stage 3 for 4 iterations straight; stage 3 again with a SIGTERM to
   process 1 alone during iteration 2, then resumed to 4; a run whose loss turns NaN on
   process 1 only.
3. evaluation: eval.main on the stage-2 checkpoint with a gate that varies its choices.
Unlike a test module, this file is not collected by pytest (its name has no test_ prefix).
"""
import argparse
import json
import os
import signal
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_base  # noqa: E402
import train_dfs  # noqa: E402
import train_gate_init  # noqa: E402
from core import checkpoint, distributed, engine  # noqa: E402
from models import build_model  # noqa: E402

eval_cli = __import__("eval")  # eval.py, not the builtin

GLOBAL_BATCH, BETA, OPTIONS = 16, 0.05, ("skip", 8, "full")
TRAIN_STEP = engine.train_step


def build(name, bn=None):
    """The model of a gradient case; a gated one's gate varies its choices from image to image."""
    torch.manual_seed(0)
    model = build_model(name, options=OPTIONS, bn=bn) if name.startswith("dfs_") else build_model(name)
    if name.startswith("dfs_"):
        vary_gate(model)
    return model


def vary_gate(model, seed=7):
    """Large random gate output weights, so that images choose different options.

    With seed 7 the two half-batches of `global_batch` mix all three options and come out at
    computation percentages 45.7 and 47.3 in the gradient cases.
    """
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.gate.proj.weight.copy_(5 * torch.randn(model.gate.proj.weight.shape, generator=g))


def global_batch():
    """The global batch of the gradient cases: images with per-image scales, and labels."""
    g = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.5, 2.0, GLOBAL_BATCH).view(-1, 1, 1, 1)
    return torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g) * scale, torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def half(t, rank):
    return t.chunk(2)[rank]


def ddp_gradients(name, stage, target=None, bn=None):
    """This process's gradients after one engine.train_step on its half of the global batch."""
    model = build(name, bn)
    for p in getattr(model, "unused_parameters", list)():  # as engine.run_stage: per-option BN's shared bn1/bn2
        p.requires_grad_(False)
    args = argparse.Namespace(target_cp=target, cost_weight=BETA, execution="dynamic")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    run = engine.Run(stage, args, model, optimizer, None, None)
    x, y = global_batch()
    loss, _, _, cp = engine.train_step(run, stage.make_loss(args), half(x, distributed.rank()), half(y, distributed.rank()))
    return {"grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "loss": loss.item(), "cp": None if cp is None else cp.item(), "target": target}


def gradients(out):
    """Part 1; the targets sit at 1/4 and 3/4 between the two halves' computation percentages."""
    x, _ = global_batch()

    def halves(bn=None):
        probe = build("dfs_resnet20", bn)
        with torch.no_grad():
            local = probe.computation_percentage(probe(half(x, distributed.rank()))[1]).item()
        lo, hi = sorted(distributed.all_gather(local))
        assert hi > lo, f"the halves' computation percentages {lo}, {hi} do not differ: change vary_gate's seed"
        return lo, hi
    lo, hi = halves()
    cases = {"base": ddp_gradients("resnet20", train_base.STAGE),
             "dfs above target": ddp_gradients("dfs_resnet20", train_dfs.STAGE, lo + (hi - lo) / 4),
             "dfs below target": ddp_gradients("dfs_resnet20", train_dfs.STAGE, lo + 3 * (hi - lo) / 4)}
    lo, hi = halves("per-option")
    cases["dfs per-option BN"] = ddp_gradients("dfs_resnet20", train_dfs.STAGE, lo + (hi - lo) / 4, "per-option")
    torch.save(cases, os.path.join(out, f"gradients-{distributed.rank()}.pt"))


def signal_on_process_1(iteration):
    """train_step wrapper: process 1 alone gets SIGTERM during `iteration`."""
    def step(run, loss_fn, x, y):
        if run.step + 1 == iteration and distributed.rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return TRAIN_STEP(run, loss_fn, x, y)
    return step


def nan_on_process_1(run, loss_fn, x, y):
    """train_step with a NaN in process 1's images."""
    if distributed.rank() == 1:
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
    return TRAIN_STEP(run, loss_fn, x, y)


def stages(out, parent):
    """Part 2; returns the exit status of each run."""
    common = ["--dataset", "synthetic", "--device", "cpu", "--data-dir", os.path.join(out, "data"),
              "--val-size", "32", "--print-freq", "1"]
    rc = {"gate_init": engine.main(train_gate_init.STAGE, [
        "train", "dfs_resnet20", *common, "--batch-size", "16", "--iters", "2", "--options", "skip,8,full",
        "--resume", parent, "--save-folder", os.path.join(out, "gate_init")])}
    # 15 images over 2 processes: slices of 7 and 8, so their random streams differ (dithered rounding)
    dfs = ["train", "dfs_resnet20", *common, "--batch-size", "15", "--eval-every", "2", "--beta", "1e-3",
           "--stochastic-act-rounding", "--iters", "4",
           "--resume", os.path.join(out, "gate_init", "dfs_resnet20", "checkpoint_latest.pth.tar")]
    rc["straight"] = engine.main(train_dfs.STAGE, dfs + ["--save-folder", os.path.join(out, "straight")])
    split = os.path.join(out, "split")
    engine.train_step = signal_on_process_1(2)
    rc["interrupted"] = engine.main(train_dfs.STAGE, dfs + ["--save-folder", split])
    engine.train_step = TRAIN_STEP
    rc["resumed"] = engine.main(train_dfs.STAGE, dfs + ["--save-folder", split, "--resume",
                                                        os.path.join(split, "dfs_resnet20", "checkpoint_latest.pth.tar")])
    engine.train_step = nan_on_process_1
    rc["nan"] = engine.main(train_dfs.STAGE, dfs + ["--save-folder", os.path.join(out, "nan")])
    engine.train_step = TRAIN_STEP
    return rc


def evaluation(out):
    """Part 3: stage 2's checkpoint with a varied gate, evaluated by eval.py in two processes.

    (Not a stage-3 one: with --stochastic-act-rounding evaluation draws random dither, so its
    figures depend on the random stream, and thus on how the batches are shared out.)
    """
    varied = os.path.join(out, "varied.pth.tar")
    if distributed.is_main():
        ckpt = checkpoint.load_checkpoint(os.path.join(out, "gate_init", "dfs_resnet20", "checkpoint_latest.pth.tar"))
        model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["options"])
        model.load_state_dict(ckpt["model"])
        vary_gate(model)
        checkpoint.save_checkpoint(dict(ckpt, model=model.state_dict()), varied)
    distributed.barrier()
    return eval_cli.main([varied, "--device", "cpu", "--batch-size", "24", "--data-dir", os.path.join(out, "data"),
                          "--json", os.path.join(out, "eval-2.json")])


if __name__ == "__main__":
    out, parent = sys.argv[1:3]
    parts = sys.argv[3].split(",") if len(sys.argv) > 3 else ["gradients", "stages", "evaluation"]  # for debugging
    # One process group for everything: engine.main and eval.main keep a group they did not join
    distributed.init("cpu")
    rc = {}
    if "gradients" in parts:
        gradients(out)
    if "stages" in parts:
        rc.update(stages(out, parent))
    if "evaluation" in parts:
        rc["eval"] = evaluation(out)
    with open(os.path.join(out, f"status-{distributed.rank()}.json"), "w") as f:
        json.dump(rc, f)
    distributed.shutdown()
    # Everything the tests read is written and the group is left. Skip the interpreter's teardown: under
    # load it once aborted here ("terminate called without an active exception", SIGABRT) after the
    # deliberate NaN run, whose DDP forward was never followed by a backward, so a 0 from this process
    # would have turned into a failed launch. The C++ teardown of gloo's threads at interpreter exit is
    # a known source of such aborts (pytorch/pytorch#179291); it checks nothing this test asserts.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
