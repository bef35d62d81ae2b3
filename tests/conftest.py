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


# The longest modules, longest first (`make test --durations`, 2 cores, 2026-12-04: each
# takes 3-7 min there); then the other modules with slow or Ray tests, then the rest.
LONGEST_FIRST = ("test_tune.py", "test_multinode.py", "test_tune_resume.py", "test_serve.py",
                 "test_unleashing_mask_e2e.py", "test_pipeline.py", "test_console.py")


def pytest_collection_modifyitems(config, items):
    """Order modules so that `make test`'s two pytest-xdist workers, which take whole modules
    in this order, finish together (longest first) instead of one running the last long
    module alone. Tests keep their order within a module."""
    heavy = {item.path for item in items
             if item.get_closest_marker("slow") or item.get_closest_marker("ray")}

    def rank(item) -> int:
        if item.path.name in LONGEST_FIRST:
            return LONGEST_FIRST.index(item.path.name)
        return len(LONGEST_FIRST) + (item.path not in heavy)

    items.sort(key=rank)


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
