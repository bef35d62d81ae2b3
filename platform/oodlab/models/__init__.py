"""Backbones. Every model maps [0, 1] images to ``(logits, penultimate features)``."""

from __future__ import annotations

from torch import nn

from oodlab.models.cnn import SmallCNN
from oodlab.models.resnet import ResNet18

ARCHITECTURES: dict[str, type[nn.Module]] = {"small_cnn": SmallCNN, "resnet18": ResNet18}


def build_model(
    arch: str, *, num_classes: int, in_channels: int, width: int = 32, dropout: float = 0.0
) -> nn.Module:
    """Build a backbone by name; raises ValueError naming the allowed architectures."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {arch!r}; allowed: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](
        num_classes=num_classes, in_channels=in_channels, width=width, dropout=dropout
    )


__all__ = ["ARCHITECTURES", "ResNet18", "SmallCNN", "build_model"]
