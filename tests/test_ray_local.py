"""Starting a local Ray: its processes see the user's environment, not what mlflow wrote."""

from __future__ import annotations

import os

from oodlab.cluster import env, ray_local


def test_local_ray_gets_the_users_tracking_uri_not_the_last_one_mlflow_set(monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; Ray's workers inherit the
    environment of ray.init, and a trial driver there reads the variable as the user's
    choice. So a run tracked before Ray started would send later specs' trials to its store."""
    seen: list[str | None] = []
    monkeypatch.setattr(ray_local.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_local.ray, "init",
                        lambda **kw: seen.append(os.environ.get("MLFLOW_TRACKING_URI")))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "unset")  # init_ray sets it; restored after
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/last-spec.db")  # mlflow's write

    monkeypatch.setattr(env, "_ENV_TRACKING_URI", None)  # the user exported nothing
    ray_local.init_ray(num_cpus=1)
    monkeypatch.setattr(env, "_ENV_TRACKING_URI", "http://127.0.0.1:5000")  # the user's server
    ray_local.init_ray(num_cpus=1)

    assert seen == [None, "http://127.0.0.1:5000"]
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/last-spec.db"  # put back
