"""Checkpoints of the authors' released code (Torment123/DFS) load wherever ours do.

`their_checkpoint` writes a file in their exact layout, built the way their `_make_group` names
modules (not through authors.key_map): DataParallel's 'module.' prefix, group{G}_layer{I}, bn3 on
every block, the projection under two names, a gate embedding for every block, control.rnn_one
(an nn.LSTM) and control.proj, (1,)-shaped quantizer buffers, and {'iter', 'arch', 'state_dict',
'best_prec1'} around it.
"""
import json

import pytest
import torch

import eval as eval_script
import train_dfs
import train_gate_init
from core import engine
from core.checkpoint import CheckpointError, load_checkpoint
from core.evaluation import model_config, model_from_config
from helpers import images, randomize_bn, small_synthetic, spread_gate
from models import build_model


def their_state(model, gated, seed=0, batches_tracked=True):
    """The state dict their code would save for the same weights (random where they have more)."""
    g = torch.Generator().manual_seed(seed)
    ours, n = model.state_dict(), len(model.blocks) // 3
    out = {}

    def bn(theirs, prefix=None):
        c = ours["bn1.weight"].numel() if prefix is None else None
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{theirs}.{k}"] = ours[f"{prefix}.{k}"] if prefix else torch.rand(c, generator=g)
        if batches_tracked:
            out[f"{theirs}.num_batches_tracked"] = ours[f"{prefix}.num_batches_tracked"] if prefix else torch.tensor(7)

    def qconv(theirs, prefix, ranges=True):
        out[f"{theirs}.weight"] = ours[f"{prefix}.weight"]
        for m in ("min", "max"):
            out[f"{theirs}.quantize_input.running_{m}"] = \
                ours[f"{prefix}.running_{m}"].reshape(1) if ranges else torch.zeros(1)

    qconv("conv1", "conv1", ranges=False)  # our stem is a plain conv
    bn("bn1", "bn1")
    for group in (1, 2, 3):
        for i in range(n):
            b = (group - 1) * n + i
            layer = f"group{group}_layer{i}"
            qconv(f"{layer}.conv1", f"blocks.{b}.conv1")
            bn(f"{layer}.bn1", f"blocks.{b}.bn1")
            qconv(f"{layer}.conv2", f"blocks.{b}.conv2")
            bn(f"{layer}.bn2", f"blocks.{b}.bn2")
            projection = group > 1 and i == 0
            if projection:
                qconv(f"{layer}.downsample", f"blocks.{b}.shortcut_conv")
                bn(f"{layer}.bn3", f"blocks.{b}.shortcut_bn")
                if gated:  # the same modules, registered a second time
                    qconv(f"group{group}_ds0", f"blocks.{b}.shortcut_conv")
                    bn(f"group{group}_bn0", f"blocks.{b}.shortcut_bn")
            else:
                out[f"{layer}.bn3.weight"] = ours[f"blocks.{b}.bn2.weight"].clone()  # made, never run
                for k in ("bias", "running_mean", "running_var"):
                    out[f"{layer}.bn3.{k}"] = torch.rand(ours[f"blocks.{b}.bn2.weight"].shape, generator=g)
                if batches_tracked:
                    out[f"{layer}.bn3.num_batches_tracked"] = torch.tensor(0)
            if gated:
                last = b == 3 * n - 1
                c = ours[f"blocks.{b}.conv2.weight"].shape[0]
                out[f"group{group}_gate{i}.1.weight"] = torch.randn(10, c, 1, 1, generator=g) if last else \
                    ours[f"gate_embeds.{b}.conv.weight"]
                out[f"group{group}_gate{i}.1.bias"] = torch.randn(10, generator=g) if last else \
                    ours[f"gate_embeds.{b}.conv.bias"]
    if gated:
        for w in ("weight", "bias"):
            for d in ("ih", "hh"):
                out[f"control.rnn_one.{w}_{d}_l0"] = ours[f"gate.lstm.{w}_{d}"]
            out[f"control.proj.{w}"] = ours[f"gate.proj.{w}"]
    out["fc.weight"], out["fc.bias"] = ours["fc.weight"], ours["fc.bias"]
    return {f"module.{k}": v for k, v in out.items()}


def their_checkpoint(path, model, arch, gated, **kwargs):
    torch.save({"iter": 2000, "arch": arch, "state_dict": their_state(model, gated, **kwargs), "best_prec1": 91.5}, path)
    return str(path)


def trained_dfs(depth):
    """A DFS network with non-trivial BN, activation ranges and a gate that spreads, in eval mode."""
    torch.manual_seed(depth)
    model = build_model(f"dfs_resnet{depth}")
    for seed in range(2):
        model(images(4, seed=10 + seed))
    randomize_bn(model)
    spread_gate(model)
    return model.eval()


@pytest.mark.parametrize("depth", [38, 74])
def test_their_gated_checkpoint_evaluates_as_the_same_weights_loaded_natively(depth, tmp_path, capsys):
    model = trained_dfs(depth)
    path = their_checkpoint(tmp_path / "checkpoint_latest.pth.tar", model, f"cifar10_rnn_gate_{depth}", gated=True)
    ckpt = load_checkpoint(path)
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "imported the authors' cifar10_rnn_gate_" in note[0] and "unused by design" in note[0]
    assert ckpt["stage"] == "gate_init" and ckpt["arch"] == f"dfs_resnet{depth}" and ckpt["step"] == 2000
    imported = model_from_config(model_config(ckpt))
    imported.load_state_dict(ckpt["model"])
    imported.eval()
    x = images(8, seed=3)
    with torch.no_grad():
        ours, theirs = model(x), imported(x)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert len(torch.unique(ours[1].argmax(2))) > 1  # the gate's decisions were exercised


@pytest.mark.parametrize("depth", [38, 74])
def test_their_backbone_maps_every_key(depth, tmp_path):
    model = build_model(f"resnet{depth}", 100)
    randomize_bn(model)
    path = their_checkpoint(tmp_path / "model_best.pth.tar", model, f"cifar100_resnet_{depth}", gated=False,
                            batches_tracked=False)  # PyTorch 0.4.0 saved no num_batches_tracked
    ckpt = load_checkpoint(path)
    assert ckpt["stage"] == "base" and ckpt["num_classes"] == 100
    ours = model.state_dict()
    assert set(ckpt["model"]) == set(ours)
    for k, v in ours.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(ckpt["model"][k], v), k


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_a_key_missing_or_extra_is_refused_in_one_line(change, tmp_path, capsys):
    model = build_model("resnet20")
    state = their_state(model, gated=False)
    if change == "missing":
        del state["module.group2_layer1.conv2.weight"]
    else:
        state["module.group2_layer1.conv3.weight"] = torch.zeros(1)
    path = tmp_path / "theirs.pth.tar"
    torch.save({"iter": 5, "arch": "cifar10_resnet_20", "state_dict": state, "best_prec1": 50.0}, path)
    with pytest.raises(CheckpointError, match="lacks keys" if change == "missing" else "has keys") as e:
        load_checkpoint(str(path))
    assert "group2_layer1.conv" in str(e.value) and "\n" not in str(e.value)
    rc = eval_script.main([str(path), "--dataset", "synthetic", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")


def test_their_checkpoints_run_through_our_stages_and_eval(tmp_path, capsys):
    """Their stage-1 backbone starts our stage 2; their gated checkpoint evaluates and starts stage 3."""
    common = ["--dataset", "synthetic", "--device", "cpu", "--batch-size", "16", "--iters", "1", "--print-freq", "1"]
    with small_synthetic(64, 32):
        backbone = their_checkpoint(tmp_path / "backbone.pth.tar", build_model("resnet20"), "cifar10_resnet_20", gated=False)
        assert engine.main(train_gate_init.STAGE, ["train", "cifar10_rnn_gate_20", *common, "--resume", backbone,
                                                   "--save-folder", str(tmp_path / "full")]) == 0
        gated = their_checkpoint(tmp_path / "gated.pth.tar", trained_dfs(20), "cifar10_rnn_gate_20", gated=True)
        out = tmp_path / "r.json"
        assert eval_script.main([gated, "--dataset", "synthetic", "--device", "cpu", "--json", str(out)]) == 0
        assert json.loads(out.read_text())["option_names"][-1] == "full"
        assert engine.main(train_dfs.STAGE, ["train", "cifar10_rnn_gate_20", *common, "--resume", gated,
                                             "--save-folder", str(tmp_path / "dfs")]) == 0
    assert (tmp_path / "dfs" / "cifar10_rnn_gate_20" / "checkpoint_latest.pth.tar").is_file()
    assert "imported the authors' cifar10_resnet_20" in capsys.readouterr().err
