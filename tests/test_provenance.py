"""Provenance hashes: a split's hash follows its content (images, labels, the indices a
Subset keeps), not its configuration."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Subset

from oodlab.data.types import ImageDataset
from oodlab.detect.provenance import PREFIX, dataset_hash, split_tags


def images(seed: int = 0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    return ImageDataset("toy", rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8),
                        np.arange(20) % 3, ["a", "b", "c"])


def test_the_hash_follows_the_content() -> None:
    base = images()
    assert dataset_hash(base) == dataset_hash(images())  # same content, another object
    pixel, label = images(), images()
    pixel.images[3, 2, 2, 0] ^= 1
    label.labels[5] = (label.labels[5] + 1) % 3
    hashes = {dataset_hash(d) for d in (base, pixel, label, Subset(base, range(10)),
                                        Subset(base, range(1, 11)))}
    assert len(hashes) == 5


def test_split_tags_name_each_split_and_each_group() -> None:
    a, b = images(0), images(1)
    tags = split_tags({"id_train": a, "id_test": None}, {"test_ood": {"x": a, "y": b}})
    assert set(tags) == {PREFIX + "split.id_train", PREFIX + "split.test_ood"}
    swapped = split_tags({}, {"test_ood": {"x": b, "y": a}})  # a set's name is part of it
    assert swapped[PREFIX + "split.test_ood"] != tags[PREFIX + "split.test_ood"]
