"""``--set key=value`` overrides and dotted-key helpers for raw (not yet validated) specs."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from oodlab.errors import SpecError


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise SpecError(f"--set {item!r}: empty key")
    return key.strip().split("."), yaml.safe_load(raw)


def set_path(raw: dict[str, Any], keys: list[str], value: Any, label: str) -> None:
    """Set ``raw[k0][k1]...[kn] = value`` in place, creating empty (or null) sections."""
    node = raw
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise SpecError(f"{label}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str],
                    values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return a copy of the raw spec with dotted ``key=value`` overrides (strings, values read
    as YAML) and already-typed ``values`` (``{"method.m_in": -20.0}``) applied."""
    out = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        set_path(out, keys, value, f"--set {item!r}")
    for key, value in (values or {}).items():
        set_path(out, key.split("."), value, key)
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys (for MLflow params and Tune search spaces)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
