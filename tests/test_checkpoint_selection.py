"""Checkpoint selection under ``train.select_constraints``: the score Ray Train keeps
checkpoints by, the MLflow tag of the selected epoch, and the served model."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from oodlab.spec import SELECT_SCORE, SpecError, TrainSpec, validate_spec
from oodlab.train.epoch import selection_metrics
from tests.helpers import tiny_spec


def train_spec(**kw) -> TrainSpec:
    return TrainSpec(select_metric="val/auroc", **kw)


def test_the_score_is_the_metric_when_feasible_and_the_worst_value_when_not():
    t = train_spec(select_constraints=[{"metric": "val/id_acc", "min": 0.9}])
    assert t.score_attribute == SELECT_SCORE
    ok = selection_metrics(t, {"val/auroc": 0.8, "val/id_acc": 0.95})
    assert ok == {SELECT_SCORE: 0.8, "select/feasible": 1.0}
    bad = selection_metrics(t, {"val/auroc": 0.99, "val/id_acc": 0.85})
    assert bad == {SELECT_SCORE: -math.inf, "select/feasible": 0.0}
    missing = selection_metrics(t, {"val/auroc": 0.99})  # a metric not reported: infeasible
    assert missing["select/feasible"] == 0.0
    low = train_spec(select_mode="min", select_constraints=[{"metric": "val/id_acc", "min": 0.9}])
    assert selection_metrics(low, {"val/auroc": 0.1, "val/id_acc": 0.5})[SELECT_SCORE] == math.inf
    plain = train_spec()  # no constraints: Ray scores the metric itself, nothing is added
    assert plain.score_attribute == "val/auroc" and selection_metrics(plain, {"a": 1.0}) == {}


def test_relative_bounds_are_offsets_from_the_init_model():
    t = train_spec(select_constraints=[
        {"metric": "val/id_acc", "min": -0.01, "relative_to": "init"}])
    init = {"val/id_acc": 0.94}
    assert selection_metrics(t, {"val/auroc": 0.9, "val/id_acc": 0.931}, init)[
        "select/feasible"] == 1.0
    out = selection_metrics(t, {"val/auroc": 0.95, "val/id_acc": 0.92}, init)
    assert out["select/feasible"] == 0.0 and out["select/init/val/id_acc"] == 0.94
    assert "relative to the init model" in t.select_constraints[0].describe()


def test_the_best_feasible_epoch_is_selected_else_the_last():
    t = train_spec(select_constraints=[{"metric": "val/id_acc", "min": 0.9}])

    def selected(epochs: list[tuple[float, float]]) -> int:
        best, pick = None, None
        for i, (auroc, acc) in enumerate(epochs):
            score = selection_metrics(t, {"val/auroc": auroc, "val/id_acc": acc})[SELECT_SCORE]
            if t.replaces(score, best):
                best, pick = score, i
        return pick

    # the highest validation AUROC (epoch 0) breaks the constraint: epoch 3 is served
    assert selected([(0.99, 0.8), (0.90, 0.95), (0.97, 0.85), (0.93, 0.96), (0.92, 0.97)]) == 3
    assert selected([(0.99, 0.8), (0.90, 0.85), (0.97, 0.85)]) == 2  # none feasible: the last
    assert selected([(0.90, 0.8), (0.91, 0.95), (0.95, 0.85)]) == 1  # feasible is never lost


def test_spec_errors_name_the_field(tmp_path):
    def check(train: dict, match: str, **extra) -> None:
        with pytest.raises(SpecError, match=match):
            validate_spec(tiny_spec(tmp_path, train={"epochs": 1, **train}, **extra))

    check({"select_constraints": [{"metric": "val/nope", "min": 0}]},
          r"train.select_constraints.0.metric: 'val/nope' is never reported")
    check({"select_constraints": [{"metric": "val/id_acc", "min": -0.01,
                                   "relative_to": "init"}]},
          r"train.select_constraints.0.relative_to: 'init' needs init_from")
    check({"select_metric": None, "select_constraints": [{"metric": "val/id_acc", "min": 0}]},
          r"train.select_constraints.0: constraints choose among epochs by "
          r"train.select_metric")
    check({"select_constraints": [{"metric": "val/id_acc"}]}, "needs min and/or max")
    check({"select_constraints": [{"metric": "val/id_acc", "min": 0,
                                   "relative_to": "best"}]}, "relative_to")


@pytest.mark.ray
def test_constraints_choose_the_served_epoch_end_to_end(ray_session, tmp_path):
    """Through Ray Train and MLflow: a bound on the epoch number forces which checkpoint is
    selected and served; a fine-tune's relative bound reads the init model's accuracy, and when
    no epoch keeps the bounds the last is served."""
    from oodlab.track.tracking import SELECTED_CHECKPOINT_TAG, load_detector
    from oodlab.train.loop import CHECKPOINT_FILE
    from oodlab.train.pipeline import run_experiment

    spec = validate_spec(tiny_spec(tmp_path, name="select_pre", method={"name": "supervised"},
                                   data={"oe": []}, train={"epochs": 3, "select_constraints": [
                                       {"metric": "epoch", "min": 1, "max": 1}]}))
    res = run_experiment(spec)
    client = MlflowClient(res.tracking_uri)
    run = client.get_run(res.run_id)
    feasible = client.get_metric_history(res.run_id, "select/feasible")
    assert [h.value for h in sorted(feasible, key=lambda h: h.step)] == [0.0, 1.0, 0.0]
    assert run.data.metrics["train/selected_epoch"] == 1
    payload = torch.load(f"{run.data.tags[SELECTED_CHECKPOINT_TAG]}/{CHECKPOINT_FILE}",
                         weights_only=True)
    assert payload["epoch"] == 1  # the middle epoch, whatever its validation AUROC
    served = load_detector(f"runs:/{res.run_id}", res.tracking_uri).model.state_dict()
    assert all(torch.equal(v, payload["model"][k]) for k, v in served.items())

    # a fine-tune whose relative bound no epoch can keep (ID accuracy + 1): the last is served,
    # and the bound was read off the init model (the run above's served model, same data)
    ft = validate_spec(tiny_spec(
        tmp_path, name="select_ft", method={"name": "supervised"}, data={"oe": []},
        init_from=f"runs:/{res.run_id}", train={"epochs": 2, "select_constraints": [
            {"metric": "val/id_acc", "min": 1.0, "relative_to": "init"}]}))
    res_ft = run_experiment(ft)
    m = client.get_run(res_ft.run_id).data.metrics
    assert m["select/init/val/id_acc"] == pytest.approx(run.data.metrics["val_final/id_acc"])
    assert m["train/selected_epoch"] == 1 and m["select/feasible"] == 0.0
