"""HTTP request body -> a list of raw client images, before any decoding.

Accepted bodies of ``POST /v1/score``:

* ``application/json``: ``{"images": [...]}``, each entry a base64 PNG/JPEG string (a
  ``data:image/...;base64,`` prefix is allowed) or a nested array shaped like the model input;
* ``multipart/form-data``: one image file per part (``curl -F images=@a.png``);
* ``image/png`` or ``image/jpeg``: the body is one image.

Every rejection is an :class:`InputError` with the HTTP status and a message that names
the field at fault.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import Message
from typing import Any

from oodlab.serve.images import InputError

JSON = "application/json"
MULTIPART = "multipart/form-data"
IMAGE_TYPES = ("image/png", "image/jpeg")
ACCEPTED = (f'{JSON} ({{"images": [...]}}), {MULTIPART} (one file per image), '
            "image/png or image/jpeg")


@dataclass(frozen=True)
class RawImage:
    """One image as sent: encoded bytes or a nested array; ``label`` names it in errors."""

    label: str
    data: bytes | None = None
    array: Any = None


async def read_limited(stream: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to be larger than ``limit``."""
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InputError(f"Content-Length {declared!r} is not a number", 400) from None
        if size > limit:
            raise InputError(f"request body of {size} bytes; the limit is {limit} bytes", 413)
    chunks, total = [], 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise InputError(f"request body over the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _header(value: str) -> Message:
    msg = Message()
    msg["content-type"] = value
    return msg


def parse(content_type: str | None, body: bytes, max_images: int) -> list[RawImage]:
    """Split a body into raw images according to its content type."""
    if not content_type:
        raise InputError(f"no Content-Type header; send {ACCEPTED}", 415)
    header = _header(content_type)
    mime = header.get_content_type()
    if mime == JSON:
        images = from_json(body)
    elif mime == MULTIPART:
        images = from_multipart(body, header.get_param("boundary"))
    elif mime in IMAGE_TYPES:
        images = [RawImage(f"body ({mime})", data=body)]
    else:
        raise InputError(f"content type {mime!r} is not supported; send {ACCEPTED}", 415)
    if not images:
        raise InputError("no images in the request", 422)
    if len(images) > max_images:
        raise InputError(f"{len(images)} images in one request; at most {max_images}", 413)
    return images


def from_json(body: bytes) -> list[RawImage]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise InputError(f"malformed JSON body: {err}", 400) from None
    if not isinstance(doc, dict):
        raise InputError(f'the JSON body must be an object {{"images": [...]}}, got '
                         f"{type(doc).__name__}")
    unknown = sorted(set(doc) - {"images"})
    if unknown:
        raise InputError(f'unknown field(s) {unknown} in the JSON body; expected only "images"')
    if "images" not in doc:
        raise InputError('field "images" is missing from the JSON body')
    items = doc["images"]
    if not isinstance(items, list):
        raise InputError(f'field "images" must be a list, got {type(items).__name__}')
    return [_json_item(v, f"images[{i}]") for i, v in enumerate(items)]


def _json_item(value: Any, label: str) -> RawImage:
    if isinstance(value, list):
        return RawImage(label, array=value)
    if not isinstance(value, str):
        raise InputError(f"{label}: expected a base64 PNG/JPEG string or a nested array, got "
                         f"{type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        return RawImage(label, data=base64.b64decode("".join(text.split()), validate=True))
    except (binascii.Error, ValueError) as err:
        raise InputError(f"{label}: not valid base64 ({err})") from None


def from_multipart(body: bytes, boundary: str | None) -> list[RawImage]:
    """RFC 7578 form data: every part is one image (its field name and file name label it)."""
    if not boundary:
        raise InputError("multipart/form-data without a boundary parameter", 400)
    parts = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    images, closed = [], False
    for i, part in enumerate(parts[1:]):
        if part.startswith(b"--"):
            closed = True
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"\r\n"):
            raise InputError(f"multipart part {i}: no blank line after its headers", 400)
        disposition = Message()
        for line in head[2:].decode("latin-1").split("\r\n"):
            key, _, val = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition["content-disposition"] = val.strip()
        name = disposition.get_param("name", header="content-disposition")
        filename = disposition.get_param("filename", header="content-disposition")
        label = f"parts[{i}]" + (f" (file {filename!r})" if filename
                                 else f" (field {name!r})" if name else "")
        images.append(RawImage(label, data=content))
    if not closed:
        raise InputError("multipart body is not closed by its final boundary "
                         f"'--{boundary}--' (truncated upload?)", 400)
    return images
