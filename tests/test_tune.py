"""A real Ray Tune + Optuna search (ASHA), its MLflow runs and promotion."""

from __future__ import annotations

import re

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from oodlab.errors import ModelReferenceError
from oodlab.search import tune as search_tune
from oodlab.search.promote import promote
from oodlab.search.tune import DRIVER_NODE_TAG, ROLE_TAG, SEARCH_TAG, TRIAL_TAG, run_search
from oodlab.spec import validate_spec
from oodlab.spec.search_space import load_space
from oodlab.track import tracking
from tests.helpers import tiny_spec

pytestmark = pytest.mark.ray

SPACE = {
    "method": "energy_oe",
    "objectives": [{"metric": "val/auroc", "mode": "max"}],
    # deterministic: every trial ASHA stopped before its 4th epoch breaks it (the tiny model's
    # ID accuracy sits at chance, so a val/id_acc bound would be a coin flip here)
    "constraints": [{"metric": "epoch", "min": 3}],
    "params": {"method.m_in": {"type": "uniform", "low": -30, "high": -10},
               "method.m_out": {"type": "uniform", "low": -8, "high": -2},
               "train.lr": {"type": "loguniform", "low": 0.001, "high": 0.2}},
    # Every trial is a few Ray processes started on a 2-core runner (about a minute each), so
    # the search has as few trials as its assertions need. One after another (max_concurrent 1)
    # ASHA decides in a fixed order, and with seeded sampling and seeded training the outcome is
    # fixed: trial 1 finishes (the first at every rung), trial 2 is stopped at the first rung
    # (val/auroc 0.59 under the cutoff 0.75) and trial 3, TPE's first model-based pick, passes
    # both rungs (0.71 vs 0.67, 0.77 vs 0.65) and finishes: a stopped trial, a best and a worse
    # finished one for promote.
    "num_samples": 3,
    "max_concurrent": 1,
    "resources": {"num_workers": 1, "cpus_per_worker": 1},
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    "searcher": {"name": "tpe", "seed": 7, "n_startup_trials": 2},
}


def _setup(tmp_path, epochs=4, **space):
    spec_raw = tiny_spec(tmp_path, train={"epochs": epochs}, tracking={
        "experiment": "tune-tests", "model_name": "tuned"})
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_raw))
    space_path = tmp_path / "space.yaml"
    space_path.write_text(yaml.safe_dump(SPACE | space))
    return validate_spec(spec_raw), spec_path, space_path


def _trial_runs(spec, name):
    client = tracking.client_for(spec)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    return search_tune._trial_runs(client, exp.experiment_id, name)


def test_search_stops_early_tracks_every_trial_and_promotes_only_when_better(ray_session,
                                                                             tmp_path):
    spec, _, space_path = _setup(tmp_path)
    out = run_search(spec, load_space(space_path), space_path, name="s1")
    assert len(out.trials) == 3
    epochs = [t.epochs for t in out.trials]
    assert max(epochs) == 4 and min(epochs) < 4, epochs  # ASHA stopped at least one early
    study = optuna.load_study(study_name="s1", storage=out.study_storage)
    assert len(study.trials) == 3
    runs = _trial_runs(spec, "s1")
    assert len(runs) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {out.parent_run_id}
    # each trial's run names the node its driver ran on (here the one local node)
    assert {r.data.tags.get(DRIVER_NODE_TAG) for r in runs} == {
        ray_session.get_runtime_context().get_node_id()}
    stopped = [r for r in runs if r.data.tags.get("oodlab.stopped_early") == "true"]
    assert stopped and all(r.info.status == "KILLED" for r in stopped)
    by_run = {r.info.run_id: r for r in runs}
    best = by_run[out.best.run_id]
    # the best is judged by the model it serves (its selected epoch: val_final/*), among the
    # trials that keep the constraint
    assert best.data.metrics["val_final/auroc"] == max(t.values[0] for t in out.trials
                                                       if t.feasible)
    for t in out.trials:
        assert t.feasible == (by_run[t.run_id].data.metrics["epoch"] >= 3)
        assert t.feasible == (t.run_id not in {r.info.run_id for r in stopped})
    assert not any(t in out.pareto for t in out.trials if not t.feasible)
    # every trial that finished went through the one run path (evaluated once, detector
    # logged); stopped trials did not, and selection above used validation metrics only
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert best.info.run_id in {r.info.run_id for r in finished}
    assert len(finished) + len(stopped) == 3
    for r in finished:
        assert "test/auroc" in r.data.metrics and tracking.MODEL_URI_TAG in r.data.tags
    for r in stopped:
        assert "test/auroc" not in r.data.metrics and tracking.MODEL_URI_TAG not in r.data.tags
    # sampled values reached the trial's spec
    assert float(best.data.params["method.m_in"]) == pytest.approx(out.best.params["method.m_in"])

    first = promote(out.best.run_id, metric="val/auroc")
    assert first.champion and first.champion_value is None and first.test_metrics
    client = MlflowClient(tracking.tracking_uri(spec))
    assert str(client.get_model_version_by_alias("tuned", "champion").version) == first.version
    # promote only registers what a run logged: a trial stopped early has no detector
    with pytest.raises(ModelReferenceError, match="stopped early"):
        promote(stopped[0].info.run_id, metric="val/auroc")
    # a worse finished run is registered but does not take the alias unless forced
    others = [t for t in out.trials if t.feasible and t.run_id != out.best.run_id]
    if not others:  # ASHA let only the best finish: equal is not better, nor registered twice
        again = promote(out.best.run_id, metric="val/auroc")
        assert not again.champion and again.version == first.version
        return
    worst_run = min(others, key=lambda t: t.values[0]).run_id
    second = promote(worst_run, metric="val/auroc")
    assert not second.champion and second.version != first.version
    assert str(client.get_model_version_by_alias("tuned", "champion").version) == first.version
    forced = promote(worst_run, metric="val/auroc", force=True)
    assert forced.version == second.version  # the same run is not registered twice
    assert str(client.get_model_version_by_alias("tuned", "champion").version) == second.version


def test_a_trial_selects_its_oe_sets_with_its_own_threshold(tmp_path, monkeypatch):
    """A sampled data.oe_select.threshold / top_k must act: the trial ranks the OE candidates
    with them and trains on its choice (it once trained on every candidate, whatever τ said)."""
    from types import SimpleNamespace

    from oodlab.detect.oe_select import rank
    from oodlab.train import pipeline

    raw = tiny_spec(tmp_path, tracking={"experiment": "tune-oe-select"})
    raw["data"] |= {"oe": ["oe_textures", "oe_noise"], "oe_select": {"backbone": "random"}}
    thresholds = []

    def fake_select(spec, bundle=None, backbone=None):  # fixed ranking; the trial's τ decides
        thresholds.append(spec.data.oe_select.threshold)
        return rank({"oe_textures": 1.0, "oe_noise": 2.0}, "smallest",
                    spec.data.oe_select.threshold), "random"

    trained_on = []

    def fake_fit(spec, **kwargs):
        trained_on.append((spec.data.oe, spec.data.oe_select))
        raise RuntimeError("stop after the choice")

    monkeypatch.setattr(pipeline, "select_oe", fake_select)
    monkeypatch.setattr(search_tune, "fit", fake_fit)
    monkeypatch.setattr(search_tune, "TuneReportCallback", lambda: None)
    spec = validate_spec(raw)
    client = tracking.client_for(spec)
    parent = tracking.start_run(spec, tags={ROLE_TAG: "search"})
    for trial, tau in (("t0", 0.0), ("t1", 1.0)):
        monkeypatch.setattr(search_tune.tune, "get_context",
                            lambda trial=trial: SimpleNamespace(get_trial_id=lambda: trial))
        with pytest.raises(RuntimeError, match="stop after the choice"):
            search_tune._trial_driver({"data.oe_select.threshold": tau}, base=raw,
                                      search="s", parent_run_id=parent)
    assert thresholds == [0.0, 1.0]
    assert trained_on == [(["oe_textures"], None), (["oe_textures", "oe_noise"], None)]
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
    assert sorted(r.data.params["data.oe_selected"] for r in runs) == [
        "oe_textures", "oe_textures,oe_noise"]


def test_a_trial_line_shows_the_value_it_is_judged_by_and_the_best_so_far(tmp_path, capsys):
    """A finished trial's line gives its served value (val_final, its selected epoch's), as
    the final table does, the last epoch's beside it when that differs, and the best so far
    over finished trials, to 4 digits (it once showed only the last epoch's value, which the
    table then contradicted, and an unrounded best)."""
    from types import SimpleNamespace

    spec, _, space_path = _setup(tmp_path)
    client = tracking.client_for(spec)
    parent = tracking.start_run(spec, tags={ROLE_TAG: "search"})
    for trial_id, metrics in (("a", {"val/auroc": 0.8807559, "val_final/auroc": 0.9464}),
                              ("b", {"val/auroc": 0.6655})):  # b stopped early: no val_final
        run_id = tracking.start_run(spec, parent_run_id=parent, tags={
            SEARCH_TAG: "s", ROLE_TAG: "trial", TRIAL_TAG: trial_id})
        tracking.log_metrics(client, run_id, metrics)
    a = SimpleNamespace(trial_id="a", status="RUNNING",
                        last_result={"val/auroc": 0.8807559, "training_iteration": 8})
    b = SimpleNamespace(trial_id="b", status="RUNNING",
                        last_result={"val/auroc": 0.6655, "training_iteration": 4})
    lines = search_tune._Progress(spec, load_space(space_path), "s")
    lines.on_trial_complete(0, [a, b], a)
    a.status = "TERMINATED"
    lines.on_trial_complete(0, [a, b], b)
    out = capsys.readouterr().out.splitlines()
    assert [line.rsplit(" (", 1)[0] for line in out] == [
        "[oodlab tune] trial 1/3 a done after 8 epoch(s): val/auroc 0.9464 (last epoch "
        "0.8808), best so far 0.9464",
        "[oodlab tune] trial 2/3 b done after 4 epoch(s): val/auroc 0.6655, best so far 0.9464"]
    assert all(re.search(r" \(ETA \d+:\d\d\)$", line) for line in out), out
