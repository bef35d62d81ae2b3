"""The data layer's leaf: the item contract, dataset entries, load requests and errors.

Every dataset returns ``(x, y)`` with ``x`` a float32 ``[channels, image_size, image_size]``
tensor in ``[0, 1]`` and ``y`` an int64 scalar (``-1`` for OOD and OE sets). Built-in sets are
generated offline from data shipped with the venv (see :mod:`oodlab.data.builtin`); external
sets are read from a local ``root`` and never downloaded (see :mod:`oodlab.data.external`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

Role = Literal["id", "ood_test", "ood_val", "oe"]
Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luminance, the weights PIL's convert("L") uses


@dataclass(frozen=True)
class DatasetEntry:
    """What ``oodlab data list`` shows for one registered dataset."""

    name: str
    role: Role
    source: Literal["builtin", "external"]
    description: str
    count: int | None


class DatasetNotFoundError(FileNotFoundError):
    """Dataset files are missing; the message names the path and how to get the data."""


class DataError(ValueError):
    """Bad option, unknown dataset or unreadable image; the message names the field or file."""


@dataclass(frozen=True)
class LoadRequest:
    """Validated arguments of :func:`get_dataset`, handed to a dataset's loader."""

    name: str
    role: Role
    split: Split
    root: Path | None
    image_size: int
    channels: int
    seed: int
    holdout_classes: tuple[int, ...]
    cache_dir: Path
    limit: int | None
    imbalance_ratio: float | None = None  # long tail of the mosaics; None: the set's default


Loader = Callable[[LoadRequest], Dataset]


# ---------------------------------------------------------------------------- image transforms


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``N x H x W x C`` to ``channels``: gray is repeated to RGB, RGB goes to luminance."""
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if have == 3 and channels == 1:
        gray = images.astype(np.float32) @ np.asarray(LUMA, dtype=np.float32)
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None]
    raise DataError(f"channels: cannot convert {have}-channel images to {channels} channels")


def center_square(images: np.ndarray) -> np.ndarray:
    """Center-crop ``N x H x W x C`` images to a square (a no-op for square images)."""
    h, w = images.shape[1:3]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images[:, top : top + side, left : left + side]


def resize(images: np.ndarray, size: int, chunk: int = 1024) -> np.ndarray:
    """Bilinear (antialiased) resize of uint8 ``N x H x W x C`` images to ``size x size``."""
    images = center_square(images)
    if images.shape[1] == size:
        return np.ascontiguousarray(images)
    out = np.empty((len(images), size, size, images.shape[-1]), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk]))
        x = x.permute(0, 3, 1, 2).float()
        y = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[start : start + chunk] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out


def transform(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """Bring uint8 images (``N x H x W`` or ``N x H x W x C``) to the requested shape."""
    if images.ndim == 3:
        images = images[..., None]
    return resize(to_channels(images, channels), image_size)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``H x W x C`` to a float32 ``C x H x W`` tensor in ``[0, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


# ------------------------------------------------------------------------------- dataset class


class ImageDataset(Dataset):
    """An in-memory image set: ``.images`` (uint8 ``N x H x W x C``, already at the requested
    size and channel count) and ``.labels`` (int64 ``N``; ``-1`` for OOD/OE sets)."""

    def __init__(
        self, name: str, images: np.ndarray, labels: np.ndarray, classes: Sequence[str] = ()
    ) -> None:
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2]:
            raise DataError(f"{name}: images must be uint8 N x S x S x C, got {images.shape}")
        if labels.shape != (len(images),):
            raise DataError(f"{name}: {len(labels)} labels for {len(images)} images")
        self.name = name
        self.images = np.ascontiguousarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensor(self.images[index]), torch.tensor(self.labels[index], dtype=torch.int64)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set as a float32 ``N x C x H x W`` batch in ``[0, 1]`` and int64 labels."""
        x = torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255.0)
        return x, torch.from_numpy(self.labels.copy())

    def __repr__(self) -> str:
        n, s, _, c = self.images.shape
        k = len(self.classes)
        return f"ImageDataset({self.name!r}, n={n}, size={s}, channels={c}, classes={k})"


# ------------------------------------------------------------------- held-out classes (ID sets)


def kept_classes(holdout: Sequence[int], num_classes: int, dataset: str) -> list[int]:
    """The classes an ID set keeps when ``holdout_classes`` are held out (at least two)."""
    bad = [c for c in holdout if not 0 <= c < num_classes]
    if bad:
        raise DataError(f"holdout_classes: {bad} out of range; {dataset} classes are "
                        f"0..{num_classes - 1}")
    keep = [c for c in range(num_classes) if c not in holdout]
    if len(keep) < 2:
        raise DataError(f"holdout_classes: {list(holdout)} leaves fewer than 2 {dataset} "
                        "classes")
    return keep


def keep_and_relabel(labels: np.ndarray, idx: np.ndarray, keep: Sequence[int],
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The indices of ``idx`` whose class is kept, and their labels renumbered 0..K-1 in
    the order of ``keep``."""
    idx = idx[np.isin(labels[idx], keep)]
    remap = np.full(num_classes, -1, dtype=np.int64)
    remap[list(keep)] = np.arange(len(keep))
    return idx, remap[labels[idx]]
