"""The process environment as the user set it when oodlab started."""

from __future__ import annotations

import os

# mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into the process, so one spec's store
# would leak into the next; the value the user exported is captured once, here.
_ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def user_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI as it was when oodlab started (not as mlflow rewrote it since)."""
    return _ENV_TRACKING_URI
