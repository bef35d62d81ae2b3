"""Search-space files: typed, checked against the spec before any trial; the Pareto front."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from oodlab.search.tune import TrialRecord, pareto_front, tune_domain
from oodlab.spec import SpecError, load_spec, validate_spec
from oodlab.spec.search_space import apply_params, check_space, load_space
from tests.helpers import tiny_spec

ROOT = Path(__file__).resolve().parents[1]


def _space(tmp_path, **overrides) -> Path:
    raw = {"method": "energy_oe", "objectives": [{"metric": "val/auroc", "mode": "max"}],
           "params": {"method.m_in": {"type": "uniform", "low": -30, "high": -15}}} | overrides
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("params, message", [
    ({"method.m_in": {"type": "uniform", "low": -10, "high": -10}}, "empty range"),
    ({"method.weight": {"type": "loguniform", "low": 0, "high": 1}}, "low > 0"),
    ({"method.k": {"type": "int", "low": 5, "high": 2}}, "empty range"),
    ({"method.m_in": {"type": "normal", "low": 0, "high": 1}}, "method.m_in"),
    ({"method.m_in": {"type": "categorical", "choices": []}}, "choices"),
])
def test_malformed_space_names_the_bad_entry(tmp_path, params, message):
    with pytest.raises(SpecError, match=message):
        load_space(_space(tmp_path, params=params))


def test_space_is_checked_against_the_spec(tmp_path):
    spec = validate_spec(tiny_spec(tmp_path))  # energy_oe with val_letters as validation OOD
    bad_field = load_space(_space(tmp_path, params={
        "method.m_bogus": {"type": "uniform", "low": 0, "high": 1}}))
    with pytest.raises(SpecError, match="params.method.m_bogus"):
        check_space(bad_field, spec)
    out_of_range = load_space(_space(tmp_path, params={
        "train.lr": {"type": "loguniform", "low": 0.01, "high": 1.0}}))
    check_space(out_of_range, spec)  # fine
    negative = load_space(_space(tmp_path, params={
        "method.weight": {"type": "uniform", "low": -1, "high": 1}}))
    with pytest.raises(SpecError, match="method.weight = -1"):
        check_space(negative, spec)
    never = load_space(_space(tmp_path, objectives=[{"metric": "val/id_map", "mode": "max"}]))
    with pytest.raises(SpecError, match="'val/id_map' is never reported"):
        check_space(never, spec)
    other = load_space(_space(tmp_path, method="edge"))
    with pytest.raises(SpecError, match="for method 'edge'"):
        check_space(other, spec)


def test_every_shipped_space_fits_its_job():
    pairs = {"energy_oe": "quickstart", "quickstart": "quickstart", "edge": "edge_oe_select",
             "energy_oe_ml": "edge_energy_oe_ml", "um": "um", "umap": "umap", "lmd": "lmd",
             "ccl": "ccl", "ccl_views": "fmnist_simclr",
             "edge_fmnist": "edge_fmnist"}
    files = sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml"))
    assert files == sorted(pairs)
    for space, job in pairs.items():
        check_space(load_space(ROOT / "search_spaces" / f"{space}.yaml"),
                    load_spec(ROOT / "jobs" / f"{job}.yaml"))


def test_sampled_params_reach_the_spec_even_through_a_null_section(tmp_path):
    spec = validate_spec(tiny_spec(tmp_path))
    tuned = apply_params(spec, {"method.m_in": -20.5, "data.oe_select.threshold": 0.3})
    assert tuned.method.m_in == -20.5 and tuned.data.oe_select.threshold == 0.3
    assert spec.method.m_in == -25.0  # the original is untouched


def test_tune_domains():
    space = load_space(ROOT / "search_spaces" / "edge.yaml")
    domains = {k: tune_domain(p) for k, p in space.params.items()}
    k = domains["method.k"].sample()
    assert 8 <= k <= 64 and k % 8 == 0
    assert domains["data.oe_select.top_k"].sample() in (8, 16, 32)
    alpha = space.params["method.alpha"]
    draws = [domains["method.alpha"].sample() for _ in range(200)]
    assert all(alpha.low <= a <= alpha.high for a in draws)
    # log-uniform: about half the draws fall below the geometric midpoint
    mid = (alpha.low * alpha.high) ** 0.5
    assert 0.3 < sum(a < mid for a in draws) / len(draws) < 0.7


def _t(name, *values):
    return TrialRecord(name, None, {}, list(values), 1, "done")


def test_pareto_front_by_hand():
    a, b, c, d = _t("a", 0.9, 0.5), _t("b", 0.8, 0.9), _t("c", 0.7, 0.4), _t("d", 0.9, 0.5)
    # c is dominated by a (and b); a and d tie, so neither dominates the other
    front = pareto_front([a, b, c, d], ["max", "max"])
    assert {t.trial_id for t in front} == {"a", "b", "d"}
    # minimising the second objective instead: b (0.9) is dominated by a (0.9 >= 0.8, 0.5 < 0.9)
    front = pareto_front([a, b, c], ["max", "min"])
    assert {t.trial_id for t in front} == {"a", "c"}


def test_constraints_are_checked_and_measure_violation(tmp_path):
    from oodlab.spec.search_space import Constraint, SearchSpace

    spec = validate_spec(tiny_spec(tmp_path))
    base = {"method": "energy_oe", "objectives": [{"metric": "val/auroc"}],
            "params": {"method.weight": {"type": "uniform", "low": 0.05, "high": 0.5}}}
    space = SearchSpace.model_validate(base | {"constraints": [{"metric": "val/id_acc",
                                                                "min": 0.9}]})
    check_space(space, spec)
    with pytest.raises(SpecError, match="constraint metric 'val/nope'"):
        check_space(SearchSpace.model_validate(
            base | {"constraints": [{"metric": "val/nope", "min": 0}]}), spec)
    with pytest.raises(ValueError, match="needs min and/or max"):
        Constraint(metric="val/id_acc")
    c = Constraint(metric="val/id_acc", min=0.9, max=0.99)
    assert c.violation(0.95) == 0 and c.violation(0.85) == pytest.approx(0.05)
    assert c.violation(1.0) == pytest.approx(0.01) and c.violation(None) == float("inf")


def test_selection_rejects_a_trial_that_breaks_a_constraint():
    """The trial with the best OOD objective but a broken classifier is never the best."""
    from oodlab.search.tune import TrialRecord, select_best
    from oodlab.spec.search_space import SearchSpace

    space = SearchSpace.model_validate({
        "method": "energy_oe", "objectives": [{"metric": "val/auroc"}],
        "params": {"method.weight": {"type": "uniform", "low": 0.05, "high": 0.5}},
        "constraints": [{"metric": "val/id_acc", "min": 0.97}]})
    c = space.constraints[0]

    def trial(i, auroc, acc):
        return TrialRecord(f"t{i}", f"r{i}", {}, [auroc], 4, "done", [c.violation(acc)])

    trials = [trial(0, 0.999, 0.66), trial(1, 0.95, 0.98), trial(2, 0.97, 0.975)]
    pareto, best = select_best(trials, space)
    assert best is trials[2] and trials[0] not in pareto and not trials[0].feasible
    _, none = select_best([trial(0, 0.999, 0.5)], space)
    assert none is None
    unconstrained = space.model_copy(update={"constraints": []})
    assert select_best([TrialRecord("t0", "r0", {}, [0.999], 4, "done")],
                       unconstrained)[1].trial_id == "t0"


def test_the_study_learns_each_trials_constraint_violation():
    """A finished trial's violations reach its Optuna trial (``Trial.set_constraint``), which
    the TPE sampler reads; a missing metric counts as a large violation, never as kept."""
    import optuna
    from ray import tune

    from oodlab.search.tune import ConstrainedOptunaSearch
    from oodlab.spec.search_space import Constraint

    c = Constraint(metric="val/id_acc", min=0.97)
    searcher = ConstrainedOptunaSearch(
        [c], space={"x": tune.uniform(0.0, 1.0)}, metric="val/auroc", mode="max",
        sampler=optuna.samplers.TPESampler(seed=0))
    for trial_id, result in (("a", {"val/auroc": 0.9, "val/id_acc": 0.95}),
                             ("b", {"val/auroc": 0.8, "val/id_acc": 0.99}),
                             ("c", {"val/auroc": 0.7})):
        assert "x" in searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, result)
    done = searcher._ot_study.trials
    assert [t.constraints for t in done] == [
        {"val/id_acc >= 0.97": pytest.approx(0.02)}, {"val/id_acc >= 0.97": 0.0},
        {"val/id_acc >= 0.97": 1e6}]


def test_rank_correlation_of_validation_and_test_over_finished_trials():
    """Spearman over trials with a test metric; a stopped trial (no test/*) is left out."""
    from oodlab.search.tune import RankCorrelation, TrialRecord, rank_correlation
    from oodlab.spec.search_space import SearchSpace

    space = SearchSpace.model_validate({
        "method": "energy_oe", "objectives": [{"metric": "val/auroc"}],
        "params": {"method.weight": {"type": "uniform", "low": 0.05, "high": 0.5}}})
    trials = [TrialRecord(f"t{i}", f"r{i}", {}, [v], 4, "done")
              for i, v in enumerate([0.9, 0.8, 0.7, 0.6])]
    metrics = {"r0": {"test/auroc": 0.95}, "r1": {"test/auroc": 0.9},
               "r2": {"test/auroc": 0.8}, "r3": {}}
    assert rank_correlation(trials, space, metrics) == {"val/auroc": RankCorrelation(1.0, 3)}
    metrics["r2"]["test/auroc"] = 0.99  # validation ranks r2 last of three, test ranks it first
    assert rank_correlation(trials, space, metrics)["val/auroc"].rho == pytest.approx(-0.5)
    metrics["r2"] = {}  # two points: no correlation is reported, and the count says why
    two = rank_correlation(trials, space, metrics)["val/auroc"]
    assert math.isnan(two.rho) and two.trials == 2


def test_a_space_overrides_only_the_resources_it_sets(tmp_path):
    from oodlab.search.tune import trial_spec

    spec = validate_spec(tiny_spec(tmp_path, resources={"num_workers": 1, "max_failures": 2}))
    space = load_space(_space(tmp_path, resources={"num_workers": 2, "cpus_per_worker": 1}))
    r = trial_spec(spec, space).resources
    # a worker node lost mid-trial is retried as the spec says, not with the default 0
    assert (r.num_workers, r.cpus_per_worker, r.max_failures) == (2, 1.0, 2)
    assert trial_spec(spec, load_space(_space(tmp_path))).resources == spec.resources
