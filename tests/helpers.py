"""Helpers shared by the model-level test files (inputs, non-trivial BN, a gate that spreads)."""
import os

import torch
import torch.nn as nn

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
