"""Fashion-MNIST: idx reading, seeded splits, the missing-package error, validation OOD sets
made from the validation split only, and ID-role sets used as OOD."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from oodlab.data import DataError, DatasetNotFoundError, bundle, fashion, get_dataset
from oodlab.data.types import LoadRequest
from oodlab.spec import DataSpec
from tests.helpers import DATA_CACHE

N_TRAIN_PER_CLASS, N_TEST_PER_CLASS = 24, 5


def _idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                     for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def fashion_image(label: int, serial: int) -> np.ndarray:
    """A 28 x 28 garment stand-in: a bright block whose value codes the label, and a unique
    serial number in the first row (so every image differs and can be traced back)."""
    img = np.zeros((28, 28), dtype=np.uint8)
    img[6:22, 8:20] = 60 + 19 * label
    img[0, :2] = divmod(serial, 256)
    img[27, 27] = 1  # never all-zero
    return img


def write_fashion(folder: Path, train_per_class: int = N_TRAIN_PER_CLASS,
                  test_per_class: int = N_TEST_PER_CLASS) -> Path:
    """A tiny Fashion-MNIST in the original file layout: gzip train files, plain test files."""
    serial = 0
    for prefix, per_class, compress in (("train", train_per_class, True),
                                        ("t10k", test_per_class, False)):
        labels = np.tile(np.arange(10), per_class)
        images = []
        for y in labels:
            images.append(fashion_image(int(y), serial))
            serial += 1
        _idx(folder / f"{prefix}-images-idx3-ubyte", np.stack(images), compress)
        _idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion(tmp_path_factory.mktemp("fmnist"))


def _req(root: Path, name: str = "fashion_mnist", split: str = "train", seed: int = 0
         ) -> LoadRequest:
    return LoadRequest(name=name, role="id", split=split, root=root, image_size=28, channels=1,
                       seed=seed, holdout_classes=(), cache_dir=DATA_CACHE, limit=None)


def _serials(images: np.ndarray) -> set[int]:
    return {int(a) * 256 + int(b) for a, b in images.reshape(len(images), -1)[:, :2]}


# ------------------------------------------------------------------------------------ loading


def test_reads_idx_files_from_data_root(root: Path) -> None:
    sets = {s: get_dataset("fashion_mnist", split=s, root=root) for s in ("train", "val", "test")}
    n_val = round(N_TRAIN_PER_CLASS / 12)  # 1/12 of each class, as 500 of 6,000
    assert {s: len(d) for s, d in sets.items()} == {
        "train": 10 * (N_TRAIN_PER_CLASS - n_val), "val": 10 * n_val,
        "test": 10 * N_TEST_PER_CLASS}
    for ds in sets.values():
        assert ds.classes == list(fashion.CLASSES) and ds.classes[9] == "Ankle boot"
        assert ds.images.shape[1:] == (28, 28, 1) and ds.images.dtype == np.uint8
        # the pixel block codes the label: images and labels stay paired through the shuffle
        assert ((ds.images[:, 10, 10, 0] - 60) // 19 == ds.labels).all()
    assert np.bincount(sets["val"].labels).tolist() == [n_val] * 10
    train, val, test = (_serials(sets[s].images) for s in ("train", "val", "test"))
    assert not train & val and not (train | val) & test
    assert train | val == set(range(10 * N_TRAIN_PER_CLASS))  # the whole training file
    x, y = sets["train"][0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_split_is_seeded(root: Path) -> None:
    a = get_dataset("fashion_mnist", split="val", root=root, seed=0)
    b = get_dataset("fashion_mnist", split="val", root=root, seed=0)
    c = get_dataset("fashion_mnist", split="val", root=root, seed=1)
    assert np.array_equal(a.images, b.images)
    assert _serials(a.images) != _serials(c.images)
    # the test split is always the whole test file (only its order is seeded)
    t0 = get_dataset("fashion_mnist", split="test", root=root, seed=0)
    t1 = get_dataset("fashion_mnist", split="test", root=root, seed=1)
    assert _serials(t0.images) == _serials(t1.images)


def test_limit_size_and_channels(root: Path) -> None:
    full = get_dataset("fashion_mnist", split="train", root=root)
    head = get_dataset("fashion_mnist", split="train", root=root, limit=7, image_size=32,
                       channels=3)
    assert head.images.shape == (7, 32, 32, 3)
    assert np.array_equal(head.labels, full.labels[:7])
    x, _ = head[0]
    assert torch.equal(x[0], x[1]) and x.shape == (3, 32, 32)


def test_torchvision_layout_under_root(tmp_path: Path) -> None:
    write_fashion(tmp_path / "FashionMNIST" / "raw", 12, 2)
    assert len(get_dataset("fashion_mnist", split="test", root=tmp_path)) == 20


def test_holdout_classes(root: Path) -> None:
    held = get_dataset("fashion_mnist", split="train", root=root, holdout_classes=[6, 9])
    assert held.classes == [c for i, c in enumerate(fashion.CLASSES) if i not in (6, 9)]
    assert sorted(set(held.labels.tolist())) == list(range(8))
    near = get_dataset("fashion_mnist_holdout", root=root, holdout_classes=[6, 9])
    assert len(near) == 2 * N_TEST_PER_CLASS and (near.labels == -1).all()
    with pytest.raises(DataError, match="holdout_classes"):
        get_dataset("fashion_mnist", root=root, holdout_classes=[10])


# ----------------------------------------------------------------------------------- errors


def test_missing_files_name_the_package_and_the_paths(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(fashion, "SYSTEM_DIR", system)
    empty = tmp_path / "empty"
    empty.mkdir()
    for kwargs in ({}, {"root": empty}):
        with pytest.raises(DatasetNotFoundError) as err:
            get_dataset("fashion_mnist", **kwargs)
        msg = str(err.value)
        assert "dataset-fashion-mnist" in msg and "apt-get install dataset-fashion-mnist" in msg
        assert str(system) in msg and "train-images-idx3-ubyte" in msg
        assert isinstance(err.value, FileNotFoundError)
    assert str(empty) in msg
    # a folder with only some of the files is not used either
    write_fashion(tmp_path / "partial", 2, 1)
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError, match="partial"):
        get_dataset("fashion_mnist", root=tmp_path / "partial")


def test_system_dir_is_the_fallback(root: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion, "SYSTEM_DIR", root)
    assert len(get_dataset("fashion_mnist", split="test")) == 10 * N_TEST_PER_CLASS
    assert len(get_dataset("fashion_mnist", split="test", root=tmp_path)) == 50  # root lacks it


def test_corrupt_file_is_a_data_error(tmp_path: Path) -> None:
    write_fashion(tmp_path, 2, 1)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        get_dataset("fashion_mnist", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x03junk")
    with pytest.raises(DataError, match="magic"):
        get_dataset("fashion_mnist", root=tmp_path)


@pytest.mark.skipif(not (fashion.SYSTEM_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_counts() -> None:
    sizes = {s: len(get_dataset("fashion_mnist", split=s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 55000, "val": 5000, "test": 10000}
    val = get_dataset("fashion_mnist", split="val")
    assert np.bincount(val.labels).tolist() == [500] * 10


# ------------------------------------------------------------------------ validation OOD sets


@pytest.mark.parametrize("name", sorted(fashion.VAL_OOD))
def test_val_ood_sets_come_from_the_val_split_only(root: Path, name: str) -> None:
    images, labels, splits = fashion.fashion_pool(_req(root))
    out, src = fashion.val_ood_images(_req(root, name))
    assert out.shape == (fashion.VAL_OOD_COUNT, 28, 28) and out.dtype == np.uint8
    used = set(src.ravel().tolist())
    assert used <= set(splits["val"].tolist())
    assert not used & set(splits["test"].tolist()) and not used & set(splits["train"].tolist())
    test_bytes = {im.tobytes() for im in images[splits["test"]]}
    assert not {im.tobytes() for im in out} & test_bytes
    ds = get_dataset(name, root=root)
    assert (ds.labels == -1).all() and ds.classes == [] and len(ds) == fashion.VAL_OOD_COUNT


@pytest.mark.parametrize("name", sorted(fashion.VAL_OOD))
def test_val_ood_sets_are_seeded(root: Path, name: str) -> None:
    a = get_dataset(name, root=root, seed=0).images
    b = get_dataset(name, root=root, seed=0).images
    c = get_dataset(name, root=root, seed=1).images
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_val_ood_transforms(root: Path) -> None:
    images, labels, _ = fashion.fashion_pool(_req(root))
    flip, src = fashion.val_ood_images(_req(root, "fashion_val_vflip"))
    assert np.array_equal(flip, images[src[:, 0]][:, ::-1])
    assert not np.isin(labels[src[:, 0]], fashion.SYMMETRIC_CLASSES).any()
    perm, src = fashion.val_ood_images(_req(root, "fashion_val_patchperm"))
    orig = images[src[:, 0]]
    for i in range(20):  # each 4x4 patch keeps its pixels, in another order
        for r in range(0, 28, 4):
            for q in range(0, 28, 4):
                assert sorted(perm[i, r:r + 4, q:q + 4].ravel()) == sorted(
                    orig[i, r:r + 4, q:q + 4].ravel())
    mix, src = fashion.val_ood_images(_req(root, "fashion_val_mix"))
    assert (labels[src[:, 0]] != labels[src[:, 1]]).all()
    assert np.array_equal(mix[:, :10], images[src[:, 0]][:, :10])
    assert np.array_equal(mix[:, 19:], images[src[:, 1]][:, 19:])
    blur, src = fashion.val_ood_images(_req(root, "fashion_val_blur"))

    def sharpness(x: np.ndarray) -> np.ndarray:  # gradient energy per image
        x = x.astype(np.float64)
        return (np.diff(x, axis=1) ** 2).sum((1, 2)) + (np.diff(x, axis=2) ** 2).sum((1, 2))

    ratio = sharpness(blur) / sharpness(images[src[:, 0]])
    assert ratio.max() < 0.5  # a strong blur: every edge spread over several pixels


# --------------------------------------------------------------------- ID-role sets as OOD


def test_an_id_set_used_as_ood_has_labels_minus_one() -> None:
    data = DataSpec(id="fashion_mnist", cache_dir=str(DATA_CACHE), holdout_classes=[8, 9],
                    near_ood=["mnist"], far_ood=["photos"], val_ood=[])
    digits = bundle.load_ood("mnist", data, seed=0)
    assert len(digits) == 1000 and (digits.labels == -1).all() and digits.classes == []
    mnist_test = get_dataset("mnist", split="test", cache_dir=DATA_CACHE)
    assert np.array_equal(digits.images, mnist_test.images)  # all ten digits, no holdout
    assert int(digits[0][1]) == -1
    groups = bundle.test_ood_groups(data)
    assert groups == {"near": ["mnist", "fashion_mnist_holdout"], "far": ["photos"]}


def test_as_ood_wraps_any_dataset() -> None:
    base = torch.utils.data.TensorDataset(torch.zeros(3, 1, 4, 4), torch.tensor([0, 1, 2]))
    wrapped = bundle.as_ood(base)
    assert len(wrapped) == 3 and [int(wrapped[i][1]) for i in range(3)] == [-1, -1, -1]
