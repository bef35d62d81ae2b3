"""Shared fixtures: one Ray instance per test session, tiny specs, an isolated workdir."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (4 logical CPUs: 2 DDP workers + controllers).

    The dashboard stays on: Ray Train's placement-group cleaner asks the state API (served by
    the dashboard) whether a controller died, and Tune trials stopped by ASHA rely on it to
    give their CPUs back.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0",
                                           "MLFLOW_DISABLE_TELEMETRY": "true"}})
    yield ray
    ray.shutdown()
