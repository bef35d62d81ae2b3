"""One client image -> one model input tensor, with the model's own preprocessing.

Clients send images as they are (PNG/JPEG bytes, any size and colour mode) or as arrays
already shaped like the model input. Preprocessing comes with the model
(``Detector.preprocessing``): convert to its channel count, resize to its square size
(bilinear, no crop), scale to [0, 1]. Anything that cannot become such a tensor is an
:class:`InputError` whose message names the image and what is wrong with it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

FORMATS = ("PNG", "JPEG")
SIGNATURES = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}


class InputError(ValueError):
    """A request the client must fix; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Preprocessing:
    """The model's input: ``channels`` x ``image_size`` x ``image_size`` in [0, 1]."""

    channels: int
    image_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


def decode_image(data: bytes, label: str, prep: Preprocessing, max_pixels: int) -> torch.Tensor:
    """PNG/JPEG bytes -> [C, S, S] float tensor in [0, 1]."""
    if not data:
        raise InputError(f"{label}: empty image")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.UnidentifiedImageError:
        kind = next((k for k, sig in SIGNATURES.items() if data.startswith(sig)), None)
        what = (f"a truncated or corrupt {kind} file" if kind
                else f"not a PNG or JPEG image (starts {data[:8]!r})")
        raise InputError(f"{label}: {what} ({len(data)} bytes)") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"{label}: {err}", status=413) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise InputError(f"{label}: cannot read {len(data)}-byte image: {err}") from None
    w, h = img.size
    if w * h > max_pixels or w < 1 or h < 1:
        raise InputError(f"{label}: {w}x{h} image; at most {max_pixels} pixels", status=413)
    try:
        img.load()  # decode fully now: a truncated file fails here, not later
        if img.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits, as 8-bit grey
            img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
        img = img.convert("L" if prep.channels == 1 else "RGB")
        if img.size != (prep.image_size, prep.image_size):
            img = img.resize((prep.image_size, prep.image_size), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(f"{label}: cannot decode {img.format} image ({w}x{h}): {err}") from None
    x = torch.from_numpy(np.ascontiguousarray(arr))
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


def array_image(value: Any, label: str, prep: Preprocessing) -> torch.Tensor:
    """A nested list or NumPy array shaped like the model input -> [C, S, S] tensor.

    Values must be in [0, 1], except a ``uint8`` array's, which are pixels divided by 255
    (as a decoded PNG's). ``[S][S]`` is accepted for one-channel models (``[1][S][S]`` too)."""
    pixels = isinstance(value, np.ndarray) and value.dtype == np.uint8
    try:
        arr = np.array(value, dtype=np.float32, order="C")  # a copy: the body's is read-only
    except (ValueError, TypeError):
        raise InputError(f"{label}: not a rectangular array of numbers (ragged rows or "
                         "non-numeric entries)") from None
    if arr.ndim == 2 and prep.channels == 1:
        arr = arr[None]
    if tuple(arr.shape) != prep.shape:
        hint = f" or [{prep.image_size}, {prep.image_size}]" if prep.channels == 1 else ""
        raise InputError(f"{label}: array of shape {list(arr.shape)}; this model takes "
                         f"[{prep.channels}, {prep.image_size}, {prep.image_size}]{hint} "
                         "(channels first), or send a PNG/JPEG and the server resizes it")
    if pixels:
        return torch.from_numpy(arr).div_(255.0)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InputError(f"{label}: {bad} NaN or infinite value(s)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{label}: values must be in [0, 1], got min {lo:g} max {hi:g}")
    return torch.from_numpy(arr)
