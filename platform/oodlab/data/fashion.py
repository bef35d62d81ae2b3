"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) as a built-in ID set, read from the original
idx files, and validation OOD sets made from its validation split.

Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, gzip-compressed (``.gz``) or plain. They are looked up in
``data.root`` when it is set (also in ``<root>/fashion-mnist`` and torchvision's
``<root>/FashionMNIST/raw``), then in ``/usr/share/datasets/fashion-mnist``, where the Debian
package ``dataset-fashion-mnist`` installs them. Nothing is ever downloaded.

Splits, as in the paper's protocol: ``test`` is the official 10,000-image test set; ``val`` is
5,000 images (500 per class) carved from the 60,000 training images by a seeded, stratified
draw; ``train`` is the other 55,000. Each split is in a seeded order, so ``limit`` keeps a
roughly class-balanced sample. The decoded files are memoised per process (keyed by path,
size and modification time): the splits, the held-out-class set, the validation OOD sets and
the mosaics of :mod:`oodlab.data.multilabel` read the files once.

Validation OOD sets (role ``ood_val``). Model selection needs validation OOD data that is
disjoint from every test set and hard enough that a good model does not score AUROC 0.999 on
it (an easy validation set cannot rank checkpoints). These sets are built from the Fashion-MNIST
*validation* split only, so they share no image with the test split, the near-OOD test sets
(MNIST digits, letters) or the far-OOD ones; each is drawn from ``dataset_rng(name, seed)``:

* ``fashion_val_blur``: a strong Gaussian blur (radius 1.5-2.5 px) of a garment.
* ``fashion_val_vflip``: a garment upside down (classes whose silhouette is not vertically
  symmetric: trousers and bags are left out, their flips are still ID).
* ``fashion_val_patchperm``: the pixels of every 4 x 4 patch shuffled (the 7 x 7 silhouette
  stays, edges and texture are destroyed).
* ``fashion_val_mix``: the top of one garment pasted onto the bottom of a garment of another
  class (cut at row 10-18), a chimera with in-distribution parts.

Measured separability, AUROC of ID validation vs each set, MSP / energy, for a SmallCNN
(width 32) trained 5 epochs with cross-entropy on ``fashion_mnist`` (2,145 SGD steps, test
accuracy 0.931, seed 0): blur 0.912 / 0.961, vflip 0.905 / 0.965, patchperm 0.841 / 0.907,
mix 0.849 / 0.902 (``val_letters``: 0.895 / 0.971). All well below 0.99, so they can rank
models.
"""

from __future__ import annotations

import functools
import gzip
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from oodlab.data import types
from oodlab.data.builtin import dataset_rng
from oodlab.data.types import (
    DataError,
    DatasetEntry,
    DatasetNotFoundError,
    ImageDataset,
    LoadRequest,
    transform,
)

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
PACKAGE = "dataset-fashion-mnist"
INSTALL = f"apt-get install {PACKAGE}"
VAL_FRACTION = 1 / 12  # 5,000 of the 60,000 training images (500 per class)
SIZE = 28
VAL_OOD_COUNT = 1000
SYMMETRIC_CLASSES = (1, 8)  # trouser, bag: an upside-down one is still a trouser / a bag

Pool = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]


# ---------------------------------------------------------------------------- reading idx files


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte file (LeCun's MNIST format; gzip or plain) as a uint8 array."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"fashion_mnist: cannot read {path}: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] == 0:
        raise DataError(f"fashion_mnist: {path} is not an idx-ubyte file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"fashion_mnist: {path} is truncated (incomplete header)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape))
    if len(data) != header + count:
        raise DataError(f"fashion_mnist: {path} holds {len(data) - header} bytes of data, "
                        f"expected {count} for shape {shape} (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def search_dirs(root: Path | None) -> list[Path]:
    """Where the idx files are looked for, in order."""
    dirs = [] if root is None else [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    return [*dirs, SYSTEM_DIR]


def find_files(root: Path | None) -> list[Path]:
    """The four idx files (``.gz`` preferred) from the first folder that has all of them."""
    for folder in search_dirs(root):
        found = []
        for stem in FILES:
            path = next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)
            if path is None:
                break
            found.append(path)
        else:
            return found
    looked = ", ".join(str(d) for d in search_dirs(root))
    raise DatasetNotFoundError(
        f"fashion_mnist: the Fashion-MNIST idx files ({', '.join(FILES)}, .gz or plain) were "
        f"not found; looked in {looked}. Install the Debian package {PACKAGE} "
        f"(`{INSTALL}`), which puts them in {SYSTEM_DIR}, or set data.root to a folder that "
        "holds the four files (datasets are never downloaded automatically)")


@functools.lru_cache(maxsize=2)
def _decode(key: tuple[tuple[str, int, int], ...]) -> tuple[np.ndarray, np.ndarray, int]:
    """(all images [N, 28, 28], all labels [N], number of training images): train then test."""
    train_x, train_y, test_x, test_y = (read_idx(Path(p)) for p, _, _ in key)
    for x, y, what in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if x.ndim != 3 or x.shape[1:] != (SIZE, SIZE) or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"fashion_mnist: {what} files hold images {x.shape} and labels "
                            f"{y.shape}; expected N x 28 x 28 and N")
        if len(y) and int(y.max()) >= len(CLASSES):
            raise DataError(f"fashion_mnist: {what} labels go up to {int(y.max())}; "
                            f"expected 0..{len(CLASSES) - 1}")
    images = np.concatenate([train_x, test_x])
    labels = np.concatenate([train_y, test_y]).astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels, len(train_x)


def split_indices(labels: np.ndarray, n_train: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded splits as indices into train + test: ``val`` is a stratified 1/12 of each
    training class, ``train`` the rest of the training file, ``test`` the test file."""
    rng = dataset_rng("fashion_mnist-split", seed)
    train_parts, val_parts = [], []
    train_labels = labels[:n_train]
    for c in np.unique(train_labels):
        idx = rng.permutation(np.flatnonzero(train_labels == c))
        n_val = int(round(len(idx) * VAL_FRACTION))
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    empty = np.zeros(0, dtype=np.int64)
    return {"train": rng.permutation(np.concatenate(train_parts or [empty])),
            "val": rng.permutation(np.concatenate(val_parts or [empty])),
            "test": n_train + rng.permutation(len(labels) - n_train)}


def fashion_pool(req: LoadRequest) -> Pool:
    """(images, labels, split indices) over the concatenated train + test files."""
    paths = find_files(req.root)
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    images, labels, n_train = _decode(key)
    return images, labels, split_indices(labels, n_train, req.seed)


# -------------------------------------------------------------------------------------- loaders


def _finish(req: LoadRequest, images: np.ndarray, labels: np.ndarray,
            classes: Sequence[str]) -> ImageDataset:
    """Apply ``limit`` and the size/channel transform."""
    if req.limit is not None:
        images, labels = images[: req.limit], labels[: req.limit]
    return ImageDataset(req.name, transform(images, req.image_size, req.channels), labels, classes)


def kept_classes(holdout: Sequence[int]) -> list[int]:
    return types.kept_classes(holdout, len(CLASSES), "fashion_mnist")


def load_fashion(req: LoadRequest) -> ImageDataset:
    """An ID split; held-out classes removed and the rest relabelled 0..K-1 in order."""
    keep = kept_classes(req.holdout_classes)
    images, labels, splits = fashion_pool(req)
    idx, relabelled = types.keep_and_relabel(labels, splits[req.split], keep, len(CLASSES))
    return _finish(req, images[idx], relabelled, [CLASSES[c] for c in keep])


def load_fashion_holdout(req: LoadRequest) -> ImageDataset:
    """Near-OOD: test images of the held-out classes (labels -1)."""
    if not req.holdout_classes:
        raise DataError("holdout_classes: fashion_mnist_holdout needs held-out classes, "
                        "e.g. [6, 9]")
    kept_classes(req.holdout_classes)
    images, labels, splits = fashion_pool(req)
    idx = splits["test"]
    idx = idx[np.isin(labels[idx], req.holdout_classes)]
    return _finish(req, images[idx], np.full(len(idx), -1, dtype=np.int64), [])


# ------------------------------------------------------------------------ validation OOD sets


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(pool, size=n, replace=len(pool) < n)


def make_blur(images, labels, val, rng, n) -> tuple[np.ndarray, np.ndarray]:
    src = _draw(rng, val, n)
    radius = rng.uniform(1.5, 2.5, size=n)
    blur = [Image.fromarray(images[i]).filter(ImageFilter.GaussianBlur(float(r)))
            for i, r in zip(src, radius, strict=True)]
    out = np.stack([np.asarray(b) for b in blur])
    return out, src[:, None]


def make_vflip(images, labels, val, rng, n) -> tuple[np.ndarray, np.ndarray]:
    pool = val[~np.isin(labels[val], SYMMETRIC_CLASSES)]
    src = _draw(rng, pool if len(pool) else val, n)
    return np.ascontiguousarray(images[src][:, ::-1]), src[:, None]


def make_patchperm(images, labels, val, rng, n, patch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    src = _draw(rng, val, n)
    g = SIZE // patch
    blocks = images[src].reshape(n, g, patch, g, patch).transpose(0, 1, 3, 2, 4)
    blocks = blocks.reshape(n, g, g, patch * patch)
    order = rng.permuted(np.broadcast_to(np.arange(patch * patch), blocks.shape), axis=-1)
    mixed = np.take_along_axis(blocks, order, axis=-1).reshape(n, g, g, patch, patch)
    return np.ascontiguousarray(mixed.transpose(0, 1, 3, 2, 4).reshape(n, SIZE, SIZE)), src[:, None]


def make_mix(images, labels, val, rng, n) -> tuple[np.ndarray, np.ndarray]:
    top = _draw(rng, val, n)
    bottom = np.empty_like(top)
    for i, t in enumerate(top):  # a garment of another class
        others = val[labels[val] != labels[t]]
        bottom[i] = others[rng.integers(len(others))] if len(others) else t
    cut = rng.integers(10, 19, size=n)
    rows = np.arange(SIZE)[None, :, None] < cut[:, None, None]
    return np.where(rows, images[top], images[bottom]), np.stack([top, bottom], 1)


Maker = Callable[..., tuple[np.ndarray, np.ndarray]]
VAL_OOD: dict[str, tuple[Maker, str]] = {
    "fashion_val_blur": (make_blur, "fashion_mnist val-split garments, Gaussian blur radius "
                                    "1.5-2.5 px"),
    "fashion_val_vflip": (make_vflip, "fashion_mnist val-split garments upside down (no "
                                      "trousers or bags)"),
    "fashion_val_patchperm": (make_patchperm, "fashion_mnist val-split garments, pixels "
                                              "shuffled within each 4x4 patch"),
    "fashion_val_mix": (make_mix, "fashion_mnist val-split chimeras: top of one garment on "
                                  "the bottom of another class (cut at row 10-18)"),
}


def val_ood_images(req: LoadRequest) -> tuple[np.ndarray, np.ndarray]:
    """(native 28 x 28 images, source indices [n, k] into :func:`fashion_pool`'s arrays)."""
    make = VAL_OOD[req.name][0]
    images, labels, splits = fashion_pool(req)
    if not len(splits["val"]):
        raise DataError(f"{req.name}: the fashion_mnist validation split is empty")
    return make(images, labels, splits["val"], dataset_rng(req.name, req.seed), VAL_OOD_COUNT)


def load_val_ood(req: LoadRequest) -> ImageDataset:
    images, _ = val_ood_images(req)
    return _finish(req, images, np.full(len(images), -1, dtype=np.int64), [])


def _entry(name: str, role: str, count: int | None, description: str) -> DatasetEntry:
    return DatasetEntry(name, role, "builtin", description, count)  # type: ignore[arg-type]


DATASETS: list[tuple[DatasetEntry, Callable[[LoadRequest], ImageDataset]]] = [
    (_entry("fashion_mnist", "id", 70000,
            "Fashion-MNIST (Xiao et al. 2017) from the idx files of data.root or "
            f"{SYSTEM_DIR} ({PACKAGE}); 10 classes, split 55000/5000/10000 (val seeded)"),
     load_fashion),
    (_entry("fashion_mnist_holdout", "ood_test", None,
            "near-OOD: fashion_mnist test images of holdout_classes (1000 per class)"),
     load_fashion_holdout),
    *((_entry(name, "ood_val", VAL_OOD_COUNT, desc), load_val_ood)
      for name, (_, desc) in VAL_OOD.items()),
]

__all__ = ["CLASSES", "DATASETS", "SYSTEM_DIR", "VAL_OOD", "fashion_pool", "find_files",
           "read_idx", "val_ood_images"]
