"""A feature cache: a checkpoint's logits, penultimate features, labels and last linear layer
over every set of a benchmark, stored once in shards and read back without the network.

Layout under a root (``<workdir>/feature_cache`` or ``<storage>/feature_cache``)::

    <checkpoint hash>-<data hash>/
        manifest.json                 sets -> shard files and row counts; written last
        head.pt                       the last linear layer (weight, bias), or absent
        <set>/shard_00000.pt ...      {"features", "logits", "labels"} tensors

The key is the SHA-256 of the model's weights (:func:`checkpoint_hash`) and of the data
section of the spec plus each set's size (:func:`data_hash`), so a second search on the same
checkpoint and data finds it and runs no network. A cache without its manifest (a crash
mid-write) is not a cache. Shards are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from oodlab.detect.outputs import Outputs
from oodlab.detect.stats import Chunk

MANIFEST = "manifest.json"


def checkpoint_hash(model_state: dict[str, Tensor]) -> str:
    """SHA-256 of a state dict's names, shapes, dtypes and bytes (16 hex digits)."""
    h = hashlib.sha256()
    for name in sorted(model_state):
        t = model_state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def data_hash(data_section: dict[str, Any], sizes: dict[str, int]) -> str:
    """SHA-256 of the spec's data section (sets, limit, seed, sizes) and each set's length."""
    blob = json.dumps({"data": data_section, "sizes": sizes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ShardChunks:
    """The shards of one set as re-iterable ``(features, logits, labels)`` chunks, loaded one
    at a time (what :meth:`PostHocScore.fit_chunks` reads in bounded memory)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __iter__(self) -> Iterator[Chunk]:
        for path in self.paths:
            s = torch.load(path, map_location="cpu", weights_only=True)
            yield s["features"], s["logits"], s["labels"]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class FeatureCache:
    """One checkpoint's cached outputs on one benchmark."""

    path: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())

    @property
    def complete(self) -> bool:
        return (self.path / MANIFEST).is_file()

    @property
    def sets(self) -> list[str]:
        return list(self.manifest["sets"])

    def head(self) -> tuple[Tensor, Tensor] | None:
        file = self.path / "head.pt"
        if not file.is_file():
            return None
        h = torch.load(file, map_location="cpu", weights_only=True)
        return h["weight"], h["bias"]

    def chunks(self, name: str) -> ShardChunks:
        try:
            shards = self.manifest["sets"][name]["shards"]
        except KeyError:
            raise KeyError(f"feature cache {self.path} has no set {name!r}; it has "
                           f"{self.sets}") from None
        return ShardChunks([self.path / s for s in shards])

    def outputs(self, name: str) -> Outputs:
        """A whole set in memory (scoring needs every row anyway)."""
        parts = list(self.chunks(name))
        return Outputs(torch.cat([p[1] for p in parts]), torch.cat([p[0] for p in parts]),
                       torch.cat([p[2] for p in parts]), self.head())

    def write_shard(self, name: str, index: int, out: Outputs) -> str:
        rel = f"{name}/shard_{index:05d}.pt"
        file = self.path / rel
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        torch.save({"features": out.features, "logits": out.logits, "labels": out.labels}, tmp)
        tmp.replace(file)
        return rel

    def finish(self, shards: dict[str, list[tuple[str, int]]],
               head: tuple[Tensor, Tensor] | None, meta: dict[str, Any]) -> None:
        """Write the head and, last, the manifest that makes the cache complete."""
        if head is not None:
            torch.save({"weight": head[0], "bias": head[1]}, self.path / "head.pt")
        sets = {name: {"shards": [rel for rel, _ in parts],
                       "rows": sum(n for _, n in parts)} for name, parts in shards.items()}
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"sets": sets, **meta}, indent=1, sort_keys=True))
        tmp.replace(self.path / MANIFEST)


def cache_for(root: str | Path, ckpt: str, data: str) -> FeatureCache:
    path = Path(root) / f"{ckpt}-{data}"
    path.mkdir(parents=True, exist_ok=True)
    return FeatureCache(path)
