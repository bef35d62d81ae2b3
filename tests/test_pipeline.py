"""End to end on the shared Ray: 2-worker DDP run tracked in MLflow, and worker fault recovery."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from oodlab.data.bundle import load_bundle
from oodlab.methods import load_detector_file
from oodlab.spec import validate_spec
from oodlab.track import tracking
from oodlab.train.loop import fit
from oodlab.train.pipeline import EVAL_WHERE_TAG, finish_run, run_experiment
from tests.helpers import descendants, tiny_spec

pytestmark = pytest.mark.ray


def _artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_two_worker_ddp_run_is_tracked(ray_session, tmp_path):
    """Also: eval.placement=task scores the test sets in a Ray task (another process), each
    per-set metric reaches MLflow once, and a driver-side evaluation of the same model gives
    the same numbers."""
    spec = validate_spec(tiny_spec(  # decoding in a loader process per worker (OE too)
        tmp_path, resources={"num_workers": 2, "loader_workers": 1},
        tracking={"experiment": "tests", "model_name": "tiny-detector"},
        eval={"placement": "task"}))
    result = run_experiment(spec)

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["resources.num_workers"] == "2"
    assert run.data.params["method.name"] == "energy_oe"
    # where it ran: the shared test Ray has 4 logical CPUs and no GPU
    assert "Ray cluster with 4 CPUs and 0 GPUs" in run.data.tags["oodlab.hardware"]
    m = run.data.metrics
    for key in ("test/id_acc", "test/auroc", "test/fpr95", "threshold", "val_final/auroc",
                "test/energy/letters/auroc", "test/msp/gaussian/fpr95",
                "test/energy/mean/aupr_out"):
        assert key in m, key
    assert 0.0 <= m["test/energy/letters/auroc"] <= 1.0
    assert 0.0 <= m["test/id_acc"] <= 1.0 and np.isfinite(m["train/loss"])
    history = client.get_metric_history(result.run_id, "val/auroc")
    assert [h.step for h in history] == [0]  # per-epoch metric, one point per epoch
    # optimizer steps, not only epochs: 256 images over 2 workers, batch 64, last batch dropped
    steps = client.get_metric_history(result.run_id, "train/optimizer_steps")
    assert [h.value for h in steps] == [2.0]
    assert [h.value for h in client.get_metric_history(result.run_id, "train/loss")]

    where = run.data.tags[EVAL_WHERE_TAG]
    assert where.startswith("task: ") and f"pid {os.getpid()} " not in where, where
    for key in ("test/energy/letters/auroc", "test/msp/gaussian/fpr95", "test/auroc"):
        assert len(client.get_metric_history(result.run_id, key)) == 1, key
    driver = spec.model_copy(update={"eval": spec.eval.model_copy(update={"placement": "driver"})})
    other = tracking.start_run(driver)
    again = finish_run(driver, other, result.report.detector.model, register=False)
    tracking.end_run(driver, other, True)
    assert client.get_run(other).data.tags[EVAL_WHERE_TAG].startswith(
        f"driver: {socket.gethostname()} pid {os.getpid()} ")
    for key in ("test/energy/letters/auroc", "test/msp/mean/fpr95", "threshold"):
        assert again.metrics[key] == pytest.approx(result.metrics[key], abs=1e-6), key

    artifacts = _artifact_paths(client, result.run_id)
    for name in ("spec.resolved.yaml", "plots/roc_energy.png", "plots/hist_energy.png",
                 "plots/roc_msp.png", "plots/epochs.png"):
        assert name in artifacts, (name, artifacts)

    # the registered pyfunc model gives the detector's scores and is_ood
    version = client.get_model_version("tiny-detector", result.model["version"])
    assert version.run_id == result.run_id
    mlflow.set_tracking_uri(result.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/tiny-detector/{result.model['version']}")
    bundle = load_bundle(spec)
    x = torch.stack([bundle.id_test[i][0] for i in range(8)])
    out = pyfunc.predict(x.numpy())
    expected = result.report.detector.score(x)
    assert list(out.columns) == ["score", "is_ood"]
    np.testing.assert_allclose(out["score"].to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    thr = result.metrics["threshold"]
    assert (out["is_ood"].to_numpy() == (expected.numpy() < thr)).all()


def test_detector_round_trip_is_exact(ray_session, tmp_path):
    spec = validate_spec(tiny_spec(tmp_path, method={"name": "supervised"},
                                   eval={"scores": ["knn"], "score_params": {"knn": {"k": 5}}}))
    result = run_experiment(spec)
    det = result.report.detector
    path = det.save(tmp_path / "det.pt")
    again = load_detector_file(path)
    x = torch.rand(6, 1, 28, 28)
    assert torch.allclose(det.score(x), again.score(x), atol=1e-6)
    assert again.threshold == det.threshold
    with pytest.raises(ValueError, match="expected a batch of shape"):
        again.score(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="NaN"):
        again.score(torch.full((1, 1, 28, 28), float("nan")))


def _train_worker_pids() -> list[int]:
    """OS processes of this session's Ray Train workers (Ray titles them
    ``ray::RayTrainWorker...``): below this process, never another Ray's on the machine."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cmd.startswith("ray::RayTrainWorker"):
            pids.append(pid)
    return pids


def test_killed_worker_resumes_from_last_checkpoint(ray_session, tmp_path):
    """SIGKILL one DDP worker after the first checkpoint: with max_failures=1 the run
    restarts from that checkpoint (epoch counter continues) and finishes."""
    spec = validate_spec(tiny_spec(
        tmp_path, name="faulty", data={"limit": 1024, "batch_size": 32}, train={"epochs": 6},
        method={"name": "supervised"},
        resources={"num_workers": 2, "max_failures": 1}))
    bundle = load_bundle(spec, include_test=False)
    run_name = "faulty-run"
    run_dir = Path(spec.workdir_path) / "ray" / run_name
    killed: list[int] = []

    def committed_epochs() -> list[int]:
        """Epochs whose checkpoint Ray Train has committed (its manager snapshot)."""
        try:
            snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []
        return [int(c["metrics"]["epoch"]) for c in snap["checkpoint_results"]]

    def killer() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            if committed_epochs():
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    outcome = fit(spec, run_name=run_name, num_classes=bundle.num_classes)
    thread.join(timeout=5)

    assert killed, "no training worker was killed (the run ended before a checkpoint?)"
    assert outcome.metrics["epoch"] == 5  # finished all 6 epochs
    assert outcome.metrics["run/start_epoch"] >= 1  # the restarted group began past epoch 0
    assert outcome.metrics["val/id_acc"] > 0.5  # it really learned (chance is 0.1)
    # Ray keeps the num_to_keep=2 best by score (val/auroc here, not the epoch) plus the latest
    epochs = committed_epochs()
    assert 5 in epochs and len(epochs) <= 3, epochs

