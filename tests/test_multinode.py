"""Multi-node on one machine: two Ray nodes, MLflow on PostgreSQL with artifacts on S3.

Started here, all on 127.0.0.1: an S3 server (moto), a PostgreSQL server (``initdb`` +
``pg_ctl`` in a temp dir, Debian's ``postgresql`` package), an MLflow tracking server on it that
writes artifacts to S3, a Ray head and a second Ray node (``ray start --address``) with one CPU
each. ``oodlab submit --tune`` then runs a search whose 2-worker DDP trials must span both nodes
(a worker needs the one CPU of a node). Mid-search the second node is killed and a new one
joins: the trial resumes from its last checkpoint on S3, and the search's second trial runs on
the head and the new node. Everything recorded must be in the tracking server and on S3, and
``oodlab serve`` serves the champion, chosen from both trials, from its registry.

Every process is stopped at the end by killing exactly what this module started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from oodlab.cluster import jobs
from oodlab.search.tune import DRIVER_NODE_TAG, ROLE_TAG
from oodlab.track.tracking import CHECKPOINT_TAG
from tests.helpers import FAKE_AWS, free_port, moto_s3, ray_start, stop_tree, tiny_spec

pytestmark = pytest.mark.ray
BIN = Path(sys.executable).parent
BUCKET = "oodlab-multinode"


def _wait(what: str, ready, proc: subprocess.Popen | None = None, log: Path | None = None,
          timeout: float = 120.0) -> None:
    """Poll ``ready()`` until it is true; fail naming ``what`` (and the log's tail)."""
    deadline = time.monotonic() + timeout
    while True:
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        assert proc is None or proc.poll() is None, f"{what} exited:\n{tail}"
        try:
            if ready():
                return
        except AssertionError:
            raise
        except Exception:  # noqa: BLE001 - not up yet
            pass
        assert time.monotonic() < deadline, f"{what} not up in {timeout:.0f} s:\n{tail}"
        time.sleep(1.0)


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 - the child keeps it; closed with the process
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to its system user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(
        f"*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"{name} not found: install PostgreSQL (`make test-packages` does, "
                    "with apt-get install postgresql)")
    return str(found)


@dataclass
class Cluster:
    tmp: Path
    env: dict[str, str]  # what a client needs: AWS endpoint and keys, tracking URI
    tracking_uri: str
    s3: Any  # a boto3 S3 client for the bucket's server
    gcs: str
    dashboard: str
    procs: dict[str, subprocess.Popen]
    node_ids: dict[str, str]  # node name -> Ray node id, for the nodes started by add_node

    def add_node(self, name: str) -> subprocess.Popen:
        """``ray start --address`` one more node with 1 CPU; waits until the head sees it."""
        before = _alive_nodes(self.dashboard)  # ids: a node just killed may still be listed
        attempt = 0
        while True:
            # its own temp dir, as on a real node: two raylets sharing one would share (and
            # garbage-collect) each other's runtime_env working dirs
            log = self.tmp / f"{name}-{attempt}.log"
            proc, _ = ray_start(f"--address={self.gcs}", num_cpus=1,
                                temp_dir=self.tmp / f"ray-{name}", env=self.env, log=log,
                                object_store_bytes=100_000_000)
            self.procs[name] = proc
            try:
                _wait(f"ray node {name}", lambda: _alive_nodes(self.dashboard) - before, proc,
                      log)
                (self.node_ids[name],) = _alive_nodes(self.dashboard) - before
                return proc
            except AssertionError:
                # `ray start` gives up when the head answers too slowly ("Failed to get node
                # info ... Deadline Exceeded" on a loaded machine): start it again, twice
                attempt += 1
                if proc.poll() is None or attempt == 3:
                    raise


def _alive_nodes(dashboard: str) -> set[str]:
    """The ids of the nodes the head lists as alive."""
    req = urllib.request.Request(f"{dashboard}/nodes?view=summary", headers=jobs.auth_headers())
    body = json.loads(urllib.request.urlopen(req, timeout=5).read())
    return {n["raylet"]["nodeId"] for n in body["data"]["summary"]
            if n["raylet"]["state"] == "ALIVE"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    tmp = Path(tempfile.mkdtemp(prefix="mn", dir="/tmp"))
    procs: dict[str, subprocess.Popen] = {}
    with moto_s3() as s3_endpoint:
        pgdata = tmp / "pg"
        try:
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI",
                                "AWS_PROFILE", "AWS_SESSION_TOKEN")}
            env |= FAKE_AWS | {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                               "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                               "AWS_ENDPOINT_URL": s3_endpoint,
                               "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
            import boto3

            client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                                  aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
                                  aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"])
            client.create_bucket(Bucket=BUCKET)

            # PostgreSQL in a temp dir, owned by its system user, on a free loopback port
            pgdata.mkdir()
            if os.geteuid() == 0:
                shutil.chown(tmp, "postgres")
                shutil.chown(pgdata, "postgres")
            subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(pgdata), "-U", "postgres",
                                         "--auth=trust", "-E", "UTF8"]),
                           check=True, capture_output=True)
            pg_port = free_port()
            subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(pgdata), "-w", "-l",
                                         str(pgdata / "server.log"), "-o",
                                         f"-p {pg_port} -k {pgdata} -c listen_addresses=127.0.0.1",
                                         "start"]), check=True, capture_output=True)

            # the MLflow server: runs and registry in PostgreSQL, artifacts proxied to S3
            http = free_port()
            tracking_uri = f"http://127.0.0.1:{http}"
            procs["mlflow"] = _start([
                str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(http),
                "--workers", "1",
                # psycopg2 named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3
                "--backend-store-uri",
                f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/postgres",
                "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"], tmp / "mlflow.log", env)

            # the Ray head: 1 CPU, so a 2-worker trial needs the second node too
            procs["head"], ports = ray_start("--head", num_cpus=1, temp_dir=tmp / "ray", env=env,
                                             log=tmp / "head.log")
            dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
            _wait("MLflow server", lambda: urllib.request.urlopen(
                f"{tracking_uri}/health", timeout=5).status == 200, procs["mlflow"],
                tmp / "mlflow.log", timeout=180)
            _wait("ray head", lambda: isinstance(jobs.list_jobs(dashboard), list), procs["head"],
                  tmp / "head.log")
            env |= {"MLFLOW_TRACKING_URI": tracking_uri}
            c = Cluster(tmp, env, tracking_uri, client, f"127.0.0.1:{ports['port']}", dashboard,
                        procs, {})
            c.add_node("node2")
            yield c
        finally:
            for name in list(procs)[::-1]:  # nothing is read from them any more: a Ray
                # node and the MLflow server outlast a longer wait on SIGTERM, then get SIGKILL
                stop_tree(procs[name], grace_s=1)
            if (pgdata / "PG_VERSION").exists():
                subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(pgdata), "-m",
                                             "immediate", "stop"]), capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)


def test_search_spans_two_nodes_survives_losing_one_and_is_served(cluster, tmp_path):
    from mlflow import MlflowClient

    project = tmp_path / "project"
    (project / "jobs").mkdir(parents=True)
    spec = tiny_spec(tmp_path / "work", name="mntiny",
                     storage=f"s3://{BUCKET}/runs",
                     # epochs of a few seconds: the node dies while the trial has work left
                     data={"limit": 2000}, train={"epochs": 5, "lr": 0.05},
                     resources={"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2},
                     tracking={"experiment": "multinode", "model_name": "mn"})
    (project / "jobs" / "tiny.yaml").write_text(yaml.safe_dump(spec))
    (project / "space.yaml").write_text(yaml.safe_dump({
        "method": "energy_oe", "objectives": [{"metric": "val/auroc", "mode": "max"}],
        "params": {"method.m_in": {"type": "uniform", "low": -30, "high": -10}},
        "num_samples": 2, "max_concurrent": 1,
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
        "scheduler": {"name": "fifo"}, "searcher": {"name": "tpe", "seed": 0}}))
    env = cluster.env
    submit = subprocess.run(
        [str(BIN / "oodlab"), "submit", "jobs/tiny.yaml", "--tune", "space.yaml",
         "--address", cluster.dashboard, "--working-dir", str(project),
         "--pass-aws-credentials"],
        cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-3000:]
    job_id = submit.stdout.split()[0]

    # kill the second node once Ray Train holds a checkpoint of the first trial, while the
    # trial has epochs left; a new node joins. A checkpoint uploaded by rank 0 is not yet
    # held: the Train controller takes each report at its next poll of the workers (every
    # 2 s), and a worker lost before that poll loses its report. Our epoch callback tags the
    # MLflow run after Ray's checkpoint manager has taken the report, so the tag is the signal
    # (a kill on rank 0's "epoch 2/5" line once came before that poll: restart from epoch 0).
    client = MlflowClient(cluster.tracking_uri)

    def logs() -> str:
        return jobs.logs(job_id, cluster.dashboard)

    def checkpoint_held() -> bool:
        assert jobs.status(job_id, cluster.dashboard) in ("PENDING", "RUNNING"), "job ended"
        exp = client.get_experiment_by_name("multinode")
        return exp is not None and any(CHECKPOINT_TAG in r.data.tags
                                       for r in client.search_runs([exp.experiment_id]))

    try:
        _wait("first trial's first checkpoint", checkpoint_held, timeout=300)
    except AssertionError as err:
        raise AssertionError(f"{err}\njob logs:\n{logs()[-6000:]}") from None
    stop_tree(cluster.procs["node2"], grace_s=0)
    cluster.add_node("node3")

    def state(kind: str, class_name: str | None = None) -> list[dict]:
        """The state API's list (with the token); asked again, up to three times, while it
        is empty, then printed unfiltered for the failure message."""
        def get(query: str = "") -> dict:
            req = urllib.request.Request(f"{cluster.dashboard}/api/v0/{kind}?limit=1000"
                                         f"&detail=1{query}", headers=jobs.auth_headers())
            return json.loads(urllib.request.urlopen(req, timeout=30).read())["data"]["result"]

        query = (f"&filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}"
                 if class_name else "")
        for attempt in range(3):
            answer = get(query)
            if answer["result"] or attempt == 2:
                break
            time.sleep(5)
        if not answer["result"]:  # what the state API said, for the message
            rest = {k: v for k, v in answer.items() if k != "result"}
            print(f"state API, {kind} {class_name}: {rest}")  # in pytest's captured output
            if class_name:  # and what it lists unfiltered: which classes, where, in what state
                print(sorted(Counter((a.get("class_name"), a.get("state"), a.get("node_id"))
                                     for a in get()["result"]).items()))
        return answer["result"]

    _wait("the search job", lambda: jobs.status(job_id, cluster.dashboard) in (
        "SUCCEEDED", "FAILED", "STOPPED"), timeout=600)
    text = logs()
    assert jobs.status(job_id, cluster.dashboard) == "SUCCEEDED", text[-5000:]

    exp = client.get_experiment_by_name("multinode")
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
    if len(trials) != 2 or any(r.info.status != "FINISHED" for r in trials):
        pytest.fail(f"{[(r.info.run_name, r.info.status) for r in runs]}\n{text[-8000:]}")
    # the interrupted trial restarted from its checkpoint, not from epoch 0
    starts = {r.info.run_id: [m.value for m in client.get_metric_history(
        r.info.run_id, "run/start_epoch")] for r in trials}
    assert any(max(v) > 0 for v in starts.values()), f"{starts}\n{text[-8000:]}"
    for r in trials:
        assert "test/auroc" in r.data.metrics
        # two nodes: the test sets were scored in a Ray task, not in the trial's driver
        assert r.data.tags.get("oodlab.eval.where", "").startswith("task: "), r.data.tags
        assert len(client.get_metric_history(r.info.run_id, "test/auroc")) == 1
        # storage: s3://... puts the experiment's artifacts beside the checkpoints
        assert r.info.artifact_uri.startswith(f"s3://{BUCKET}/runs/"), r.info.artifact_uri

    # artifacts and checkpoints are on S3, nowhere else
    keys = [o["Key"] for page in cluster.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    assert any(k.startswith("runs/mlartifacts/") and k.endswith("detector.pt") for k in keys), keys
    assert any(k.startswith("runs/") and "checkpoint_" in k for k in keys), keys

    # the DDP workers ran on more than one node
    head = {n["node_id"] for n in state("nodes") if n["is_head_node"]}
    # both nodes of every trial: the lost node2 and its replacement node3 each ran workers
    workers = state("actors", "RayTrainWorker")
    assert {a["node_id"] for a in workers} == head | {cluster.node_ids["node2"],
                                                      cluster.node_ids["node3"]}, [
        (a["node_id"], a["state"]) for a in workers]
    # every trial's driver on the head node, which is never the one lost: the node each
    # driver found itself on, recorded in its run (the state API has at times listed none of
    # Tune's trainable actors, during or after the search, though it listed the job's Ray
    # Train workers)
    drivers = {r.info.run_name: r.data.tags.get(DRIVER_NODE_TAG) for r in trials}
    assert set(drivers.values()) == head, (head, drivers)

    # the champion is registered in the server and served from it
    version = client.get_model_version_by_alias("mn", "champion")
    assert version.run_id in {r.info.run_id for r in trials}
    port = free_port()
    serve_env = env | {"RAY_ADDRESS": cluster.gcs, "RAY_DASHBOARD_ADDRESS": cluster.dashboard}
    served = _start([str(BIN / "oodlab"), "serve", "models:/mn@champion", "--tracking-uri",
                     cluster.tracking_uri, "--port", str(port)], tmp_path / "serve.log",
                    serve_env)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait("oodlab serve", lambda: urllib.request.urlopen(f"{url}/v1/model", timeout=5)
              .status == 200, served, tmp_path / "serve.log", timeout=240)
        body = json.dumps({"images": [[[0.5] * 28] * 28]}).encode()
        req = urllib.request.Request(f"{url}/v1/score", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
        assert answer["model"]["version"] == str(version.version)
        assert len(answer["results"]) == 1
    finally:
        stop_tree(served)
