"""CIFAR ResNet 6n+2 with projection shortcuts (docs/spec.md §1), the stage-1 backbone.

`BasicBlock.forward(x, bits)` threads the bitwidth to its quantized convs and knows
nothing about gates; the plain `CifarResNet` always runs at full precision.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantize import QConv2d

DEPTHS = (20, 32, 38, 44, 56, 74, 110, 152)
WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, in_planes, planes, stride=1, stochastic_act_rounding=False):
        super().__init__()
        q = dict(bias=False, stochastic_act_rounding=stochastic_act_rounding)
        self.conv1 = QConv2d(in_planes, planes, 3, stride, 1, **q)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = QConv2d(planes, planes, 3, 1, 1, **q)
        self.bn2 = nn.BatchNorm2d(planes)
        self.projection = stride != 1 or in_planes != planes
        if self.projection:
            self.shortcut_conv = QConv2d(in_planes, planes, 1, stride, 0, **q)
            self.shortcut_bn = nn.BatchNorm2d(planes)

    def shortcut(self, x, bits=None, x_range=None, norm=None):
        """The residual path; also the block's output when the gate skips it (at full precision).

        norm: a batch norm to use instead of `shortcut_bn` (per-option BN, models/norms.py)."""
        if not self.projection:
            return x
        return (norm or self.shortcut_bn)(self.shortcut_conv(x, bits, x_range))

    def forward(self, x, bits=None, x_range=None, norms=None):
        """x_range: x's training activation range if already reduced (see QConv2d.activation_range).
        norms: (bn1, bn2, shortcut_bn) to use instead of the block's own (per-option BN)."""
        bn1, bn2, shortcut_bn = norms or (self.bn1, self.bn2, None)
        out = F.relu(bn1(self.conv1(x, bits, x_range)))
        out = bn2(self.conv2(out, bits))
        return F.relu(out + self.shortcut(x, bits, x_range, shortcut_bn))


def init_weights(model):
    """The authors' init: conv N(0, sqrt(2/(k*k*out))), BN (1, 0), Linear N(0, sqrt(2/(in*out)))."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):  # in*out, not in: the released code's formula (sic)
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.in_features * m.out_features)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stem, three groups of n blocks (16/32/64 wide), pool, linear."""

    def __init__(self, depth=38, num_classes=10, stochastic_act_rounding=False):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {DEPTHS}, got {depth}")
        self.depth, self.num_classes = depth, num_classes
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        blocks, in_planes = [], WIDTHS[0]
        for group, planes in enumerate(WIDTHS):
            for i in range(n):
                stride = 2 if group > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, stochastic_act_rounding))
                in_planes = planes
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(WIDTHS[-1], num_classes)
        init_weights(self)

    def stem(self, x):
        """Full-precision 3x3 conv, BN, ReLU."""
        return F.relu(self.bn1(self.conv1(x)))

    def head(self, x):
        """Global (8x8) average pool and the linear classifier."""
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
