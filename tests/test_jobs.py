"""Ray Jobs against a real head started here (``ray start --head`` on 127.0.0.1, token auth on).

A tiny spec is submitted with ``oodlab submit``, followed to SUCCEEDED and its MLflow run
checked; a second (long) job is stopped while it runs. The head is stopped at the end, even
on failure, by killing exactly the processes this test started (never ``ray stop``, which
would end every Ray on the machine).
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from oodlab.cluster import jobs
from oodlab.cluster.ray_local import free_port
from oodlab.spec import SpecError
from tests.helpers import ray_start, stop_tree, tiny_spec


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` on loopback with free ports; yields the dashboard URL."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # its own ray_current_cluster file
    bin_dir = Path(sys.executable).parent
    # a clean head: earlier tests' Ray and MLflow settings (mlflow.set_tracking_uri writes
    # MLFLOW_TRACKING_URI into this process) must not reach the job drivers
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= {"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "RAY_AUTH_MODE": "token",
            "RAY_USAGE_STATS_ENABLED": "0"}
    proc, ports = ray_start("--head", num_cpus=2, temp_dir=Path(temp), env=env,
                            log=Path(temp) / "head.log")
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (Path(temp) / "head.log").read_text()[-3000:]
            try:
                req = urllib.request.Request(f"{url}/api/version", headers=jobs.auth_headers())
                urllib.request.urlopen(req, timeout=5).read()
                jobs.list_jobs(url)  # the job API answers too
                break
            except (OSError, jobs.JobError):
                assert time.monotonic() < deadline, "ray head did not come up in 120 s"
                time.sleep(1.0)
        yield url
    finally:
        stop_tree(proc)  # gcs, raylet, dashboard, workers, job drivers; never `ray stop`
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture()
def project(tmp_path):
    """A working dir with one tiny spec (workdir outside it, so MLflow lands in tmp_path)."""
    root = tmp_path / "project"
    (root / "jobs").mkdir(parents=True)
    spec = tiny_spec(tmp_path / "work", name="jobtiny")
    (root / "jobs" / "tiny.yaml").write_text(yaml.safe_dump(spec))
    return root


def test_dashboard_requires_the_token(ray_head):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head}/api/jobs/", timeout=10)
    assert err.value.code == 401


def test_a_wrong_token_is_named(ray_head, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 32)
    with pytest.raises(jobs.JobError, match="refused our token.*RAY_AUTH_TOKEN"):
        jobs.list_jobs(ray_head)


def test_the_given_address_wins_over_ray_environment_variables(ray_head, monkeypatch):
    # a local init_ray sets RAY_API_SERVER_ADDRESS, which Ray's client would prefer
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", dead)
    monkeypatch.setenv("RAY_ADDRESS", dead)
    assert isinstance(jobs.list_jobs(ray_head), list)
    assert os.environ["RAY_API_SERVER_ADDRESS"] == dead  # restored for the rest of the process


def test_build_submission_is_checked_here(project, tmp_path, monkeypatch):
    from oodlab.cluster import env as user_env

    # MLFLOW_TRACKING_URI as the user set it at start, not as mlflow rewrote it since
    monkeypatch.setattr(user_env, "_ENV_TRACKING_URI", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////another/spec/mlflow.db")
    leaked = jobs.build_submission(project / "jobs" / "tiny.yaml", working_dir=project)
    assert "MLFLOW_TRACKING_URI" not in leaked.runtime_env["env_vars"]
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////another/spec/mlflow.db"  # restored
    monkeypatch.setattr(user_env, "_ENV_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-forwarded")
    sub = jobs.build_submission(project / "jobs" / "tiny.yaml", working_dir=project,
                                overrides=["train.epochs=2"], env=["EXTRA=1"])
    assert sub.entrypoint == "python -m oodlab run jobs/tiny.yaml --set train.epochs=2"
    env = sub.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["EXTRA"] == "1"
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert sub.runtime_env["py_modules"] == [str(jobs.PACKAGE_DIR)]
    assert ".venv" in sub.runtime_env["excludes"] and ".oodlab" in sub.runtime_env["excludes"]
    assert sub.submission_id.startswith("oodlab-run-jobtiny-")

    outside = tmp_path / "elsewhere.yaml"
    outside.write_text((project / "jobs" / "tiny.yaml").read_text())
    with pytest.raises(jobs.JobError, match="outside the working dir"):
        jobs.build_submission(outside, working_dir=project)
    with pytest.raises(SpecError, match=r"invalid spec:\n  train.epochs"):
        jobs.build_submission(project / "jobs" / "tiny.yaml", working_dir=project,
                              overrides=["train.epochs=0"])
    with pytest.raises(jobs.JobError, match="--address 'localhost:8265'"):
        jobs.job_address("localhost:8265")


@pytest.mark.slow
def test_submit_follow_to_succeeded_and_stop(ray_head, project, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from oodlab.cli.main import main

    rc = main(["submit", str(project / "jobs" / "tiny.yaml"), "--working-dir", str(project),
               "--address", ray_head, "--follow"])
    out = capsys.readouterr()
    job_id = out.out.splitlines()[0]
    assert rc == 0, out.out[-3000:] + out.err[-2000:]
    assert job_id.startswith("oodlab-run-jobtiny-")
    assert "epoch 1/1" in out.out  # the worker's progress line, streamed by --follow
    assert jobs.status(job_id, ray_head) == "SUCCEEDED"

    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.tags["mlflow.runName"] == "jobtiny"
    assert any(k.startswith("test/") for k in runs[0].data.metrics)  # evaluated once

    assert main(["jobs", "list", "--address", ray_head]) == 0
    assert job_id in capsys.readouterr().out

    # a long job: stopped while it runs
    sub = jobs.build_submission(project / "jobs" / "tiny.yaml", working_dir=project,
                                overrides=["train.epochs=500"])
    long_id = jobs.submit(sub, ray_head)
    assert jobs.wait(long_id, ray_head, timeout_s=120, until={"RUNNING"}) == "RUNNING"
    assert main(["jobs", "stop", long_id, "--address", ray_head]) == 0
    assert capsys.readouterr().out.strip() == "STOPPED"
    assert jobs.status(long_id, ray_head) == "STOPPED"
    buf = io.StringIO(jobs.logs(long_id, ray_head))
    assert "epoch 500/500" not in buf.getvalue()

    with pytest.raises(jobs.JobError, match="no-such-job"):
        jobs.status("no-such-job", ray_head)
