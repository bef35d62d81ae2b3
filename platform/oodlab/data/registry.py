"""Dataset registry: one entry point, :func:`get_dataset`, for built-in and external image sets.

Every dataset returns ``(x, y)`` with ``x`` a float32 ``[channels, image_size, image_size]``
tensor in ``[0, 1]`` and ``y`` an int64 scalar (``-1`` for OOD and OE sets). Built-in sets are
generated offline from data shipped with the venv (see :mod:`oodlab.data.builtin`); external
sets are read from a local ``root`` and never downloaded (see :mod:`oodlab.data.external`).
Each module lists its ``DATASETS`` as (entry, loader) pairs; they are registered here, in
:data:`oodlab.registry.DATASETS`, where the spec layer looks names up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from oodlab.data import builtin, external, fashion, multilabel
from oodlab.data.external import ExternalImageDataset
from oodlab.data.types import (
    SPLITS,
    DataError,
    DatasetEntry,
    ImageDataset,
    Loader,
    LoadRequest,
    Split,
)
from oodlab.registry import DATASETS

for _entry, _loader in (*builtin.DATASETS, *fashion.DATASETS, *multilabel.DATASETS,
                        *external.DATASETS):
    DATASETS.register((_entry, _loader), name=_entry.name)


def _registry() -> dict[str, tuple[DatasetEntry, Loader]]:
    return dict(DATASETS.items())


def list_datasets() -> list[DatasetEntry]:
    """Every registered dataset, built-in first, in registration order."""
    return [entry for entry, _ in _registry().values()]


def default_cache_dir() -> Path:
    """``$OODLAB_CACHE`` or ``~/.cache/oodlab/data``."""
    env = os.environ.get("OODLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "oodlab" / "data"


def _check_options(
    split: str, image_size: int, channels: int, limit: int | None, holdout: Sequence[int]
) -> None:
    if split not in SPLITS:
        raise DataError(f"split: {split!r} is not one of {list(SPLITS)}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"image_size: expected a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise DataError(f"channels: expected 1 or 3, got {channels!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit: expected a positive integer or None, got {limit!r}")
    bad = [c for c in holdout if not isinstance(c, int | np.integer) or isinstance(c, bool)]
    if bad:
        raise DataError(f"holdout_classes: expected integer class indices, got {bad}")


def get_dataset(
    name: str,
    *,
    split: Split = "test",
    root: str | Path | None = None,
    image_size: int = 28,
    channels: int = 1,
    seed: int = 0,
    holdout_classes: Sequence[int] = (),
    cache_dir: str | Path | None = None,
    limit: int | None = None,
    imbalance_ratio: float | None = None,
) -> ImageDataset | ExternalImageDataset:
    """Load a registered dataset (an :class:`ImageDataset` for built-in sets).

    ``split`` only matters for ID sets; ``holdout_classes`` removes classes from ID sets (and
    defines ``<id>_holdout``); ``limit`` keeps the first samples after the seeded shuffle;
    ``imbalance_ratio`` is the long tail of the mosaics (None: each mosaic set's default).
    """
    table = _registry()
    if name not in table:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(table)}")
    _check_options(split, image_size, channels, limit, holdout_classes)
    entry, loader = table[name]
    request = LoadRequest(
        name=name,
        role=entry.role,
        split=split,
        root=None if root is None else Path(root).expanduser(),
        image_size=image_size,
        channels=channels,
        seed=int(seed),
        holdout_classes=tuple(sorted({int(c) for c in holdout_classes})),
        cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(),
        limit=limit,
        imbalance_ratio=None if imbalance_ratio is None else float(imbalance_ratio),
    )
    return loader(request)
