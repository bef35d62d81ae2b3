"""Datasets: built-in sets (counts, determinism, splits, holdout, cache) and external loaders."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodlab.data import (
    DataError,
    DatasetNotFoundError,
    ExternalImageDataset,
    ImageDataset,
    builtin,
    get_dataset,
    list_datasets,
)

GENERATED = {
    "letters": 1000,
    "photos": 1000,
    "gaussian": 1000,
    "rademacher": 1000,
    "blobs": 1000,
    "synth_textures": 1000,
    "val_letters": 500,
    "val_photos": 500,
    "val_noise": 500,
    "oe_textures": 2000,
    "oe_digits8x8": 2000,
    "oe_symbols": 2000,
    "oe_noise": 2000,
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module, so every set is built once."""
    return tmp_path_factory.mktemp("cache")


def _mnist(cache: Path, split: str = "test", **kw) -> ImageDataset:
    return get_dataset("mnist", split=split, cache_dir=cache, **kw)


# ----------------------------------------------------------------------- counts and values


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_sets_count_shape_range_and_labels(cache: Path, name: str) -> None:
    ds = get_dataset(name, cache_dir=cache)
    entry = {e.name: e for e in list_datasets()}[name]
    assert len(ds) == GENERATED[name] == entry.count
    assert ds.images.shape == (len(ds), 28, 28, 1) and ds.images.dtype == np.uint8
    assert (ds.labels == -1).all() and ds.classes == [] and ds.name == name
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0
    assert y.dtype == torch.int64 and y.item() == -1
    # no constant images, and not all images alike
    flat = ds.images.reshape(len(ds), -1).astype(np.float32)
    assert (flat.std(axis=1) > 0).all()
    assert len(np.unique(flat[:50], axis=0)) == 50


def test_synth_textures_are_disjoint_from_oe_textures(cache: Path) -> None:
    test = get_dataset("synth_textures", cache_dir=cache).images
    oe = get_dataset("oe_textures", cache_dir=cache).images
    assert not {im.tobytes() for im in test} & {im.tobytes() for im in oe}
    # regular patterns: strong periodic structure, both dark and bright pixels in most images
    spread = test.reshape(len(test), -1).astype(float)
    assert (np.percentile(spread, 90, axis=1) - np.percentile(spread, 10, axis=1) > 60).mean() > 0.9


def test_rendered_sets_have_dark_background(cache: Path) -> None:
    for name in ("letters", "val_letters", "oe_symbols", "oe_digits8x8"):
        images = get_dataset(name, cache_dir=cache).images
        assert np.median(images) == 0, name
        assert (images.max(axis=(1, 2, 3)) >= 128).mean() > 0.99, name


def test_noise_statistics(cache: Path) -> None:
    rad = get_dataset("rademacher", cache_dir=cache).images
    assert set(np.unique(rad)) == {0, 255}
    assert abs((rad == 255).mean() - 0.5) < 0.01
    gauss = get_dataset("gaussian", cache_dir=cache).images / 255.0
    assert abs(gauss.mean() - 0.5) < 0.01
    assert 0.2 < gauss.std() < 0.25  # 0.25 before clipping


def test_mnist_splits_counts_disjoint_and_stratified(cache: Path) -> None:
    sets = {s: _mnist(cache, s) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in sets.items()} == {"train": 3500, "val": 500, "test": 1000}
    for s, per_class in {"train": 350, "val": 50, "test": 100}.items():
        assert np.bincount(sets[s].labels).tolist() == [per_class] * 10
        assert sets[s].classes == [str(d) for d in range(10)]
    keys = {s: {d.tobytes() for d in ds.images} for s, ds in sets.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    x, y = sets["train"][0]
    assert x.shape == (1, 28, 28) and y.dtype == torch.int64 and 0 <= y.item() < 10


def test_mnist_split_indices_partition_everything() -> None:
    labels = np.repeat(np.arange(10), 500)
    parts = builtin.mnist_split_indices(labels, seed=3)
    together = np.concatenate(list(parts.values()))
    assert sorted(together.tolist()) == list(range(5000))


# -------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(cache: Path, tmp_path: Path) -> None:
    again = tmp_path / "fresh"
    for name in ("letters", "photos", "blobs", "oe_symbols"):
        a = get_dataset(name, cache_dir=cache, seed=0)
        b = get_dataset(name, cache_dir=again, seed=0)  # rebuilt from scratch
        assert a.images.tobytes() == b.images.tobytes(), name
    assert _mnist(cache).images.tobytes() == _mnist(again).images.tobytes()


def test_different_seed_gives_different_data(cache: Path) -> None:
    test0, test1 = _mnist(cache, seed=0), _mnist(cache, seed=1)
    assert {d.tobytes() for d in test0.images} != {d.tobytes() for d in test1.images}
    g0 = get_dataset("gaussian", cache_dir=cache, seed=0).images
    g1 = get_dataset("gaussian", cache_dir=cache, seed=1).images
    assert not np.array_equal(g0, g1)


def test_limit_takes_the_first_samples(cache: Path) -> None:
    full, head = _mnist(cache, "train"), _mnist(cache, "train", limit=64)
    assert len(head) == 64
    assert np.array_equal(head.images, full.images[:64])
    assert np.array_equal(head.labels, full.labels[:64])
    assert len(get_dataset("oe_noise", cache_dir=cache, limit=10)) == 10


# ---------------------------------------------------------------------------------- holdout


def test_holdout_removes_and_remaps(cache: Path) -> None:
    full = _mnist(cache, "train")
    held = _mnist(cache, "train", holdout_classes=[9, 3])
    assert held.classes == ["0", "1", "2", "4", "5", "6", "7", "8"]
    assert len(held) == 3500 - 2 * 350
    assert sorted(np.unique(held.labels).tolist()) == list(range(8))
    # same images in the same order, digits 4..8 shifted down by one
    kept = np.isin(full.labels, [3, 9], invert=True)
    assert np.array_equal(held.images, full.images[kept])
    remap = {0: 0, 1: 1, 2: 2, 4: 3, 5: 4, 6: 5, 7: 6, 8: 7}
    assert held.labels.tolist() == [remap[int(d)] for d in full.labels[kept]]


def test_near_ood_is_test_split_of_held_out_digits(cache: Path) -> None:
    near = get_dataset("mnist_holdout", holdout_classes=[8, 9], cache_dir=cache, split="train")
    assert len(near) == 200 and (near.labels == -1).all() and near.classes == []
    test = _mnist(cache)
    test_89 = {d.tobytes() for d, y in zip(test.images, test.labels, strict=True) if y >= 8}
    assert {d.tobytes() for d in near.images} == test_89
    with pytest.raises(DataError, match="holdout_classes"):
        get_dataset("mnist_holdout", cache_dir=cache)


def test_bad_holdout_is_an_error(cache: Path) -> None:
    with pytest.raises(DataError, match="holdout_classes"):
        _mnist(cache, holdout_classes=[10])
    with pytest.raises(DataError, match="holdout_classes"):
        _mnist(cache, holdout_classes=list(range(9)))


# ------------------------------------------------------------------------------------ cache


def test_second_call_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_dataset("val_letters", cache_dir=tmp_path)
    path = builtin.cache_path(tmp_path, "val_letters", 0)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    stamp = path.stat().st_mtime_ns
    calls = []
    real = builtin.cached

    def spy(path, build):
        calls.append(path)
        return real(path, lambda: pytest.fail("cache miss: the set was rebuilt"))

    monkeypatch.setattr(builtin, "cached", spy)
    again = get_dataset("val_letters", cache_dir=tmp_path)
    assert calls == [path] and path.stat().st_mtime_ns == stamp
    assert np.array_equal(first.images, again.images)


def test_truncated_cache_is_rebuilt(tmp_path: Path) -> None:
    good = get_dataset("blobs", cache_dir=tmp_path).images.copy()
    path = builtin.cache_path(tmp_path, "blobs", 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = get_dataset("blobs", cache_dir=tmp_path).images
    assert np.array_equal(rebuilt, good)
    assert any("corrupt" in str(w.message) for w in caught)
    assert path.read_bytes() == data  # rewritten whole
    assert not list(tmp_path.glob("*.tmp"))


def test_default_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OODLAB_CACHE", str(tmp_path))
    get_dataset("rademacher", limit=3)
    assert builtin.cache_path(tmp_path, "rademacher", 0).is_file()


# ------------------------------------------------------------------------------- transforms


def test_channels_and_size_transforms(cache: Path) -> None:
    gray = _mnist(cache, limit=8)
    rgb = _mnist(cache, limit=8, channels=3, image_size=32)
    assert rgb.images.shape == (8, 32, 32, 3)
    x, _ = rgb[0]
    assert x.shape == (3, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # gray repeated
    small = _mnist(cache, limit=8, image_size=14)
    assert small[0][0].shape == (1, 14, 14)
    # antialiased downscale keeps the mean brightness
    assert abs(small.images.mean() - gray.images.mean()) < 2.0
    xs, ys = rgb.tensors()
    assert xs.shape == (8, 3, 32, 32) and torch.equal(xs[3], rgb[3][0])
    assert torch.equal(ys, torch.as_tensor(rgb.labels))


def test_rgb_to_gray_uses_luminance() -> None:
    from oodlab.data.types import to_channels

    rgb = np.array([[[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]], dtype=np.uint8)
    assert to_channels(rgb, 1)[0, 0, :, 0].tolist() == [76, 150, 29]


def test_bad_options_name_the_field(cache: Path) -> None:
    with pytest.raises(DataError, match="split"):
        get_dataset("mnist", split="dev", cache_dir=cache)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="channels"):
        get_dataset("mnist", channels=2, cache_dir=cache)
    with pytest.raises(DataError, match="image_size"):
        get_dataset("mnist", image_size=0, cache_dir=cache)
    with pytest.raises(DataError, match="limit"):
        get_dataset("mnist", limit=0, cache_dir=cache)


# ---------------------------------------------------------------------------------- registry


def test_list_datasets_roles() -> None:
    entries = list_datasets()
    names = [e.name for e in entries]
    assert len(names) == len(set(names))  # one role per name
    by_role = {r: {e.name for e in entries if e.role == r} for r in ("id", "ood_test", "ood_val")}
    by_role["oe"] = {e.name for e in entries if e.role == "oe"}
    assert {"mnist"} <= by_role["id"]
    assert {"letters", "photos", "gaussian", "rademacher", "blobs"} <= by_role["ood_test"]
    assert {"fashion_mnist", "fashion_mosaic", "fashion_mosaic_balanced"} <= by_role["id"]
    assert {"synth_textures", "fashion_mnist_holdout"} <= by_role["ood_test"]
    assert by_role["ood_val"] == {"val_letters", "val_photos", "val_noise", "mosaic_val_letters",
                                  "mosaic_val_noise", "mosaic_val_fashion", "fashion_val_blur",
                                  "fashion_val_vflip", "fashion_val_patchperm", "fashion_val_mix"}
    assert {"oe_textures", "oe_digits8x8", "oe_symbols", "oe_noise"} <= by_role["oe"]
    assert {n for n in by_role["oe"] if not n.startswith("mosaic_")} == {
        "oe_textures", "oe_digits8x8", "oe_symbols", "oe_noise"}
    tests, vals, oes = by_role["ood_test"], by_role["ood_val"], by_role["oe"]
    assert not tests & vals and not tests & oes and not vals & oes
    for e in entries:
        assert e.description and "\n" not in e.description
        if e.source == "external":
            assert e.count is None
        elif not e.name.endswith("_holdout"):  # its size depends on holdout_classes
            assert isinstance(e.count, int) and e.count > 0


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(DataError) as err:
        get_dataset("not_a_set")
    msg = str(err.value)
    assert "not_a_set" in msg
    assert all(e.name in msg for e in list_datasets())


# ---------------------------------------------------------------------------------- external


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "test_32x32.mat"),
        ("mnist_full", "MNIST/raw"),
        ("textures", "dtd"),
    ],
)
def test_missing_external_root_names_the_path(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        get_dataset(name, root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path.resolve()) in msg and expected in msg
    assert "never downloaded" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_external_without_root_is_an_error() -> None:
    with pytest.raises(DatasetNotFoundError, match="root"):
        get_dataset("cifar10")


def _png(path: Path, value: int, rgb: bool = True, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3) if rgb else (size[1], size[0]), value, dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _tree(root: Path) -> Path:
    for i in range(3):
        _png(root / "cats" / f"c{i}.png", 40 + i)
        _png(root / "dogs" / f"d{i}.png", 200 + i, rgb=False)
    return root


def test_imagefolder_tiny_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree")
    ds = get_dataset("imagefolder", root=root, image_size=16, channels=3)
    assert isinstance(ds, ExternalImageDataset)
    assert len(ds) == 6 and ds.classes == ["cats", "dogs"] and ds.name == "imagefolder"
    seen = {}
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        seen[int(y)] = x
    assert set(seen) == {0, 1}
    assert seen[0].max() < 0.2 and seen[1].min() > 0.75  # dark cats, bright dogs
    gray = get_dataset("imagefolder", root=root, image_size=28, channels=1, limit=2)
    assert len(gray) == 2 and gray[0][0].shape == (1, 28, 28)


def test_imagefolder_split_layout(tmp_path: Path) -> None:
    root = tmp_path / "split"
    for i in range(10):
        _png(root / "train" / ("a" if i % 2 else "b") / f"{i}.png", 10 * i)
    _tree(root / "test")
    train = get_dataset("imagefolder", root=root, split="train")
    val = get_dataset("imagefolder", root=root, split="val")
    test = get_dataset("imagefolder", root=root, split="test")
    assert (len(train), len(val), len(test)) == (9, 1, 6)
    assert not set(train.indices.tolist()) & set(val.indices.tolist())


def test_imagefolder_corrupt_png_names_the_file(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree")
    bad = root / "dogs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = get_dataset("imagefolder", root=root)
    with pytest.raises(DataError) as err:
        for i in range(len(ds)):
            ds[i]
    assert str(bad) in str(err.value)


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=str(missing)):
        get_dataset("imagefolder", root=missing)


def _idx(path: Path, array: np.ndarray) -> None:
    """Write an uncompressed MNIST idx-ubyte file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, n_train: int = 20, n_test: int = 10) -> None:
    raw = root / "MNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.repeat(labels * 25, 28 * 28).reshape(n, 28, 28)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


def test_external_mnist_full_splits_and_holdout(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    train = get_dataset("mnist_full", root=tmp_path, split="train")
    val = get_dataset("mnist_full", root=tmp_path, split="val")
    test = get_dataset("mnist_full", root=tmp_path, split="test", image_size=32, channels=3)
    assert (len(train), len(val), len(test)) == (18, 2, 10)
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert len(train.classes) == 10
    x, y = test[0]
    assert x.shape == (3, 32, 32) and 0 <= y.item() < 10
    assert x.mean().item() == pytest.approx(y.item() * 25 / 255, abs=1e-6)  # label-coded images
    held = get_dataset("mnist_full", root=tmp_path, split="test", holdout_classes=[0, 1])
    assert len(held) == 8 and sorted(set(held.labels.tolist())) == list(range(8))
    reseeded = get_dataset("mnist_full", root=tmp_path, split="val", seed=1)
    assert set(reseeded.indices.tolist()) != set(val.indices.tolist())


def test_corrupt_external_files_are_a_data_error(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"junk")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        get_dataset("cifar10", root=tmp_path)


@pytest.mark.parametrize("world_size", [1, 2])
def test_loader_processes_give_the_same_batches(world_size: int) -> None:
    """resources.loader_workers moves decoding to other processes, never the data: the same
    (seed, epoch, rank) gives the same batches with and without them."""
    from oodlab.data.bundle import set_epoch, train_loader

    rng = np.random.default_rng(0)
    ds = ImageDataset("toy", rng.integers(0, 256, (96, 8, 8, 1), dtype=np.uint8),
                      np.arange(96) % 4, ["a", "b", "c", "d"])

    def batches(workers: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader, sampler = train_loader(ds, 16, seed=3, rank=world_size - 1,
                                       world_size=world_size, workers=workers)
        set_epoch(sampler, 3, epoch)
        return list(loader)

    for epoch in (0, 1):
        plain, forked = batches(0, epoch), batches(1, epoch)
        assert len(plain) == len(forked) == 96 // world_size // 16
        for (x0, y0), (x1, y1) in zip(plain, forked, strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(batches(0, 0)[0][0], batches(0, 1)[0][0])  # epochs differ
