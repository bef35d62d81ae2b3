"""Multi-label data for EDGE: built-in 2x2 mosaics of MNIST digits or Fashion-MNIST garments,
and PASCAL VOC / MS-COCO loaders.

Built-in benchmark. A mosaic is 2x2 tiles of 28 px (56 px); each tile is blank with
probability 0.25, else an ID image whose class c is drawn with p_c ∝ ρ^(-c/(C-1))
(``imbalance_ratio`` ρ; class 0 is the head, class C-1 the rarest tail; at least one object
per mosaic). The label is the multi-hot set of classes present. Tiles come from the matching
split of the source set, so train mosaics never reuse a test image.

* ``mnist_mosaic``: digits 0-7 (C = 8) from the built-in ``mnist``, ρ = 10 by default,
  3,000 / 500 / 1,000 mosaics; the digits 8 and 9 are held out (``mosaic_holdout``).
* ``fashion_mosaic``: the ten Fashion-MNIST classes (Xiao et al. 2017) from
  ``fashion_mnist``, ρ = 50 by default (up to 100 in a spec), 20,000 / 2,000 / 4,000 mosaics.
* ``fashion_mosaic_balanced``: a class-balanced evaluation design of fixed cardinality, one or
  two garments per mosaic: 1,000 single-garment mosaics (100 per class) and 1,000 pairs of two
  different classes (200 per class), so every class appears in exactly 300 of the 2,000
  mosaics. The per-class rate of ID mosaics flagged OOD can then be read against the class's
  frequency in the long-tailed training set (:func:`oodlab.detect.metrics.flagged_per_class`).
* ``fashion_mosaic_lt``: trains on the long-tailed ``fashion_mosaic`` train/val splits (ρ) and
  tests on the ``fashion_mosaic_balanced`` test split, so one run measures the tail effect:
  the test set holds every class equally often and one or two objects per mosaic, and the
  head/tail breakdown is no longer confounded by the number of objects.

OOD and OE mosaics use the same layout with tiles from a non-ID set (or the held-out digits 8
and 9), so they contain no ID class of either benchmark. Mosaics are assembled on load from
the cached tiles (fast and deterministic for a seed).

Label counts per class for seed 0, ρ = 10, ``mnist_mosaic`` train (3,000 mosaics):
see ``oodlab data list`` / :func:`class_counts`; class 0 appears about 10x as often as 7.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from oodlab.data import fashion
from oodlab.data.builtin import GENERATED, dataset_rng, generated_images, mnist_arrays
from oodlab.data.types import (
    DataError,
    DatasetEntry,
    DatasetNotFoundError,
    ImageDataset,
    LoadRequest,
    to_tensor,
    transform,
)

ID_CLASSES = 8
HOLDOUT = (8, 9)
P_BLANK = 0.25
TILE = 28
SIZES = {"train": 3000, "val": 500, "test": 1000}
FASHION_SIZES = {"train": 20000, "val": 2000, "test": 4000}
BALANCED_SINGLE_ROUNDS = 100  # each round: one single-garment mosaic per class
BALANCED_PAIR_ROUNDS = 100  # each round: C two-garment mosaics, every class in two of them
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")


class MultiLabelDataset(ImageDataset):
    """In-memory images with multi-hot labels ``[N, C]`` (float32)."""

    multilabel = True

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, classes) -> None:
        super().__init__(name, images, np.zeros(len(images), dtype=np.int64), classes)
        if labels.shape != (len(images), len(self.classes)):
            raise DataError(f"{name}: labels {labels.shape} do not match "
                            f"{len(images)} images x {len(self.classes)} classes")
        self.labels = labels.astype(np.float32)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return to_tensor(self.images[index]), torch.from_numpy(self.labels[index].copy())


@dataclass(frozen=True)
class MosaicSource:
    """An ID mosaic benchmark: where its tiles come from and its sizes and default ρ."""

    name: str
    pool: Callable[[LoadRequest], tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]
    classes: tuple[str, ...]
    sizes: dict[str, int]
    default_rho: float

    def rho(self, req: LoadRequest) -> float:
        rho = self.default_rho if req.imbalance_ratio is None else float(req.imbalance_ratio)
        if not rho >= 1:
            raise DataError(f"imbalance_ratio: must be >= 1, got {rho}")
        return rho


MNIST_MOSAIC = MosaicSource("mnist_mosaic", mnist_arrays, tuple(str(c) for c in range(ID_CLASSES)),
                            SIZES, 10.0)
FASHION_MOSAIC = MosaicSource("fashion_mosaic", fashion.fashion_pool, fashion.CLASSES,
                              FASHION_SIZES, 50.0)


def class_probs(rho: float, n_classes: int = ID_CLASSES) -> np.ndarray:
    """Long-tailed class distribution p_c ∝ ρ^(-c/(C-1)) over the ID classes."""
    p = float(rho) ** (-np.arange(n_classes) / (n_classes - 1))
    return p / p.sum()


def tile_plan(rng: np.random.Generator, n: int, probs: np.ndarray | None) -> np.ndarray:
    """[n, 4] tile contents: -1 = blank, else a class index (or 0 = "a tile" when
    ``probs`` is None); every row has at least one non-blank tile."""
    plan = np.full((n, 4), -1, dtype=np.int64)
    todo = np.arange(n)
    while len(todo):
        blank = rng.random((len(todo), 4)) < P_BLANK
        cls = (rng.choice(len(probs), size=(len(todo), 4), p=probs) if probs is not None
               else np.zeros((len(todo), 4), dtype=np.int64))
        plan[todo] = np.where(blank, -1, cls)
        todo = todo[(plan[todo] < 0).all(1)]
    return plan


def balanced_plan(rng: np.random.Generator, n_classes: int, single_rounds: int,
                  pair_rounds: int) -> np.ndarray:
    """[n, 4] tile contents of a class-balanced design with one or two objects per mosaic.

    Each single round adds one mosaic per class; each pair round draws a permutation π of
    the classes and adds the pairs (π_i, π_(i+1 mod C)), so every class is in exactly two
    pairs per round and never paired with itself. Objects sit on random distinct tiles."""
    rows = [[int(c)] for _ in range(single_rounds) for c in rng.permutation(n_classes)]
    for _ in range(pair_rounds):
        perm = rng.permutation(n_classes)
        rows += [[int(perm[i]), int(perm[(i + 1) % n_classes])] for i in range(n_classes)]
    plan = np.full((len(rows), 4), -1, dtype=np.int64)
    order = rng.permutation(len(rows))
    for row, i in enumerate(order):
        tiles = rng.permutation(4)[: len(rows[i])]
        plan[row, tiles] = rows[i]
    return plan


def assemble(src: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Mosaics [n, 56, 56]: tile t of row i is ``pool[src[i, t]]``, blank where src < 0."""
    out = np.zeros((len(src), 2 * TILE, 2 * TILE), dtype=np.uint8)
    for (i, t), k in np.ndenumerate(src):
        if k >= 0:
            r, q = divmod(t, 2)
            out[i, r * TILE:(r + 1) * TILE, q * TILE:(q + 1) * TILE] = pool[k]
    return out


def _mosaics(req: LoadRequest, source: MosaicSource, plan: np.ndarray, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill a plan with images of the request's split: (mosaics, multi-hot, source index)."""
    images, labels, splits = source.pool(req)
    idx = splits[req.split]
    pools = [idx[labels[idx] == c] for c in range(len(source.classes))]
    empty = [source.classes[c] for c in np.unique(plan[plan >= 0]) if not len(pools[c])]
    if empty:
        raise DataError(f"{req.name}: the {req.split} split has no image of class(es) {empty}")
    src = np.full(plan.shape, -1, dtype=np.int64)
    for (i, t), c in np.ndenumerate(plan):
        if c >= 0:
            src[i, t] = pools[c][rng.integers(len(pools[c]))]
    mosaics = assemble(src, images)
    multi_hot = np.zeros((len(plan), len(source.classes)), dtype=np.float32)
    for i, row in enumerate(plan):
        multi_hot[i, row[row >= 0]] = 1.0
    return mosaics, multi_hot, src


def id_mosaics(req: LoadRequest, source: MosaicSource = MNIST_MOSAIC
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mosaics, multi-hot labels, source index per tile or -1) for one ID split."""
    rho = source.rho(req)
    rng = dataset_rng(f"{source.name}-{req.split}-{rho}", req.seed)
    plan = tile_plan(rng, source.sizes[req.split], class_probs(rho, len(source.classes)))
    return _mosaics(req, source, plan, rng)


def balanced_mosaics(req: LoadRequest, source: MosaicSource = FASHION_MOSAIC
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The class-balanced one-or-two-object design of :func:`balanced_plan` for one split."""
    rng = dataset_rng(f"{req.name}-{req.split}", req.seed)
    plan = balanced_plan(rng, len(source.classes), BALANCED_SINGLE_ROUNDS, BALANCED_PAIR_ROUNDS)
    return _mosaics(req, source, plan, rng)


def long_tail_then_balanced(req: LoadRequest, source: MosaicSource = FASHION_MOSAIC
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Long-tailed train/val (:func:`id_mosaics`), class-balanced test
    (:func:`balanced_mosaics`, the very mosaics of ``fashion_mosaic_balanced``)."""
    if req.split == "test":
        return balanced_mosaics(replace(req, name="fashion_mosaic_balanced"), source)
    return id_mosaics(replace(req, name=source.name), source)


def _id_mosaic_loader(source: MosaicSource, build: Callable = id_mosaics
                      ) -> Callable[[LoadRequest], MultiLabelDataset]:
    def load(req: LoadRequest) -> MultiLabelDataset:
        if req.holdout_classes:
            raise DataError(f"holdout_classes: not used by {req.name} (its OOD mosaics, "
                            "mosaic_*, hold no ID class)")
        mosaics, multi_hot, _ = build(req, source)
        if req.limit is not None:
            mosaics, multi_hot = mosaics[: req.limit], multi_hot[: req.limit]
        return MultiLabelDataset(req.name, transform(mosaics, req.image_size, req.channels),
                                 multi_hot, list(source.classes))

    return load


load_id_mosaic = _id_mosaic_loader(MNIST_MOSAIC)


FASHION_VAL_SHIFT = "fashion_val_shift"  # tiles: the four fashion_val_* near-shift sets


def _tile_pool(source: str, req: LoadRequest) -> np.ndarray:
    if source == FASHION_VAL_SHIFT:  # shifted garments of the fashion_mnist val split
        return np.concatenate([fashion.val_ood_images(replace(req, name=name))[0]
                               for name in fashion.VAL_OOD])
    if source == "holdout":
        images, labels, splits = mnist_arrays(req)
        idx = splits["test"]
        return images[idx[np.isin(labels[idx], HOLDOUT)]]
    build, n = next((b, n) for name, _, n, b, _ in GENERATED if name == source)
    return generated_images(source, build, n, req.seed, req.cache_dir)


def _ood_mosaic(source: str, n: int) -> Callable[[LoadRequest], ImageDataset]:
    def load(req: LoadRequest) -> ImageDataset:
        if req.holdout_classes:
            raise DataError(f"holdout_classes: not used by {req.name}")
        pool = _tile_pool(source, req)
        rng = dataset_rng(req.name, req.seed)
        plan = tile_plan(rng, n, None)
        src = np.where(plan >= 0, rng.integers(len(pool), size=plan.shape), -1)
        mosaics = assemble(src, pool)
        if req.limit is not None:
            mosaics = mosaics[: req.limit]
        return ImageDataset(req.name, transform(mosaics, req.image_size, req.channels),
                            np.full(len(mosaics), -1, dtype=np.int64), [])

    return load


def class_counts(ds: MultiLabelDataset) -> np.ndarray:
    """Number of images carrying each class."""
    return ds.labels.sum(0).astype(np.int64)


# ------------------------------------------------------------------ external: VOC and COCO


class MultiLabelFiles(torch.utils.data.Dataset):
    """Images read from disk on access, with multi-hot labels; a corrupt file is a DataError."""

    multilabel = True

    def __init__(self, name: str, files: list[Path], labels: np.ndarray, classes,
                 image_size: int, channels: int) -> None:
        self.name, self.files, self.classes = name, files, list(classes)
        self.labels = labels.astype(np.float32)
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files[index]
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{self.name}: cannot read image {path}: {err}") from None
        x = transform(arr[None], self.image_size, self.channels)[0]
        return to_tensor(x), torch.from_numpy(self.labels[index].copy())


def _split_ids(ids: list[str], split: str, seed: int, holdout_name: str) -> list[str]:
    """train = ids minus a seeded 10 %, val = that 10 % (test is read separately)."""
    rng = dataset_rng(holdout_name, seed)
    order = rng.permutation(len(ids))
    n_val = max(1, len(ids) // 10)
    chosen = order[:n_val] if split == "val" else order[n_val:]
    return [ids[i] for i in sorted(chosen)]


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetNotFoundError(f"{what} not found at {path}; download it from the official "
                                   "site and extract it there (oodlab never downloads data)")
    return path


def load_voc(req: LoadRequest) -> MultiLabelFiles:
    """PASCAL VOC 2012 as multi-hot labels over the 20 classes (difficult objects count).

    train/val: ImageSets/Main/train.txt split 90/10 by seed; test: val.txt (the official
    test labels are not public)."""
    if req.root is None:
        raise DatasetNotFoundError("voc: data.root is not set; point it at the folder that "
                                   "holds VOCdevkit/")
    base = _need(req.root / "VOCdevkit" / "VOC2012", "PASCAL VOC 2012")
    list_file = "val.txt" if req.split == "test" else "train.txt"
    ids = _need(base / "ImageSets" / "Main" / list_file, "VOC image list").read_text().split()
    if req.split != "test":
        ids = _split_ids(ids, req.split, req.seed, "voc-val")
    labels = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.float32)
    for i, image_id in enumerate(ids):
        xml = _need(base / "Annotations" / f"{image_id}.xml", "VOC annotation")
        try:
            names = [o.findtext("name", "").strip() for o in ET.parse(xml).iter("object")]
        except ET.ParseError as err:
            raise DataError(f"voc: malformed annotation {xml}: {err}") from None
        for n in names:
            if n not in VOC_CLASSES:
                raise DataError(f"voc: unknown class {n!r} in {xml}")
            labels[i, VOC_CLASSES.index(n)] = 1.0
    files = [base / "JPEGImages" / f"{i}.jpg" for i in ids]
    return _limit(MultiLabelFiles(req.name, files, labels, VOC_CLASSES, req.image_size,
                                  req.channels), req.limit)


def load_coco(req: LoadRequest) -> MultiLabelFiles:
    """MS-COCO 2014 instances as multi-hot labels over the 80 categories (ordered by id);
    images without annotations keep an all-zero label. train/val: train2014 split 90/10 by
    seed; test: val2014."""
    if req.root is None:
        raise DatasetNotFoundError("coco: data.root is not set; point it at the folder that "
                                   "holds annotations/ and train2014/, val2014/")
    part = "val2014" if req.split == "test" else "train2014"
    ann = _need(req.root / "annotations" / f"instances_{part}.json", "COCO annotations")
    try:
        data = json.loads(ann.read_text())
        cats = sorted(c["id"] for c in data["categories"])
        names = {c["id"]: c["name"] for c in data["categories"]}
        images = {im["id"]: im["file_name"] for im in data["images"]}
        pairs = [(a["image_id"], a["category_id"]) for a in data["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"coco: malformed annotations {ann}: {err}") from None
    ids = sorted(images)
    if req.split != "test":
        ids = [int(i) for i in _split_ids([str(i) for i in ids], req.split, req.seed, "coco-val")]
    row = {image_id: i for i, image_id in enumerate(ids)}
    col = {c: j for j, c in enumerate(cats)}
    labels = np.zeros((len(ids), len(cats)), dtype=np.float32)
    for image_id, cat in pairs:
        if image_id in row:
            labels[row[image_id], col[cat]] = 1.0
    files = [req.root / part / images[i] for i in ids]
    return _limit(MultiLabelFiles(req.name, files, labels, [names[c] for c in cats],
                                  req.image_size, req.channels), req.limit)


def _limit(ds: MultiLabelFiles, limit: int | None) -> MultiLabelFiles:
    if limit is not None:
        ds.files, ds.labels = ds.files[:limit], ds.labels[:limit]
    return ds


def _entry(name: str, role: str, count: int | None, description: str,
           source: str = "builtin") -> DatasetEntry:
    return DatasetEntry(name, role, source, description, count)  # type: ignore[arg-type]


_OOD_MOSAICS = (
    ("mosaic_holdout", "ood_test", 500, "holdout", "2x2 mosaics of held-out digits 8 and 9"),
    ("mosaic_letters", "ood_test", 500, "letters", "2x2 mosaics of `letters` tiles"),
    ("mosaic_photos", "ood_test", 500, "photos", "2x2 mosaics of `photos` tiles"),
    ("mosaic_val_letters", "ood_val", 500, "val_letters", "2x2 mosaics of `val_letters` tiles"),
    ("mosaic_val_noise", "ood_val", 500, "val_noise", "2x2 mosaics of `val_noise` tiles"),
    ("mosaic_val_fashion", "ood_val", 500, FASHION_VAL_SHIFT, "2x2 mosaics of shifted "
     "fashion_mnist val garments (the fashion_val_* tiles: blurred, upside down, "
     "patch-shuffled, chimeras); near-shift validation for fashion mosaics"),
    ("mosaic_oe_textures", "oe", 2000, "oe_textures", "2x2 mosaics of `oe_textures` tiles"),
    ("mosaic_oe_symbols", "oe", 2000, "oe_symbols", "2x2 mosaics of `oe_symbols` tiles"),
    ("mosaic_oe_noise", "oe", 2000, "oe_noise", "2x2 mosaics of `oe_noise` tiles"),
    ("mosaic_oe_digits8x8", "oe", 2000, "oe_digits8x8", "2x2 mosaics of `oe_digits8x8` tiles"),
)

BALANCED_COUNT = BALANCED_SINGLE_ROUNDS * len(fashion.CLASSES) * 2

DATASETS: list[tuple[DatasetEntry, Callable]] = [
    (_entry("mnist_mosaic", "id", sum(SIZES.values()),
            "multi-label 2x2 mosaics (56 px) of digits 0-7, long-tailed (imbalance_ratio, "
            "default 10), split 3000/500/1000, tiles from the matching mnist split"),
     load_id_mosaic),
    (_entry("fashion_mosaic", "id", sum(FASHION_SIZES.values()),
            "multi-label 2x2 mosaics (56 px) of the 10 fashion_mnist classes, long-tailed "
            "(imbalance_ratio, default 50), split 20000/2000/4000, tiles from the matching split"),
     _id_mosaic_loader(FASHION_MOSAIC)),
    (_entry("fashion_mosaic_balanced", "id", BALANCED_COUNT,
            "class-balanced fashion mosaics for evaluation: 1 or 2 garments each, every class "
            "in 300 of 2000 mosaics per split, tiles from the matching fashion_mnist split"),
     _id_mosaic_loader(FASHION_MOSAIC, balanced_mosaics)),
    (_entry("fashion_mosaic_lt", "id", FASHION_SIZES["train"] + FASHION_SIZES["val"]
            + BALANCED_COUNT // 2,
            "fashion_mosaic train/val (long-tailed, imbalance_ratio, default 50) with the "
            "class-balanced fashion_mosaic_balanced test split (2000 mosaics, 1-2 garments)"),
     _id_mosaic_loader(FASHION_MOSAIC, long_tail_then_balanced)),
    *((_entry(n, role, count, desc + " (tile blank p=0.25; no ID class)"),
       _ood_mosaic(src, count)) for n, role, count, src, desc in _OOD_MOSAICS),
    (_entry("voc", "id", None, "PASCAL VOC 2012 multi-label from <root>/VOCdevkit/VOC2012",
            "external"), load_voc),
    (_entry("coco", "id", None, "MS-COCO 2014 multi-label from <root>/annotations + images",
            "external"), load_coco),
]

__all__ = ["DATASETS", "FASHION_MOSAIC", "MNIST_MOSAIC", "MosaicSource", "MultiLabelDataset",
           "balanced_mosaics", "balanced_plan", "class_counts", "class_probs", "id_mosaics",
           "long_tail_then_balanced", "tile_plan"]
