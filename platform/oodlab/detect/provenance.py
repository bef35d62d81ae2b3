"""Provenance of a result, recorded as run tags (``oodlab.provenance.*``) so a number can be
traced to what made it: hashes of the spec and of its data section, of the content of each
dataset split (:func:`split_tags`), of the served checkpoint's weights, and the code version."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

PREFIX = "oodlab.provenance."


def digest(obj: Any) -> str:
    """SHA-256 (16 hex digits) of a JSON-able value, keys sorted."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> str:
    """``git describe --always --dirty`` of the source tree, or "unknown"."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def spec_tags(spec_json: dict[str, Any]) -> dict[str, str]:
    """Tags for a run of ``spec_json`` (``spec.model_dump(mode="json")``)."""
    return {PREFIX + "spec": digest(spec_json),
            PREFIX + "data": digest({"data": spec_json.get("data"), "seed": spec_json.get("seed")}),
            PREFIX + "code": code_version()}


# array-like attributes that define a dataset's content (images and labels in memory; the
# files, index lists and (path, class) samples of datasets read from disk)
_CONTENT = ("images", "labels", "indices", "files", "samples")


def _feed(h: Any, ds: Any) -> None:
    h.update(f"{type(ds).__name__}:{len(ds)};".encode())
    if isinstance(ds, Subset):
        h.update(np.asarray(ds.indices, dtype=np.int64).tobytes())
        _feed(h, ds.dataset)
        return
    found = False
    for name in _CONTENT:
        value = getattr(ds, name, None)
        if isinstance(value, np.ndarray):
            h.update(name.encode() + np.ascontiguousarray(value).tobytes())
            found = True
        elif isinstance(value, (list, tuple)):
            h.update(name.encode() + json.dumps(value, default=str).encode())
            found = True
    base = getattr(ds, "base", None)
    if base is not None:
        _feed(h, base)
    elif not found:  # anything else: the samples it yields
        for i in range(len(ds)):
            for part in ds[i]:
                h.update(torch.as_tensor(part).numpy().tobytes())


def dataset_hash(ds: Any) -> str:
    """SHA-256 (16 hex digits) of a dataset split's content: what it holds, not how it was
    configured, so two runs with the same hash saw the same images and labels."""
    h = hashlib.sha256()
    _feed(h, ds)
    return h.hexdigest()[:16]


def split_tags(splits: dict[str, Any], groups: dict[str, dict[str, Any]] | None = None
               ) -> dict[str, str]:
    """Tags ``oodlab.provenance.split.<name>`` for each named split (``None`` skipped) and,
    for each group of named sets (validation OOD, test OOD), one hash over its members."""
    tags = {f"{PREFIX}split.{n}": dataset_hash(ds) for n, ds in splits.items() if ds is not None}
    for group, members in (groups or {}).items():
        if members:
            tags[f"{PREFIX}split.{group}"] = digest({n: dataset_hash(ds)
                                                     for n, ds in members.items()})
    return tags


def bundle_split_tags(bundle: Any) -> dict[str, str]:
    """:func:`split_tags` of a :class:`~oodlab.data.bundle.DataBundle`: its ID train, val and
    test splits, and its validation and test OOD groups."""
    return split_tags({"id_train": bundle.id_train, "id_val": bundle.id_val,
                       "id_test": bundle.id_test},
                      {"val_ood": bundle.val_ood, "test_ood": bundle.test_ood})
