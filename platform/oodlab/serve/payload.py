"""HTTP request body -> a list of raw client images, before any decoding.

Accepted bodies of ``POST /v1/score``:

* ``application/json``: :class:`ScoreRequest`, ``{"images": [...]}``, each entry a base64
  PNG/JPEG string (a ``data:image/...;base64,`` prefix is allowed) or a nested array shaped
  like the model input;
* ``multipart/form-data``: one image file per part (``curl -F images=@a.png``), split by
  Starlette's form parser (python-multipart), the one behind FastAPI's ``File``/``UploadFile``;
* ``image/png`` or ``image/jpeg``: the body is one image;
* ``application/x-npy``: a batch already shaped like the model input, as one NumPy ``.npy``
  file (``numpy.save``; read with ``allow_pickle=False``): ``[N, C, S, S]`` (``[N, S, S]``
  for one channel), ``uint8`` pixels (0-255, divided by 255 as a decoded PNG's are) or
  floats in [0, 1]. Nothing is base64-decoded, parsed as JSON or decompressed: the body a
  replica spends least of its core on, for clients that already hold decoded images.

The body size limit is the route's ``max_body_size`` (FastAPI, "Request Body Limits").
Every other rejection is an :class:`~oodlab.serve.images.InputError` with the HTTP status and
a message that names the field at fault.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import math
from dataclasses import dataclass
from email.message import Message
from typing import Annotated, Any

import numpy as np
import numpy.lib.format as npy_format
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from oodlab.serve.images import InputError

JSON = "application/json"
MULTIPART = "multipart/form-data"
NPY = "application/x-npy"
NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"
IMAGE_TYPES = ("image/png", "image/jpeg")
ACCEPTED = (f'{JSON} ({{"images": [...]}}), {MULTIPART} (one file per image), '
            f"image/png or image/jpeg, or {NPY} (a [N, C, S, S] batch)")


@dataclass(frozen=True)
class RawImage:
    """One image as sent: encoded bytes, or a nested list or NumPy array shaped like the
    model input; ``label`` names it in errors."""

    label: str
    data: bytes | None = None
    array: Any = None


def _base64(value: str) -> bytes:
    """Strict RFC 4648 base64 (whitespace ignored), optionally as an RFC 2397 data URL."""
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise PydanticCustomError("base64", "not valid base64 ({error})",
                                  {"error": str(err)}) from None


def _image_kind(value: Any) -> str | None:
    return "base64" if isinstance(value, str) else "array" if isinstance(value, list) else None


Base64Image = Annotated[bytes, BeforeValidator(_base64), WithJsonSchema(
    {"type": "string", "contentEncoding": "base64",
     "description": "base64 PNG or JPEG (any size or colour mode)"})]
ArrayImage = Annotated[list[Any], WithJsonSchema(
    {"type": "array", "items": {},
     "description": "[C][S][S] (or [S][S] for one channel) in [0, 1]"})]
# A callable discriminator gives one error per bad entry (pydantic, "Discriminated Unions").
ImageItem = Annotated[
    Annotated[Base64Image, Tag("base64")] | Annotated[ArrayImage, Tag("array")],
    Discriminator(_image_kind, custom_error_type="image_type",
                  custom_error_message="expected a base64 PNG/JPEG string or a nested array")]


class ScoreRequest(BaseModel):
    """The JSON body of ``POST /v1/score``."""

    model_config = ConfigDict(extra="forbid")

    images: list[ImageItem] = Field(description="the images to score, in order")


# pydantic, "Customize error messages": our wording for the errors of the body's shape.
_MESSAGES = {
    "json_invalid": "malformed JSON body: {msg}",
    "model_type": 'the JSON body must be an object {{"images": [...]}}, got {got}',
    "missing": 'field "{where}" is missing from the JSON body',
    "extra_forbidden": 'unknown field "{where}" in the JSON body; expected only "images"',
    "list_type": 'field "{where}" must be a list, got {got}',
}


def _message(error: ErrorDetails) -> str:
    loc = error["loc"]
    where = "".join([str(loc[0]) if loc else "body",
                     *(f"[{p}]" for p in loc[1:] if isinstance(p, int))])
    template = _MESSAGES.get(error["type"], "{where}: {msg}")
    return template.format(where=where, msg=error["msg"], got=type(error["input"]).__name__)


def from_json(body: bytes) -> list[RawImage]:
    """Validate a JSON body against :class:`ScoreRequest` (400 if it is not JSON at all)."""
    try:
        request = ScoreRequest.model_validate_json(body)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        status = 400 if any(e["type"] == "json_invalid" for e in errors) else 422
        raise InputError("; ".join(_message(e) for e in errors), status) from None
    return [RawImage(f"images[{i}]", data=v) if isinstance(v, bytes)
            else RawImage(f"images[{i}]", array=v) for i, v in enumerate(request.images)]


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of an ``.npy`` header, read by ``numpy.lib.format``.
    Cached by its bytes: a client sends the same header with every batch of one size, and
    reading it (``ast.literal_eval``) costs more than the rest of a small body."""
    fp = io.BytesIO(header)
    major, _ = npy_format.read_magic(fp)
    read = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
    return read(fp)


def from_npy(body: bytes) -> list[RawImage]:
    """A ``.npy`` body: one image per entry of its first axis (``body[i]`` in errors), each a
    read-only view of the body; the shape of each against the model is checked on decoding.

    The header is read with NumPy's own ``numpy.lib.format`` and must declare exactly the
    bytes that follow it, before any array exists: a header claiming a huge shape allocates
    nothing. Object (pickled) arrays are refused, as ``np.load(allow_pickle=False)`` does."""
    if body.startswith(ZIP_MAGIC):
        raise InputError("an .npz archive; send one array saved with numpy.save", 400)
    if not body.startswith(NPY_MAGIC):
        raise InputError(f"not a .npy file (starts {body[:8]!r}); send the bytes that "
                         "numpy.save writes", 400)
    # the header's length field: 2 bytes in format 1.0, 4 in 2.0 and 3.0 (NEP 1)
    start = 10 if body[6:7] == b"\x01" else 12
    try:
        header_bytes = start + int.from_bytes(body[8:start], "little")
        shape, fortran, dtype = _npy_header(body[:header_bytes])
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"not a readable .npy header ({len(body)} bytes): {err}", 400) from None
    if dtype != np.uint8 and dtype.kind != "f":
        raise InputError(f".npy body of dtype {dtype}; send uint8 pixels (0-255) or floats "
                         "in [0, 1]")
    if len(shape) not in (3, 4):
        raise InputError(f".npy body of shape {list(shape)}; send a batch [N, C, S, S] "
                         "(or [N, S, S] for one channel), N images")
    count = math.prod(shape)
    if (held := len(body) - header_bytes) != count * dtype.itemsize:
        raise InputError(f".npy header declares {list(shape)} {dtype} ({count * dtype.itemsize} "
                         f"bytes) but {held} bytes follow it (truncated upload?)", 400)
    arr = np.frombuffer(body, dtype, count, offset=header_bytes)
    arr = arr.reshape(shape, order="F" if fortran else "C")
    return [RawImage(f"body[{i}]", array=a) for i, a in enumerate(arr)]


async def from_multipart(request: Request, body: bytes, boundary: str | None
                         ) -> list[RawImage]:
    """RFC 7578 form data: every part is one image file (its file name labels it)."""
    if not boundary:
        raise InputError("multipart/form-data without a boundary parameter", 400)
    # python-multipart drops an unterminated last part silently: refuse such a body instead
    if not body.rstrip(b"\r\n").endswith(b"--" + boundary.encode("latin-1") + b"--"):
        raise InputError("multipart body is not closed by its final boundary "
                         f"'--{boundary}--' (truncated upload?)", 400)
    form = await request.form()  # parses the cached body again
    try:
        images = []
        for i, (name, value) in enumerate(form.multi_items()):
            if not isinstance(value, UploadFile):
                raise InputError(f"parts[{i}] (field {name!r}): a text field, not a file; send "
                                 "each image as a file (curl -F images=@a.png)")
            label = f"parts[{i}] (file {value.filename!r})"
            images.append(RawImage(label, data=await value.read()))
        return images
    finally:
        await form.close()


async def read_images(request: Request, max_images: int) -> list[RawImage]:
    """The raw images of a ``POST /v1/score`` request, by its content type."""
    content_type = request.headers.get("content-type")
    if not content_type:
        raise InputError(f"no Content-Type header; send {ACCEPTED}", 415)
    header = Message()
    header["content-type"] = content_type
    mime = header.get_content_type()
    if mime not in (JSON, MULTIPART, NPY, *IMAGE_TYPES):
        raise InputError(f"content type {mime!r} is not supported; send {ACCEPTED}", 415)
    body = await request.body()  # 413 past the route's max_body_size
    if mime == JSON:
        images = from_json(body)
    elif mime == NPY:
        images = from_npy(body)
    elif mime == MULTIPART:
        boundary = header.get_param("boundary")
        images = await from_multipart(request, body,
                                      boundary if isinstance(boundary, str) else None)
    else:
        images = [RawImage(f"body ({mime})", data=body)]
    if not images:
        raise InputError("no images in the request", 422)
    if len(images) > max_images:
        raise InputError(f"{len(images)} images in one request; at most {max_images}", 413)
    return images
