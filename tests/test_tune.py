"""A real Ray Tune + Optuna search (ASHA), its MLflow runs, promotion and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from oodlab import tracking
from oodlab.config import validate_spec
from oodlab.promote import promote
from oodlab.search_space import load_space
from oodlab.tuning import ROLE_TAG, SEARCH_TAG, run_search
from tests.helpers import tiny_spec

pytestmark = pytest.mark.ray

SPACE = {
    "method": "energy_oe",
    "objectives": [{"metric": "val/auroc", "mode": "max"}],
    "params": {"method.m_in": {"type": "uniform", "low": -30, "high": -10},
               "method.m_out": {"type": "uniform", "low": -8, "high": -2},
               "train.lr": {"type": "loguniform", "low": 0.001, "high": 0.2}},
    "num_samples": 5,
    "max_concurrent": 1,
    "resources": {"num_workers": 1, "cpus_per_worker": 1},
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    "searcher": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
}


def _setup(tmp_path, **space):
    spec_raw = tiny_spec(tmp_path, train={"epochs": 4}, tracking={
        "experiment": "tune-tests", "model_name": "tuned"})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_raw))
    space_path = tmp_path / "space.yaml"
    space_path.write_text(yaml.safe_dump(SPACE | space))
    return validate_spec(spec_raw), spec_path, space_path


def _trial_runs(spec, name):
    client = tracking.client_for(spec)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    return client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{SEARCH_TAG}` = '{name}' and tags.`{ROLE_TAG}` = 'trial'"))


def test_search_stops_early_tracks_every_trial_and_promotes_only_when_better(ray_session,
                                                                             tmp_path):
    spec, _, space_path = _setup(tmp_path)
    out = run_search(spec, load_space(space_path), space_path, name="s1")
    assert len(out.trials) == 5
    epochs = [t.epochs for t in out.trials]
    assert max(epochs) == 4 and min(epochs) < 4, epochs  # ASHA stopped at least one early
    study = optuna.load_study(study_name="s1", storage=out.study_storage)
    assert len(study.trials) == 5
    runs = _trial_runs(spec, "s1")
    assert len(runs) == 5
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {out.parent_run_id}
    stopped = [r for r in runs if r.data.tags.get("oodlab.stopped_early") == "true"]
    assert stopped and all(r.info.status == "KILLED" for r in stopped)
    by_run = {r.info.run_id: r for r in runs}
    best = by_run[out.best.run_id]
    assert best.data.metrics["val/auroc"] == max(t.values[0] for t in out.trials)
    assert not any(k.startswith("test/") for k in best.data.metrics)  # selection saw no test set
    # sampled values reached the trial's spec
    assert float(best.data.params["method.m_in"]) == pytest.approx(out.best.params["method.m_in"])

    first = promote(out.best.run_id, metric="val/auroc")
    assert first.champion and first.champion_value is None and first.test_metrics
    client = MlflowClient(tracking.tracking_uri(spec))
    assert str(client.get_model_version_by_alias("tuned", "champion").version) == first.version
    worst = min((t for t in out.trials if t.run_id != out.best.run_id),
                key=lambda t: t.values[0])
    second = promote(worst.run_id, metric="val/auroc")
    assert not second.champion and second.version != first.version
    assert str(client.get_model_version_by_alias("tuned", "champion").version) == first.version
    forced = promote(worst.run_id, metric="val/auroc", force=True)
    assert forced.version == second.version  # the same run is not registered twice
    assert str(client.get_model_version_by_alias("tuned", "champion").version) == second.version


def test_killed_search_resumes_without_rerunning_finished_trials(ray_session, tmp_path):
    spec, spec_path, space_path = _setup(tmp_path, num_samples=4,
                                         scheduler={"name": "fifo"})
    spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json") | {
        "train": spec.train.model_dump(mode="json") | {"epochs": 2}}))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "oodlab", "tune", str(spec_path), "--space", str(space_path),
         "--name", "s2", "--no-promote"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline, seen = time.time() + 240, []
    try:
        for line in proc.stdout:  # kill the driver as soon as the second trial has finished
            seen.append(line)
            if "[oodlab tune] trial 2/4" in line or time.time() > deadline:
                time.sleep(3)  # let Tune write its state (a trial takes far longer than this)
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any("[oodlab tune] trial 2/4" in line for line in seen), "".join(seen[-30:])
    spec = validate_spec(yaml.safe_load(spec_path.read_text()))
    before = {r.data.tags["oodlab.trial_id"]: r for r in _trial_runs(spec, "s2")
              if r.info.status == "FINISHED"}
    assert len(before) >= 2

    out = run_search(spec, load_space(space_path), space_path, name="s2", resume=True)
    assert len(out.trials) == 4
    after = {r.data.tags["oodlab.trial_id"]: r for r in _trial_runs(spec, "s2")}
    assert len(after) == 4  # one MLflow run per trial, none duplicated
    for trial_id, run in before.items():  # finished trials were kept, not rerun
        assert after[trial_id].info.end_time == run.info.end_time
    assert len(optuna.load_study(study_name="s2", storage=out.study_storage).trials) >= 4
