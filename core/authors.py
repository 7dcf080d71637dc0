"""Checkpoints of the authors' released code (Torment123/DFS), read into this project's format.

Their files hold {'iter', 'arch', 'state_dict', 'best_prec1'}, the state dict saved through
DataParallel ('module.' prefix) with their module names. Every one of their keys is either mapped
to ours or unused by design (listed in UNUSED); anything else, or a key we need that is missing,
is refused in one line. The mapping, for n blocks per group and block b = (G-1)n + I:

    conv1.weight, bn1.*, fc.*                          -> the same names
    group{G}_layer{I}.{conv1,bn1,conv2,bn2}.*          -> blocks.{b}.{conv1,bn1,conv2,bn2}.*
    ....conv{1,2}.quantize_input.running_{min,max} (1,) -> blocks.{b}.conv{1,2}.running_{min,max} ()
    group{G}_layer0.downsample.* (G = 2, 3)            -> blocks.{b}.shortcut_conv.*
    group{G}_layer0.bn3.* (G = 2, 3)                   -> blocks.{b}.shortcut_bn.*
    group{G}_gate{I}.1.{weight,bias} (b < 3n - 1)      -> gate_embeds.{b}.conv.{weight,bias}
    control.rnn_one.{weight,bias}_{ih,hh}_l0           -> gate.lstm.{weight,bias}_{ih,hh} (one LSTM step = LSTMCell)
    control.proj.*                                     -> gate.proj.* (their 7 options: skip, 8..16, full)

A plain backbone becomes a stage-1 ('base') checkpoint; a gated one a stage-2 ('gate_init')
checkpoint, so that eval.py evaluates it and train_dfs.py --resume starts stage 3 from it (their
file has no optimizer or data state, so their run cannot be continued step for step).
"""
import re

import torch

ARCH = re.compile(r"^(cifar10|cifar100|svhn)_(resnet|rnn_gate)_(\d+)$")
CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10}
# Unused by design, each for a stated reason:
UNUSED = (
    (re.compile(r"^conv1\.quantize_input\.running_(min|max)$"), "the stem always runs at full precision"),
    (re.compile(r"^group\d+_layer\d+\.bn3\..*$"), "bn3 of a block without a projection is never run"),
    (re.compile(r"^group[23]_(ds|bn)0\..*$"), "group*_ds0 / group*_bn0 are the same modules as layer0's downsample / bn3"),
    (re.compile(r"^group3_gate(\d+)\.1\.(weight|bias)$"), "the last block's gate embedding decides nothing"),
)


def is_authors(ckpt):
    """Whether a loaded object is a checkpoint of the authors' code."""
    return isinstance(ckpt, dict) and {"arch", "state_dict"} <= set(ckpt) and isinstance(ckpt.get("arch"), str) \
        and ARCH.match(ckpt["arch"]) is not None and "model" not in ckpt


def key_map(n, gated):
    """{their key (without 'module.'): our key} for n blocks per group."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    conv = lambda theirs, ours: {f"{theirs}.weight": f"{ours}.weight",  # noqa: E731
                                 **{f"{theirs}.quantize_input.running_{m}": f"{ours}.running_{m}" for m in ("min", "max")}}
    mapping = {"conv1.weight": "conv1.weight", "fc.weight": "fc.weight", "fc.bias": "fc.bias",
               **{f"bn1.{k}": f"bn1.{k}" for k in bn}}
    for g in (1, 2, 3):
        for i in range(n):
            b, theirs = (g - 1) * n + i, f"group{g}_layer{i}"
            mapping.update(conv(f"{theirs}.conv1", f"blocks.{b}.conv1"))
            mapping.update(conv(f"{theirs}.conv2", f"blocks.{b}.conv2"))
            for k in bn:
                mapping[f"{theirs}.bn1.{k}"] = f"blocks.{b}.bn1.{k}"
                mapping[f"{theirs}.bn2.{k}"] = f"blocks.{b}.bn2.{k}"
            if g > 1 and i == 0:
                mapping.update(conv(f"{theirs}.downsample", f"blocks.{b}.shortcut_conv"))
                mapping.update({f"{theirs}.bn3.{k}": f"blocks.{b}.shortcut_bn.{k}" for k in bn})
            if gated and b < 3 * n - 1:
                mapping.update({f"group{g}_gate{i}.1.{k}": f"gate_embeds.{b}.conv.{k}" for k in ("weight", "bias")})
    if gated:
        mapping.update({f"control.rnn_one.{w}_{d}_l0": f"gate.lstm.{w}_{d}" for w in ("weight", "bias") for d in ("ih", "hh")})
        mapping.update({f"control.proj.{k}": f"gate.proj.{k}" for k in ("weight", "bias")})
    return mapping


def unused_reason(key, mapping):
    for pattern, reason in UNUSED:
        if pattern.match(key) and key not in mapping:
            return reason
    return None


def convert(raw, path):
    """Our checkpoint dict from the authors' `raw`; ValueError names what does not fit. Also returns
    the one-line account of the import."""
    kind, depth = ARCH.match(raw["arch"]).group(2, 3)
    depth = 32 if depth == "31" else int(depth)  # their ResNet-32 is called 31
    gated, n = kind == "rnn_gate", (depth - 2) // 6
    state = {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}
    mapping = key_map(n, gated)
    unknown = [k for k in state if k not in mapping and unused_reason(k, mapping) is None]
    if unknown:
        raise ValueError(f"{path} has keys the authors' {raw['arch']} does not: {', '.join(sorted(unknown)[:3])}")
    missing = [k for k in mapping if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path} lacks keys of the authors' {raw['arch']}: {', '.join(missing[:3])}")
    model = {ours: state[theirs].reshape(()) if "quantize_input" in theirs else state[theirs]
             for theirs, ours in mapping.items() if theirs in state}
    for theirs, ours in mapping.items():  # absent before PyTorch 0.4.1
        if theirs not in state:
            model[ours] = torch.zeros((), dtype=torch.long)
    num_classes = CLASSES[ARCH.match(raw["arch"]).group(1)]
    name = f"{'dfs_resnet' if gated else 'resnet'}{depth}"
    options = ["skip", 8, 10, 12, 14, 16, "full"] if gated else None
    best = raw.get("best_prec1")
    best = float(best) if best is not None else float("-inf")
    unused = len(state) - len([k for k in mapping if k in state])
    note = (f"imported the authors' {raw['arch']} checkpoint {path} (iteration {raw.get('iter', '?')}, best {best:.2f} %): "
            f"{len(state) - unused} keys mapped, {unused} unused by design (duplicates, unused bn3 and last gate, stem ranges)")
    return {"model": model, "stage": "gate_init" if gated else "base", "arch": name, "num_classes": num_classes,
            "step": int(raw.get("iter", 0) or 0), "best_acc": best, "options": options, "args": {},
            "model_config": {"name": name, "num_classes": num_classes, "options": options,
                             "stochastic_act_rounding": False, "policy": None},
            "imported_from": {"path": str(path), "arch": raw["arch"], "iter": raw.get("iter")}}, note
