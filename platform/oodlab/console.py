"""The one progress printer of oodlab (a leaf: it imports nothing from the package).

Lines go through ``sys.stdout.write`` and are flushed at once, not through ``print``: Ray
Train V2 patches ``print`` in its workers, so a printed worker line would reach the driver
twice, and an unflushed one might reach it only when the worker ends.
"""

from __future__ import annotations

import sys


def progress(message: str, *, source: str | None = None) -> None:
    """Write ``[oodlab] message`` (or ``[oodlab <source>] message``) to stdout and flush."""
    prefix = f"[oodlab {source}]" if source else "[oodlab]"
    sys.stdout.write(f"{prefix} {message}\n")
    sys.stdout.flush()
