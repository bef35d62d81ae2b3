"""Shared fixtures: one Ray instance per test session, tiny specs, an isolated workdir."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)
# Fake AWS keys (moto's convention) before the session's Ray starts: Ray workers inherit this
# environment and resolve S3 credentials themselves, and no test may reach a real account.
os.environ.pop("AWS_PROFILE", None)
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ.pop("AWS_SESSION_TOKEN", None)


def pytest_collection_modifyitems(config, items):
    """Modules with slow or Ray tests run first (stable otherwise): `make test` hands whole
    modules to two pytest-xdist workers, and starting the long ones first lets both workers
    finish together instead of one running the last end-to-end test alone."""
    heavy = {item.path for item in items
             if item.get_closest_marker("slow") or item.get_closest_marker("ray")}
    items.sort(key=lambda item: item.path not in heavy)


@pytest.fixture(autouse=True)
def _forget_mlflows_tracking_uri():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: without this, the processes a
    later test starts (an `oodlab` CLI, Ray) would track into an earlier test's store."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (4 logical CPUs: 2 DDP workers + controllers).

    Started like oodlab starts it (dashboard pinned, see ``oodlab.cluster.ray_local``): Tune trials
    stopped by ASHA rely on the state API to give their CPUs back.
    """
    import ray

    from oodlab.cluster.ray_local import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
