"""Multi-label data: long-tailed mosaics, labels that match the tiles, VOC/COCO parsers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from oodlab.data import get_dataset
from oodlab.data.builtin import mnist_arrays
from oodlab.data.fashion import fashion_pool
from oodlab.data.multilabel import (
    FASHION_MOSAIC,
    HOLDOUT,
    ID_CLASSES,
    balanced_mosaics,
    balanced_plan,
    class_counts,
    class_probs,
    id_mosaics,
    tile_plan,
)
from oodlab.data.types import DataError, DatasetNotFoundError, LoadRequest
from tests.helpers import DATA_CACHE
from tests.test_fashion_mnist import write_fashion


def _req(split="train", rho=10.0, seed=0) -> LoadRequest:
    return LoadRequest(name="mnist_mosaic", role="id", split=split, root=None, image_size=56,
                       channels=1, seed=seed, holdout_classes=(), cache_dir=DATA_CACHE,
                       limit=None, imbalance_ratio=rho)


def test_class_probs_follow_the_imbalance_ratio():
    p = class_probs(10.0)
    assert p[0] / p[-1] == pytest.approx(10.0)
    assert (np.diff(p) < 0).all()
    assert class_probs(1.0) == pytest.approx(np.full(ID_CLASSES, 1 / ID_CLASSES))


def test_tile_frequencies_on_a_large_sample():
    plan = tile_plan(np.random.default_rng(0), 20000, class_probs(10.0))
    counts = np.bincount(plan[plan >= 0], minlength=ID_CLASSES)
    assert counts[0] / counts[7] == pytest.approx(10.0, rel=0.15)
    assert (plan >= 0).any(1).all()  # at least one digit per mosaic
    assert (plan < 0).mean() == pytest.approx(0.25, abs=0.02)


def test_labels_are_exactly_the_tiles_placed_and_from_the_right_split():
    images, labels, splits = mnist_arrays(_req())
    mosaics, multi_hot, src = id_mosaics(_req("train"))
    train = set(splits["train"].tolist())
    for i in range(200):
        placed = {int(labels[s]) for s in src[i] if s >= 0}
        assert placed == set(np.flatnonzero(multi_hot[i]).tolist())
        assert all(int(s) in train for s in src[i] if s >= 0)
        for t, s in enumerate(src[i]):  # the pixels really are that digit (or blank)
            r, q = divmod(t, 2)
            tile = mosaics[i, r * 28:(r + 1) * 28, q * 28:(q + 1) * 28]
            assert (tile == (images[s] if s >= 0 else 0)).all()
    test_src = id_mosaics(_req("test"))[2]
    assert set(test_src[test_src >= 0].tolist()) <= set(splits["test"].tolist())


def test_mosaic_dataset_counts_determinism_and_long_tail():
    a = get_dataset("mnist_mosaic", split="train", cache_dir=DATA_CACHE, image_size=28)
    b = get_dataset("mnist_mosaic", split="train", cache_dir=DATA_CACHE, image_size=28)
    assert len(a) == 3000 and a.images.shape == (3000, 28, 28, 1)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    x, y = a[0]
    assert x.shape == (1, 28, 28) and y.shape == (ID_CLASSES,) and y.dtype.is_floating_point
    counts = class_counts(a)
    assert (np.diff(counts) < 0).all() and counts[0] > 5 * counts[-1]
    flat = class_counts(get_dataset("mnist_mosaic", split="train", cache_dir=DATA_CACHE,
                                    imbalance_ratio=1.0))
    assert flat.max() / flat.min() < 1.3
    other_seed = get_dataset("mnist_mosaic", split="train", cache_dir=DATA_CACHE, seed=1)
    assert not np.array_equal(a.labels, other_seed.labels)


# ------------------------------------------------------------------- Fashion-MNIST mosaics


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("fmnist-mosaic"))


def _freq(name, root, split="train", rho=None, **kw):
    req = LoadRequest(name=name, role="id", split=split, root=root, image_size=56, channels=1,
                      seed=0, holdout_classes=(), cache_dir=DATA_CACHE, limit=None,
                      imbalance_ratio=rho)
    _, labels, _ = fashion_pool(req)
    return req, labels


@pytest.mark.parametrize(("rho", "expected"), [(None, 50.0), (100.0, 100.0)])
def test_fashion_mosaic_long_tail(fashion_root, rho, expected):
    req, labels = _freq("fashion_mosaic", fashion_root, rho=rho)
    _, multi_hot, src = id_mosaics(req, FASHION_MOSAIC)
    assert len(src) == FASHION_MOSAIC.sizes["train"] and multi_hot.shape[1] == 10
    tiles = np.bincount(labels[src[src >= 0]], minlength=10)
    assert tiles[0] / tiles[9] == pytest.approx(expected, rel=0.25)  # ρ = head / tail
    assert (np.diff(multi_hot.sum(0)) < 0).all()  # strictly long-tailed
    ds = get_dataset("fashion_mosaic", split="train", root=fashion_root, image_size=28,
                     imbalance_ratio=rho)
    assert len(ds) == 20000 and ds.classes[0] == "T-shirt/top" and ds.images.shape[1] == 28
    assert np.array_equal(ds.labels, multi_hot)


def test_fashion_mosaic_tiles_come_from_the_split(fashion_root):
    req, labels = _freq("fashion_mosaic", fashion_root, split="test")
    _, _, splits = fashion_pool(req)
    mosaics, multi_hot, src = id_mosaics(req, FASHION_MOSAIC)
    assert set(src[src >= 0].tolist()) <= set(splits["test"].tolist())
    for i in range(100):
        assert {int(labels[s]) for s in src[i] if s >= 0} == set(np.flatnonzero(multi_hot[i]))


def test_balanced_fashion_mosaics_have_fixed_cardinality(fashion_root):
    req, labels = _freq("fashion_mosaic_balanced", fashion_root, split="test")
    images, _, splits = fashion_pool(req)
    mosaics, multi_hot, src = balanced_mosaics(req)
    cardinality = multi_hot.sum(1)
    assert len(mosaics) == 2000 and set(cardinality.tolist()) == {1.0, 2.0}
    assert (cardinality == 1).sum() == 1000 and (cardinality == 2).sum() == 1000
    assert multi_hot.sum(0).tolist() == [300] * 10  # >= 200 images per class
    assert ((multi_hot[cardinality == 1]).sum(0) == 100).all()
    assert set(src[src >= 0].tolist()) <= set(splits["test"].tolist())
    for i in range(100):  # labels are the tiles placed, and the pixels are those images
        assert {int(labels[s]) for s in src[i] if s >= 0} == set(np.flatnonzero(multi_hot[i]))
        for t, s in enumerate(src[i]):
            r, q = divmod(t, 2)
            tile = mosaics[i, r * 28:(r + 1) * 28, q * 28:(q + 1) * 28]
            assert (tile == (images[s] if s >= 0 else 0)).all()
    ds = get_dataset("fashion_mosaic_balanced", split="test", root=fashion_root, image_size=56)
    assert len(ds) == 2000 and class_counts(ds).tolist() == [300] * 10
    again = get_dataset("fashion_mosaic_balanced", split="test", root=fashion_root,
                        image_size=56)
    other = get_dataset("fashion_mosaic_balanced", split="test", root=fashion_root,
                        image_size=56, seed=1)
    assert np.array_equal(ds.images, again.images) and not np.array_equal(ds.labels, other.labels)


def test_balanced_plan_never_pairs_a_class_with_itself():
    plan = balanced_plan(np.random.default_rng(0), 7, single_rounds=3, pair_rounds=5)
    assert plan.shape == (7 * 3 + 7 * 5, 4)
    for row in plan:
        objects = row[row >= 0]
        assert 1 <= len(objects) <= 2 and len(set(objects.tolist())) == len(objects)
    assert np.bincount(plan[plan >= 0], minlength=7).tolist() == [3 + 2 * 5] * 7


def test_ood_mosaics_hold_no_id_digit():
    images, labels, splits = mnist_arrays(_req())
    held = get_dataset("mosaic_holdout", cache_dir=DATA_CACHE, image_size=56)
    assert len(held) == 500 and (held.labels == -1).all()
    # every non-blank tile of mosaic_holdout is a test-split 8 or 9
    pool = images[splits["test"][np.isin(labels[splits["test"]], HOLDOUT)]]
    pool_bytes = {p.tobytes() for p in pool}
    for m in held.images[:50, :, :, 0]:
        for r in range(2):
            for q in range(2):
                tile = m[r * 28:(r + 1) * 28, q * 28:(q + 1) * 28]
                assert not tile.any() or tile.tobytes() in pool_bytes
    with pytest.raises(DataError, match="holdout_classes"):
        get_dataset("mnist_mosaic", holdout_classes=[3], cache_dir=DATA_CACHE)


def test_fashion_validation_mosaics_hold_only_shifted_val_garments(fashion_root):
    from dataclasses import replace

    from oodlab.data.fashion import VAL_OOD, val_ood_images

    ds = get_dataset("mosaic_val_fashion", root=fashion_root, image_size=56)
    assert len(ds) == 500 and (ds.labels == -1).all()
    req, _ = _freq("mosaic_val_fashion", fashion_root, split="test")
    kinds = {name: {t.tobytes() for t in val_ood_images(replace(req, name=name))[0]}
             for name in VAL_OOD}
    garments, _, _ = fashion_pool(req)
    plain = {g.tobytes() for g in garments}
    seen = set()
    for m in ds.images[:, :, :, 0]:
        for r in range(2):
            for q in range(2):
                tile = m[r * 28:(r + 1) * 28, q * 28:(q + 1) * 28].tobytes()
                if not any(tile):
                    continue
                found = [name for name, tiles in kinds.items() if tile in tiles]
                assert found, "a tile that is not a shifted validation garment"
                assert tile not in plain or found == ["fashion_val_mix"], "an unshifted garment"
                seen.update(found)
    assert seen == set(VAL_OOD)  # all four shifts appear


def _jpeg(path, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), color).save(path)


def _voc_tree(root):
    base = root / "VOCdevkit" / "VOC2012"
    objs = {"a": ["dog", "person"], "b": ["car"], "c": ["car", "car", "tvmonitor"]}
    for image_id, names in objs.items():
        xml = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>"
                      for n in names)
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{xml}</annotation>")
        _jpeg(base / "JPEGImages" / f"{image_id}.jpg", (10, 20, 30))
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "ImageSets" / "Main" / "val.txt").write_text("a\nb\nc\n")
    (base / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\n")
    return base


def test_voc_parser_multi_hot_by_hand(tmp_path):
    base = _voc_tree(tmp_path)
    ds = get_dataset("voc", split="test", root=tmp_path, image_size=16, channels=3)
    assert len(ds) == 3 and ds.classes[7] == "cat" and len(ds.classes) == 20
    # dog = 11, person = 14; car = 6; tvmonitor = 19
    assert np.flatnonzero(ds.labels[0]).tolist() == [11, 14]
    assert np.flatnonzero(ds.labels[1]).tolist() == [6]
    assert np.flatnonzero(ds.labels[2]).tolist() == [6, 19]
    x, y = ds[2]
    assert x.shape == (3, 16, 16) and y.tolist()[19] == 1.0
    (base / "Annotations" / "b.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match="b.xml"):
        get_dataset("voc", split="test", root=tmp_path)
    (base / "Annotations" / "b.xml").write_text("<annotation></annotation>")
    (base / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="a.jpg"):
        get_dataset("voc", split="test", root=tmp_path)[0]


def test_coco_parser_multi_hot_by_hand(tmp_path):
    ann = {"categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"},
                          {"id": 3, "name": "car"}],
           "images": [{"id": 7, "file_name": "x.jpg"}, {"id": 5, "file_name": "y.jpg"},
                      {"id": 9, "file_name": "z.jpg"}],
           "annotations": [{"image_id": 7, "category_id": 18}, {"image_id": 7, "category_id": 1},
                           {"image_id": 5, "category_id": 3}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2014.json").write_text(json.dumps(ann))
    for f in ("x.jpg", "y.jpg", "z.jpg"):
        _jpeg(tmp_path / "val2014" / f, (200, 0, 0))
    ds = get_dataset("coco", split="test", root=tmp_path, image_size=8)
    assert ds.classes == ["person", "car", "dog"]  # ordered by category id 1, 3, 18
    # images sorted by id: 5 (car), 7 (dog + person), 9 (no annotation -> all zero)
    assert ds.labels.tolist() == [[0, 1, 0], [1, 0, 1], [0, 0, 0]]
    (tmp_path / "annotations" / "instances_val2014.json").write_text("{not json")
    with pytest.raises(DataError, match="instances_val2014.json"):
        get_dataset("coco", split="test", root=tmp_path)


def test_missing_roots_name_the_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="VOCdevkit"):
        get_dataset("voc", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="instances_train2014.json"):
        get_dataset("coco", split="train", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="data.root is not set"):
        get_dataset("coco")


def test_fashion_mosaic_lt_trains_long_tailed_and_tests_balanced(fashion_root):
    test = get_dataset("fashion_mosaic_lt", split="test", root=fashion_root, image_size=28)
    balanced = get_dataset("fashion_mosaic_balanced", split="test", root=fashion_root,
                           image_size=28)
    assert np.array_equal(test.labels, balanced.labels)
    assert np.array_equal(test.images, balanced.images)
    train = get_dataset("fashion_mosaic_lt", split="train", root=fashion_root, image_size=28,
                        limit=500)
    lt = get_dataset("fashion_mosaic", split="train", root=fashion_root, image_size=28,
                     limit=500)
    assert np.array_equal(train.labels, lt.labels)
