"""The process environment as the user set it when oodlab started."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into the process, so one spec's store
# would leak into the next; the value the user exported is captured once, here.
_ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def user_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI as it was when oodlab started (not as mlflow rewrote it since)."""
    return _ENV_TRACKING_URI


@contextmanager
def user_environment() -> Iterator[None]:
    """Inside, ``os.environ`` holds the user's MLFLOW_TRACKING_URI (or none), for starting
    processes that inherit it, such as a local Ray: its workers would otherwise take the
    store of whichever spec this process tracked last for the one the user chose."""
    current = os.environ.pop("MLFLOW_TRACKING_URI", None)
    if _ENV_TRACKING_URI is not None:
        os.environ["MLFLOW_TRACKING_URI"] = _ENV_TRACKING_URI
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if current is not None:
            os.environ["MLFLOW_TRACKING_URI"] = current
