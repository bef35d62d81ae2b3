"""Shared-storage preflight: a run over several Ray nodes with node-local storage or a SQLite
MLflow store is refused before any MLflow run or training, in one sentence saying what to
set; one node, s3:// storage, an NFS path and an MLflow server pass."""

from __future__ import annotations

import pytest

from oodlab.cluster import preflight
from oodlab.cluster.preflight import ClusterShape
from oodlab.errors import StorageError
from oodlab.spec import validate_spec
from tests.helpers import tiny_spec

MOUNTS = """\
overlay / overlay rw 0 0
/dev/sda1 /data ext4 rw 0 0
nfs-server:/export /shared nfs4 rw 0 0
juicefs /mnt/jfs fuse.juicefs rw 0 0
"""
ONE = ClusterShape(nodes=1, max_node_cpus=8, max_node_gpus=0)
TWO = ClusterShape(nodes=2, max_node_cpus=8, max_node_gpus=0)
SERVER = "http://mlflow:5000"


def test_filesystem_type_is_the_longest_mount_prefix():
    assert preflight.filesystem_type("/shared/runs/x", MOUNTS) == "nfs4"
    assert preflight.filesystem_type("/sharedX/runs", MOUNTS) == "overlay"
    assert preflight.filesystem_type("/data", MOUNTS) == "ext4"
    assert preflight.filesystem_type("/mnt/jfs/a", MOUNTS) == "fuse.juicefs"


def test_spans_nodes_counts_nodes_and_what_one_node_holds():
    assert not preflight.spans_nodes(ONE, 2, 1.0, False)
    assert preflight.spans_nodes(TWO, 1, 1.0, False)  # Tune/Train may place it anywhere
    assert preflight.spans_nodes(ONE, 3, 4.0, False)  # 12 CPUs > the 8 of the largest node
    assert preflight.spans_nodes(ONE, 2, 1.0, True)  # 2 GPU workers, no node has a GPU


@pytest.mark.parametrize("storage, tracking", [
    ("s3://bucket/runs", SERVER), ("/shared/runs", SERVER), ("/mnt/jfs/runs", SERVER),
    ("s3://bucket/runs", "postgresql://u@db/mlflow"), ("gs://bucket/runs", "https://mlflow")])
def test_shared_storage_and_tracking_pass_on_two_nodes(storage, tracking):
    preflight.check(storage, tracking, num_workers=2, shape=TWO, mounts=MOUNTS)


def test_node_local_storage_or_sqlite_is_refused_with_what_to_set():
    with pytest.raises(StorageError) as err:
        preflight.check("/data/ray", SERVER, num_workers=2, shape=TWO, mounts=MOUNTS)
    msg = str(err.value)
    assert msg.startswith("a run on 2 Ray nodes needs storage and tracking every node reaches:")
    assert "set storage=s3://<bucket>/<prefix>" in msg and "/data/ray" in msg and "ext4" in msg
    assert "MLFLOW_TRACKING_URI" not in msg and msg.count(".") == 1 and "\n" not in msg

    with pytest.raises(StorageError, match=r"set MLFLOW_TRACKING_URI=http://<mlflow-server>"
                                           r":5000 \(tracking sqlite:///w/mlflow.db"):
        preflight.check("s3://b/r", "sqlite:///w/mlflow.db", num_workers=1, shape=TWO)
    with pytest.raises(StorageError, match="storage=.* and MLFLOW_TRACKING_URI="):
        preflight.check("/data/ray", "file:///w/mlruns", num_workers=1, shape=TWO,
                        mounts=MOUNTS)
    with pytest.raises(StorageError, match=r"more than one Ray node \(3 workers x 4 CPUs"):
        preflight.check("/data/ray", SERVER, num_workers=3, cpus_per_worker=4, shape=ONE,
                        mounts=MOUNTS)


def test_one_node_may_keep_everything_local():
    preflight.check("/data/ray", "sqlite:///w/mlflow.db", num_workers=2, shape=ONE,
                    mounts=MOUNTS)


def test_cluster_shape_reads_alive_nodes():
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}},
             {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0}}]
    assert preflight.cluster_shape(nodes) == ClusterShape(2, 4.0, 1.0)


@pytest.mark.ray
def test_oodlab_run_is_refused_before_any_mlflow_run(ray_session, tmp_path, monkeypatch,
                                                       capsys):
    """The default spec (``<workdir>/ray`` + SQLite) on a cluster that looks two nodes wide:
    ``oodlab run`` exits 2 with the sentence, and no MLflow experiment was created."""
    import yaml
    from mlflow.tracking import MlflowClient

    from oodlab.cli.main import main
    from oodlab.track import tracking

    monkeypatch.setattr(preflight, "cluster_shape", lambda: TWO)
    raw = tiny_spec(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("oodlab: error: a run on 2 Ray nodes needs storage and tracking")
    assert "set storage=s3://<bucket>/<prefix>" in err and "MLFLOW_TRACKING_URI=" in err
    spec = validate_spec(raw)
    assert MlflowClient(tracking.tracking_uri(spec)).get_experiment_by_name("tests") is None


@pytest.mark.parametrize("nodes, gpus, use_gpu, placement, expected", [
    (1, 0, False, "auto", "driver"),   # one machine: the driver is where the compute is
    (2, 0, False, "auto", "task"),     # a multi-node cluster: never the (small) head pod
    (1, 1, True, "auto", "task"),      # a GPU run: on a GPU
    (1, 1, False, "auto", "driver"),   # a CPU run on a GPU machine
    (2, 0, False, "driver", "driver"),  # stated placements win
    (1, 0, False, "task", "task"),
])
def test_eval_placement(tmp_path, monkeypatch, nodes, gpus, use_gpu, placement, expected):
    import ray

    from oodlab.train import pipeline

    spec = validate_spec(tiny_spec(tmp_path, resources={"use_gpu": use_gpu},
                                   eval={"placement": placement}))
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(pipeline.preflight, "cluster_shape",
                        lambda: ClusterShape(nodes, 4.0, float(gpus)))
    assert pipeline.eval_placement(spec) == expected
