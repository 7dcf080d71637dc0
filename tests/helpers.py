"""Helpers shared by the test files: inputs, one-hot decisions, non-trivial BN, a gate that spreads,
a small synthetic world, and reading a run folder."""
import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

DEVICE = os.environ.get("TEST_DEVICE", "cpu")


def images(b, seed=1, dtype=torch.float32):
    """A batch whose samples differ in scale (so the gate and the ranges see different samples)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 2.0, b).view(b, 1, 1, 1) if b > 1 else torch.ones(1, 1, 1, 1)
    return (torch.randn(b, 3, 32, 32, generator=g) * scale).to(DEVICE, dtype)


def randomize_bn(model, seed=5):
    """Non-trivial BN affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


def spread_gate(model, seed=7):
    """Make the gate's choices depend strongly on the sample (big embeddings, random head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in model.gate_embeds:
            e.conv.weight.mul_(10)
        model.gate.proj.weight.copy_(torch.randn(model.gate.proj.weight.shape, generator=g) * 3)
        model.gate.proj.bias.zero_()


def onehot(choices, num_options):
    """[B, G] option indices -> [B, G, O] float one-hot decisions."""
    return F.one_hot(torch.tensor(choices), num_options).float().to(DEVICE)


@contextlib.contextmanager
def small_synthetic(train=64, test=40):
    """The synthetic dataset shrunk to `train` and `test` images, and one thread (2 spinning threads
    crawl on a shared 2-core box)."""
    saved = data.SYNTHETIC_SIZES, torch.get_num_threads()
    data.SYNTHETIC_SIZES = (train, test)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        data.SYNTHETIC_SIZES = saved[0]
        torch.set_num_threads(saved[1])


def log_records(folder):
    """The JSON records of a run folder's log.jsonl."""
    return [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]


def snapshot(folder):
    """Bytes and modification time of every file under `folder`."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).rglob("*")) if p.is_file()}
