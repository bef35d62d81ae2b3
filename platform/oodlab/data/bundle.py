"""All datasets one experiment needs, by role, and the seeded loaders the train loop uses.

Test OOD sets come grouped as in OpenOOD v1.5 (Zhang et al. 2023): ``near`` (semantic shift
with similar low-level statistics), ``far`` (different domains) and ``sanity`` (noise, never
part of a headline mean); a spec that lists plain ``data.test_ood`` keeps its sets ungrouped.
A dataset whose registered role is ``id`` (``mnist`` when the ID set is ``fashion_mnist``) can
be an OOD set: its test split is used, with held-out classes ignored and every label -1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, RandomSampler

from oodlab.data.registry import get_dataset, list_datasets
from oodlab.data.types import ImageDataset

if TYPE_CHECKING:
    from oodlab.spec import DataSpec, ExperimentSpec


@dataclass
class DataBundle:
    """ID splits, validation OOD sets (model selection), test OOD sets (scored once), OE."""

    id_train: Dataset
    id_val: Dataset
    id_test: Dataset | None
    num_classes: int
    val_ood: dict[str, Dataset] = field(default_factory=dict)
    test_ood: dict[str, Dataset] = field(default_factory=dict)
    oe: Dataset | None = None
    oe_sets: dict[str, Dataset] = field(default_factory=dict)  # the OE candidates, by name
    # test set names by group: "near", "far", "sanity" (OpenOOD-style) or "ungrouped"
    test_groups: dict[str, list[str]] = field(default_factory=dict)


class _AsOOD(Dataset):
    """Any dataset with every label replaced by -1 (an ID-role set used as OOD)."""

    def __init__(self, base: Dataset) -> None:
        self.base, self.name, self.classes = base, getattr(base, "name", "?"), []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        return self.base[index][0], torch.tensor(-1, dtype=torch.int64)


def as_ood(ds: Dataset) -> Dataset:
    """The same images with labels -1 (an in-memory copy of the labels, images shared)."""
    if isinstance(ds, ImageDataset) and not getattr(ds, "multilabel", False):
        return ImageDataset(ds.name, ds.images, np.full(len(ds), -1, dtype=np.int64), [])
    return _AsOOD(ds)


def _load(name: str, data: DataSpec, seed: int, split: str = "test"):
    return get_dataset(
        name, split=split, root=data.root, image_size=data.image_size, channels=data.channels,
        seed=seed, holdout_classes=tuple(data.holdout_classes), cache_dir=data.cache_dir,
        limit=data.limit, imbalance_ratio=data.imbalance_ratio,
    )


def load_ood(name: str, data: DataSpec, seed: int) -> Dataset:
    """An OOD set: its own loader, or the test split of an ID-role set with labels -1."""
    roles = {d.name: d.role for d in list_datasets()}
    if roles.get(name) != "id":
        return _load(name, data, seed)
    return as_ood(get_dataset(
        name, split="test", root=data.root, image_size=data.image_size, channels=data.channels,
        seed=seed, cache_dir=data.cache_dir, limit=data.limit,
        imbalance_ratio=data.imbalance_ratio))


def test_ood_groups(data: DataSpec) -> dict[str, list[str]]:
    """Test OOD set names by group (``near``, ``far``, ``sanity``; ``ungrouped`` for plain
    ``data.test_ood``), plus the held-out classes ``<id>_holdout`` when the spec holds some
    out: in ``near`` when groups are used, else ungrouped."""
    groups = {"near": list(data.near_ood), "far": list(data.far_ood),
              "sanity": list(data.sanity_ood), "ungrouped": list(data.test_ood)}
    holdout = f"{data.id}_holdout"
    known = {d.name for d in list_datasets()}
    if data.holdout_classes and holdout in known and not any(holdout in g
                                                             for g in groups.values()):
        groups["near" if groups["near"] or groups["far"] else "ungrouped"].append(holdout)
    return {g: names for g, names in groups.items() if names}


def test_ood_names(data: DataSpec) -> list[str]:
    """Every test OOD set (all groups, in order), with the held-out-class set if any."""
    return [n for names in test_ood_groups(data).values() for n in names]


def load_bundle(spec: ExperimentSpec, *, include_test: bool = True) -> DataBundle:
    """Load every dataset of the spec. ``include_test=False`` skips test sets (training)."""
    data, seed = spec.data, spec.seed
    if data.root and data.root.startswith("s3://"):  # stage the S3 prefix on this node
        from oodlab.cluster.storage import stage

        cache = Path(data.cache_dir) if data.cache_dir else spec.workdir_path / "cache"
        data = data.model_copy(update={"root": str(stage(data.root, cache / "s3").root)})
    id_train = _load(data.id, data, seed, "train")
    bundle = DataBundle(
        id_train=id_train,
        id_val=_load(data.id, data, seed, "val"),
        id_test=_load(data.id, data, seed, "test") if include_test else None,
        num_classes=len(id_train.classes),
        val_ood={n: load_ood(n, data, seed) for n in data.val_ood},
    )
    if include_test:
        bundle.test_groups = test_ood_groups(data)
        bundle.test_ood = {n: load_ood(n, data, seed) for n in test_ood_names(data)}
    if data.oe:
        bundle.oe_sets = {n: _load(n, data, seed) for n in data.oe}
        bundle.oe = ConcatDataset(list(bundle.oe_sets.values()))
    return bundle


def train_loader(ds: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, workers: int = 0
                 ) -> tuple[DataLoader, DistributedSampler | RandomSampler]:
    """A shuffling loader whose order depends only on (seed, epoch, rank).

    Returns the sampler too: call ``sampler.set_epoch(epoch)`` (distributed) or reseed the
    generator via :func:`set_epoch` before each epoch, so a resumed run sees the same order.
    ``workers`` > 0 reads and decodes in that many persistent processes; the sampler (the
    order) stays in this process, and no dataset draws random numbers, so the batches are the
    same with or without them.
    """
    if world_size > 1:
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=seed, drop_last=drop_last)
    else:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                        num_workers=workers, persistent_workers=workers > 0)
    return loader, sampler


def set_epoch(sampler: DistributedSampler | RandomSampler, seed: int, epoch: int) -> None:
    """Make the epoch's shuffle a function of (seed, epoch) for either sampler type."""
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    else:
        sampler.generator.manual_seed(seed * 100_003 + epoch)


def eval_loader(ds: Dataset, batch_size: int) -> DataLoader:
    """A deterministic, non-shuffled loader for scoring."""
    return DataLoader(ds, batch_size=batch_size, shuffle=False)
