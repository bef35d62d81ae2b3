"""Backbones. Every model maps [0, 1] images to ``(logits, penultimate features)``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from oodlab.models.cnn import SmallCNN
from oodlab.models.densenet import DenseNetBC
from oodlab.models.resnet import ResNet18

if TYPE_CHECKING:
    from oodlab.spec import ModelSpec

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "small_cnn": SmallCNN, "resnet18": ResNet18, "densenet": DenseNetBC,
}


def build_model(cfg: ModelSpec, *, num_classes: int, in_channels: int) -> nn.Module:
    """Build the backbone named in ``cfg.arch``; raises ValueError naming the allowed ones."""
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; allowed: {sorted(ARCHITECTURES)}")
    if cfg.arch == "densenet":
        return DenseNetBC(num_classes=num_classes, in_channels=in_channels, depth=cfg.depth,
                          growth=cfg.growth, dropout=cfg.dropout)
    return ARCHITECTURES[cfg.arch](num_classes=num_classes, in_channels=in_channels,
                                   width=cfg.width, dropout=cfg.dropout)


__all__ = ["ARCHITECTURES", "DenseNetBC", "ResNet18", "SmallCNN", "build_model"]
