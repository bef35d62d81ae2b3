"""DenseNet-BC (Huang et al. 2017), the Unleashing-Mask backbone ("DenseNet-101" = depth 100,
growth 12, compression 0.5, bottleneck layers), with the small-image stem of the CIFAR code.

Unlike the reference code (tmlr-group/Unleashing-Mask, whose configs use
``NonAffineBatchNorm`` from ``utils/bn_type.py``) it keeps standard affine BatchNorm everywhere:
the reference ``pretrained()`` silently skips mismatched keys, so mixing affine and non-affine
BN between pre-training and finetuning would drop every BN weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Bottleneck(nn.Module):
    """BN-ReLU-1x1 conv (4k channels) - BN-ReLU-3x3 conv (k channels); output is concatenated."""

    def __init__(self, c_in: int, growth: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.conv1(F.relu(self.bn1(x))))
        h = self.drop(self.conv2(F.relu(self.bn2(h))))
        return torch.cat([x, h], 1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv (compression) - 2x2 average pool."""

    def __init__(self, c_in: int, c_out: int, dropout: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.drop(self.conv(F.relu(self.bn(x)))), 2)


class DenseNetBC(nn.Module):
    """Three dense blocks of ``(depth - 4) / 6`` bottleneck layers each, compression 0.5."""

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 100,
                 growth: int = 12, dropout: float = 0.0, reduction: float = 0.5) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        c = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(n):
                layers.append(Bottleneck(c, growth, dropout))
                c += growth
            if block < 2:
                c_out = int(c * reduction)
                layers.append(Transition(c, c_out, dropout))
                c = c_out
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)
        self.feature_dim = c

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(2.0 * x - 1.0)
        feats = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        return self.fc(feats), feats
