"""torch.hub entry points: every architecture, and every released checkpoint by name (docs/model_zoo.md).

    torch.hub.load("path/to/repository", "dfs_cp20_s0", source="local")          # released weights, eval mode
    torch.hub.load("path/to/repository", "dfs_resnet38", source="local", num_classes=100, options="paper")
    prep = torch.hub.load("path/to/repository", "transform", source="local")     # raw uint8 images -> input

A gated model (dfs_*) returns (logits [N, classes], decisions [N, gated blocks, options], one-hot);
a plain ResNet returns logits. Every model takes float [N, 3, 32, 32] images normalised as its data
set: `transform(dataset)` makes that from raw uint8 images (Fashion-MNIST's [N, 1, 28, 28] included).

An architecture's entry point takes num_classes, options and the other arguments of
models.build_model. A checkpoint's entry point (one per row of docs/model_zoo.json) reads its file
from this repository with weights only (core.evaluation.load_model, after checking the file's sha256) and
returns the model on `device` in eval mode; pretrained=False gives the same network untrained.
"""
import functools as _functools
import hashlib as _hashlib
import json as _json
import os as _os

import data as _data
import models as _models
from core import evaluation as _evaluation
from core.checkpoint import load_checkpoint as _load_checkpoint

dependencies = ["torch"]

_ROOT = _os.path.dirname(_os.path.abspath(__file__))


_INPUT = "Input: float [N, 3, 32, 32], normalised as its data set (transform(dataset) makes it from uint8 images)."


def _output(arch):
    if arch.startswith("dfs_") or "_rnn_gate_" in arch:
        return "Returns (logits [N, classes], decisions [N, gated blocks, options], one-hot)."
    return "Returns logits [N, classes]."


def transform(dataset="fashion-mnist"):
    """The released weights' input recipe as a function: raw uint8 images ([N, 1, 28, 28], [N, 28, 28] or [N, 3, 32, 32]) -> float [N, 3, 32, 32] exactly as the evaluation pipeline makes them (28 x 28 zero-padded to 32, grey repeated over 3 channels, x / 255 normalised with the data set's mean and std); dataset: fashion-mnist (the released weights), cifar10, cifar100, ...; use: logits, decisions = model(transform()(images))."""  # noqa: E501
    if dataset not in _data.MEAN_STD:
        raise ValueError(f"unknown dataset {dataset!r}; one of {', '.join(_data.DATASETS)}")
    return _functools.partial(_data.preprocess, dataset=dataset)


def _architecture(name):
    def entry(num_classes=10, options=None, pretrained=False, **kwargs):
        if pretrained:
            raise ValueError(f"{name} has no weights of its own; load a released checkpoint by name "
                             "(docs/model_zoo.md)")
        return _models.build_model(name, num_classes, options, **kwargs)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{name}, untrained: build_model({name!r}, num_classes, options, **kwargs)"
                     + (" (options: skip, bitwidths, full; default: the released code's). " if name.startswith("dfs_")
                        else " (a plain CIFAR ResNet). ") + _output(name) + " " + _INPUT)
    return entry


def _checkpoint(row):
    path = _os.path.join(_ROOT, row["file"])

    def entry(pretrained=True, device="cpu"):
        if not pretrained:
            return _evaluation.model_from_config(_evaluation.model_config(_load_checkpoint(path))).to(device).eval()
        with open(path, "rb") as f:
            if _hashlib.sha256(f.read()).hexdigest() != row["sha256"]:
                raise RuntimeError(f"{path} is not the released file (its sha256 differs from docs/model_zoo.json)")
        return _evaluation.load_model(path, device)[0].eval()
    t = row.get("test")
    figures = (f"test top-1 {t['top1']:.2f} % (95 % interval [{t['interval_95'][0]:.2f}, {t['interval_95'][1]:.2f}]) "
               f"at {t['computation_percentage']:.2f} % computation" if t else "a stage-2 gate, not evaluated on test")
    entry.__name__ = entry.__qualname__ = row["hub"]
    entry.__doc__ = (f"{row['arch']} on {row['dataset']}, options {', '.join(row['options'])}, {row['method']}: "
                     f"{figures} ({row['file']}). {_output(row['arch'])} Input: float [N, 3, 32, 32] normalised as "
                     f"{row['dataset']}; transform({row['dataset']!r}) makes it from raw uint8 images.")
    return entry


for _name in _models.MODELS:
    globals()[_name] = _architecture(_name)
with open(_os.path.join(_ROOT, "docs", "model_zoo.json")) as _f:
    for _row in _json.load(_f):
        globals()[_row["hub"]] = _checkpoint(_row)
