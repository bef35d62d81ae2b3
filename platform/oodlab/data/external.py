"""External datasets read from a local ``root`` with torchvision (``download=False``, always).

Expected files are checked before torchvision is touched, so a missing dataset fails with a
:class:`DatasetNotFoundError` naming the exact path and how to get the data. Images go through
the same channel conversion and antialiased resize as the built-in sets (non-square images are
center-cropped to a square first). Splits: ``train`` = the train split minus a seeded 10 %,
``val`` = that 10 %, ``test`` = the test split; all in a seeded order so ``limit`` samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from oodlab.data.types import (
    DataError,
    DatasetEntry,
    DatasetNotFoundError,
    LoadRequest,
    to_tensor,
    transform,
)

VAL_FRACTION = 0.1
NEVER_DOWNLOADED = "datasets are never downloaded automatically"
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class ExternalImageDataset(Dataset):
    """A lazily decoded view of a torchvision dataset that meets the ImageDataset contract:
    ``(x float32 [C, S, S] in [0, 1], y int64)``, ``.name``, ``.classes`` and ``.labels``."""

    def __init__(
        self,
        name: str,
        base: Dataset,
        indices: np.ndarray,
        labels: np.ndarray,
        classes: Sequence[str],
        image_size: int,
        channels: int,
    ) -> None:
        self.name = name
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.base[int(self.indices[index])][0]
        image = transform(pil_to_array(img)[None], self.image_size, self.channels)[0]
        return to_tensor(image), torch.tensor(self.labels[index], dtype=torch.int64)

    def __repr__(self) -> str:
        return f"ExternalImageDataset({self.name!r}, n={len(self)}, classes={len(self.classes)})"


def pil_to_array(img: Image.Image) -> np.ndarray:
    """uint8 ``H x W x C`` with C = 1 for gray images and 3 for everything else."""
    if img.mode != "L":
        img = img.convert("L" if img.mode in ("1", "LA", "I", "I;16", "F") else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def safe_loader(path: str) -> Image.Image:
    """Pillow loader for ImageFolder; an unreadable image raises :class:`DataError` naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("L") if img.mode in ("1", "L", "LA") else img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from err


# ------------------------------------------------------------------------------------ checks


def _need_root(req: LoadRequest, layout: str) -> Path:
    if req.root is None:
        raise DatasetNotFoundError(
            f"{req.name} is an external dataset read from a local directory, but root is None; "
            f"pass root=<dir> (data.root in a spec) where <dir> holds {layout}"
        )
    return req.root


def _not_found(missing: Sequence[Path], req: LoadRequest, how: str) -> DatasetNotFoundError:
    names = ", ".join(str(p.resolve()) for p in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return DatasetNotFoundError(f"{req.name}: not found: {names}{more}. {how} ({NEVER_DOWNLOADED})")


def _require(paths: Sequence[Path], req: LoadRequest, how: str) -> None:
    """Raise :class:`DatasetNotFoundError` naming every missing path and how to get the data."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise _not_found(missing, req, how)


def _construct(req: LoadRequest, path: Path, make: Callable[[], Dataset]) -> Dataset:
    """Build the torchvision dataset; its integrity failures name the directory."""
    try:
        return make()
    except RuntimeError as err:
        raise DataError(
            f"{req.name}: files under {path.resolve()} are incomplete or corrupted ({err}); "
            "extract the archive again"
        ) from err
    except FileNotFoundError as err:
        raise DatasetNotFoundError(f"{req.name}: {err} (looked in {path.resolve()})") from err


# ------------------------------------------------------------------------------------ splits


def _targets(base: Any) -> np.ndarray:
    raw = getattr(base, "targets", None)
    if raw is None:
        raw = base.labels  # SVHN
    return np.asarray(raw.numpy() if isinstance(raw, torch.Tensor) else raw, dtype=np.int64)


def _train_val(n: int, split: str, seed: int) -> np.ndarray:
    """Seeded permutation of the train split: ``val`` is its last 10 %, ``train`` the rest."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * VAL_FRACTION))
    return order[-n_val:] if split == "val" else order[:-n_val]


def _holdout(classes: Sequence[str], holdout: Sequence[int], name: str) -> list[int]:
    bad = [c for c in holdout if not 0 <= c < len(classes)]
    if bad:
        raise DataError(f"holdout_classes: {bad} out of range; {name} has {len(classes)} classes")
    keep = [c for c in range(len(classes)) if c not in holdout]
    if len(keep) < 2:
        raise DataError(f"holdout_classes: {list(holdout)} leaves fewer than 2 {name} classes")
    return keep


def _wrap(
    req: LoadRequest, base: Dataset, indices: np.ndarray, classes: Sequence[str]
) -> ExternalImageDataset:
    """Drop held-out classes, relabel (or label -1 for OOD roles), apply ``limit``."""
    targets = _targets(base)[indices]
    if req.role == "id":
        keep = _holdout(classes, req.holdout_classes, req.name)
        mask = np.isin(targets, keep)
        indices, targets = indices[mask], targets[mask]
        remap = np.full(len(classes), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        labels, classes = remap[targets], [classes[c] for c in keep]
    else:
        labels, classes = np.full(len(indices), -1, dtype=np.int64), []
    if req.limit is not None:
        indices, labels = indices[: req.limit], labels[: req.limit]
    return ExternalImageDataset(
        req.name, base, indices, labels, classes, req.image_size, req.channels
    )


def _split_of(req: LoadRequest, make: Callable[[bool], Dataset]) -> tuple[Dataset, np.ndarray]:
    """(base dataset, seeded indices) for a dataset with torchvision train/test splits."""
    if req.split == "test":
        base = make(False)
        return base, np.random.default_rng(req.seed).permutation(len(base))
    base = make(True)
    return base, _train_val(len(base), req.split, req.seed)


# ----------------------------------------------------------------------------------- loaders


def load_cifar(req: LoadRequest) -> ExternalImageDataset:
    """CIFAR-10 / CIFAR-100 (python version)."""
    from torchvision import datasets

    ten = req.name == "cifar10"
    folder, cls = (
        ("cifar-10-batches-py", datasets.CIFAR10)
        if ten
        else ("cifar-100-python", datasets.CIFAR100)
    )
    root = _need_root(req, folder)
    files = (
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        if ten
        else ["train", "test", "meta"]
    )
    archive = "cifar-10-python.tar.gz" if ten else "cifar-100-python.tar.gz"
    _require(
        [root / folder / f for f in files],
        req,
        f"Download {archive} (the python version) from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it so that "
        f"{(root / folder).resolve()} exists, or copy a staged copy there",
    )
    base, idx = _split_of(
        req,
        lambda train: _construct(
            req, root / folder, lambda: cls(str(root), train=train, download=False)
        ),
    )
    return _wrap(req, base, idx, base.classes)


def load_svhn(req: LoadRequest) -> ExternalImageDataset:
    """SVHN cropped digits (``train_32x32.mat`` / ``test_32x32.mat``)."""
    from torchvision import datasets

    root = _need_root(req, "train_32x32.mat and test_32x32.mat")
    split = "test" if req.split == "test" else "train"
    _require(
        [root / f"{split}_32x32.mat"],
        req,
        f"Download {split}_32x32.mat from http://ufldl.stanford.edu/housenumbers/ into "
        f"{root.resolve()}, or copy a staged copy there",
    )
    base, idx = _split_of(
        req,
        lambda train: _construct(
            req,
            root,
            lambda: datasets.SVHN(str(root), split="train" if train else "test", download=False),
        ),
    )
    return _wrap(req, base, idx, [str(i) for i in range(10)])


def load_mnist_like(req: LoadRequest) -> ExternalImageDataset:
    """Full MNIST (70k) from the torchvision raw layout. (Fashion-MNIST is a built-in set,
    :mod:`oodlab.data.fashion`, that also reads ``<root>/FashionMNIST/raw``.)"""
    from torchvision import datasets

    root = _need_root(req, "MNIST/raw/<idx-ubyte files>")
    raw = root / "MNIST" / "raw"
    _require(
        [raw / f for f in MNIST_FILES],
        req,
        "Download the four idx-ubyte .gz files from http://yann.lecun.com/exdb/mnist/, "
        f"gunzip them into {raw.resolve()}, or copy a staged copy there",
    )
    base, idx = _split_of(
        req,
        lambda train: _construct(
            req, raw, lambda: datasets.MNIST(str(root), train=train, download=False)
        ),
    )
    return _wrap(req, base, idx, base.classes)


def _dtd_images(root: Path) -> Path | None:
    for candidate in (root / "dtd" / "dtd" / "images", root / "dtd" / "images"):
        if candidate.is_dir():
            return candidate
    return None


def load_textures(req: LoadRequest) -> ExternalImageDataset:
    """DTD (all 5,640 images of 47 texture classes); an OOD set, so ``split`` is ignored."""
    from torchvision import datasets

    root = _need_root(req, "dtd/images/<class>/*.jpg")
    images = _dtd_images(root)
    if images is None:
        raise _not_found(
            [root / "dtd" / "dtd" / "images", root / "dtd" / "images"],
            req,
            "Download dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and "
            f"extract it into {root.resolve()} (giving dtd/images/<class>/*.jpg), or copy a "
            "staged copy there",
        )
    base = _construct(req, images, lambda: datasets.ImageFolder(str(images), loader=safe_loader))
    return _wrap(req, base, np.random.default_rng(req.seed).permutation(len(base)), base.classes)


def _imagefolder_dir(req: LoadRequest, root: Path) -> tuple[Path, str | None]:
    """(folder to read, train/val carve-out or None) for split layouts and flat layouts."""
    if not any((root / s).is_dir() for s in ("train", "val", "test")):
        return root, None
    if req.split in ("train", "val") and (root / "train").is_dir() and not (root / "val").is_dir():
        return root / "train", req.split
    if (root / req.split).is_dir():
        return root / req.split, None
    raise _not_found(
        [root / req.split],
        req,
        "Put images at <root>/<split>/<class>/<image>, or use one flat <root>/<class>/<image>",
    )


def load_imagefolder(req: LoadRequest) -> ExternalImageDataset:
    """``<root>/<class>/<image>``, or ``<root>/{train,val,test}/<class>/<image>``.

    With split folders each split reads its own (``val`` falls back to the last seeded 10 % of
    ``train``); a flat folder serves every split (meant for OOD sets).
    """
    from torchvision import datasets

    root = _need_root(req, "<class>/<image> files")
    _require([root], req, "Point root at a folder of <class>/<image> files")
    folder, carve = _imagefolder_dir(req, root)
    base = _construct(req, folder, lambda: datasets.ImageFolder(str(folder), loader=safe_loader))
    if carve is not None:
        idx = _train_val(len(base), carve, req.seed)
    else:
        idx = np.random.default_rng(req.seed).permutation(len(base))
    return _wrap(req, base, idx, base.classes)


def _entry(name: str, role: str, description: str) -> DatasetEntry:
    return DatasetEntry(name, role, "external", description, None)  # type: ignore[arg-type]


DATASETS: list[tuple[DatasetEntry, Callable[[LoadRequest], ExternalImageDataset]]] = [
    (_entry("cifar10", "id", "CIFAR-10 from <root>/cifar-10-batches-py (torchvision)"), load_cifar),
    (_entry("cifar100", "id", "CIFAR-100 from <root>/cifar-100-python (torchvision)"), load_cifar),
    (_entry("svhn", "id", "SVHN from <root>/{train,test}_32x32.mat (torchvision)"), load_svhn),
    (
        _entry("mnist_full", "id", "full MNIST (70k) from <root>/MNIST/raw (torchvision)"),
        load_mnist_like,
    ),
    (
        _entry("textures", "ood_test", "DTD textures from <root>/dtd/images/<class>/*.jpg"),
        load_textures,
    ),
    (
        _entry("imagefolder", "id", "any <root>/[<split>/]<class>/<image> tree (torchvision)"),
        load_imagefolder,
    ),
]
