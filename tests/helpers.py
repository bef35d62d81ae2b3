"""Helpers shared by tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

# Built-in data is deterministic, so tests share one cache (built once per machine).
DATA_CACHE = Path(__file__).resolve().parent.parent / ".oodlab" / "test-cache"


def tiny_spec(workdir: Path, **sections) -> dict:
    """A spec that trains in seconds: few images, a narrow CNN, one epoch."""
    spec = {
        "name": "tiny",
        "seed": 0,
        "workdir": str(workdir),
        "data": {"id": "mnist", "limit": 256, "batch_size": 64, "oe_batch_size": 64,
                 "val_ood": ["val_letters"], "test_ood": ["letters", "gaussian"],
                 "oe": ["oe_textures"], "cache_dir": str(DATA_CACHE)},
        "model": {"arch": "small_cnn", "width": 8},
        "method": {"name": "energy_oe"},
        "train": {"epochs": 1, "lr": 0.05},
        "eval": {"scores": ["energy", "msp"], "epoch_val_limit": 128},
        "resources": {"num_workers": 1},
        "tracking": {"experiment": "tests"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec
