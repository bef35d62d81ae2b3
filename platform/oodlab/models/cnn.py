"""A small CNN for 28-32 px images: fast enough to train on two CPU cores."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Three conv blocks (w, 2w, 4w channels) -> global average pool -> linear.

    Inputs are [0, 1] pixels, mapped to [-1, 1] inside the model, so detectors and the
    served model need no separate normalisation step.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(in_channels, width), _block(width, 2 * width), _block(2 * width, 4 * width)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * width, num_classes)
        self.feature_dim = 4 * width

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.pool(self.features(2.0 * x - 1.0))
        feats = torch.flatten(h, 1)
        return self.fc(self.dropout(feats)), feats
