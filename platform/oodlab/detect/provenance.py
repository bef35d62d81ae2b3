"""Provenance of a result: hashes of the spec and of its data section, and the code version,
recorded as run tags (``oodlab.provenance.*``) so a number can be traced to what made it."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

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
