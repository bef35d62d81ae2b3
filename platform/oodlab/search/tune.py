"""``oodlab tune``: Ray Tune + Optuna over one spec; every trial is one Ray Train run.

    Tuner(trial driver, OptunaSearch(TPE | random, stored study), ASHA | FIFO)
      trial driver: sampled spec -> TorchTrainer(..., callbacks=[MLflow, TuneReportCallback])

One MLflow parent run per search and one child run per trial. Trials report their per-epoch
validation metrics (never test metrics) to Tune; ASHA stops poor trials on the first
objective. A killed driver continues with ``resume=True`` (``Tuner.restore``): finished
trials are kept, unfinished ones resume from their last Ray Train checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray.train
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from oodlab.console import progress, time_left
from oodlab.data.bundle import load_bundle
from oodlab.search.promote import run_spec, served_value
from oodlab.spec import ExperimentSpec, SpecError, validate_spec
from oodlab.spec.search_space import (
    Categorical,
    Constraint,
    IntRange,
    LogUniform,
    SearchSpace,
    Uniform,
    apply_params,
    check_space,
)
from oodlab.track import plots, tracking
from oodlab.track.callback import epoch_callback
from oodlab.train.loop import TrainOutcome, fit, model_from_checkpoint, storage_path
from oodlab.train.pipeline import apply_oe_selection, finish_run

SEARCH_TAG = "oodlab.search"
ROLE_TAG = "oodlab.role"
TRIAL_TAG = "oodlab.trial_id"
# the Ray node id of the trial's driver (Tune's trainable actor), set each time it starts
DRIVER_NODE_TAG = "oodlab.trial.driver_node"
# a trial's driver only waits on its Ray Train run: it holds no CPU (a non-zero resource is
# required, so it asks for a token amount of memory). It runs on the head node, as the search
# driver of a Ray job does: Ray Train puts the run's controller on its caller's node, and a
# worker node that is lost (a preempted pod) must take Train workers with it, which Ray Train
# restarts from the last checkpoint, never the trial's driver, which would fail the trial.
DRIVER_RESOURCES = {"CPU": 0, "memory": 10_000_000, "node:__internal_head__": 0.001}


@dataclass
class TrialRecord:
    trial_id: str
    run_id: str | None
    params: dict[str, Any]
    values: list[float]  # last reported value of each objective (nan if never reported)
    epochs: int
    status: str
    violations: list[float] = field(default_factory=list)  # per constraint; 0 = kept

    @property
    def feasible(self) -> bool:
        return all(v == 0 for v in self.violations)


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's rho between a ``val/<m>`` objective and its ``test/<m>``, and over how many
    finished trials (rho is NaN with fewer than three or a constant column)."""
    rho: float
    trials: int


@dataclass
class SearchOutcome:
    name: str
    parent_run_id: str
    trials: list[TrialRecord]
    pareto: list[TrialRecord]
    best: TrialRecord | None  # None when no trial keeps the space's constraints
    study_storage: str
    experiment_path: str
    rank_correlation: dict[str, RankCorrelation] = field(default_factory=dict)  # val vs test


def tune_domain(param) -> Any:
    """Tune search domain of one space entry (OptunaSearch converts it to a distribution)."""
    if isinstance(param, LogUniform):
        return tune.loguniform(param.low, param.high)
    if isinstance(param, Uniform):
        return tune.uniform(param.low, param.high)
    if isinstance(param, IntRange):
        return tune.qrandint(param.low, param.high, param.step)
    if isinstance(param, Categorical):
        return tune.choice(param.choices)
    raise TypeError(f"unknown parameter type {type(param).__name__}")


def study_url(spec: ExperimentSpec, url: str | None) -> str:
    """The Optuna study storage: ``url`` (any SQLAlchemy URL) or SQLite under the workdir."""
    if url:
        return url
    spec.workdir_path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{spec.workdir_path / 'optuna.db'}"


def trial_spec(spec: ExperimentSpec, space: SearchSpace) -> ExperimentSpec:
    """The spec every trial starts from: the space's ``resources`` override only the fields
    the space sets (a space giving ``num_workers`` keeps the spec's ``max_failures``)."""
    if space.resources is None:
        return spec
    given = space.resources.model_dump(exclude_unset=True)
    return spec.model_copy(update={"resources": spec.resources.model_copy(update=given)})


def _trial_driver(config: dict[str, Any], *, base: dict[str, Any], search: str,
                  parent_run_id: str) -> None:
    """One trial: the sampled spec, a child MLflow run, a Ray Train run reporting to Tune."""
    spec = apply_params(validate_spec(base), config)
    trial_id = tune.get_context().get_trial_id()
    run_id = _child_run(spec, search, trial_id, parent_run_id)
    if ray.is_initialized():
        tracking.client_for(spec).set_tag(run_id, DRIVER_NODE_TAG,
                                          ray.get_runtime_context().get_node_id())
    outcome, failed = None, False
    try:
        bundle = load_bundle(spec, include_test=False)
        if spec.data.oe_select is not None:  # the trial's own threshold/top-k pick its OE sets
            spec = apply_oe_selection(spec, bundle, run_id)
        outcome = fit(spec, run_name=f"{search}-{trial_id}", num_classes=bundle.num_classes,
                      callbacks=[epoch_callback(spec, run_id), TuneReportCallback()],
                      run_id=run_id)
    except ray.train.TrainingFailedError as err:  # failed, not stopped: say so, Tune errors it
        client = tracking.client_for(spec)
        client.set_tag(run_id, "oodlab.error", str(err).strip().splitlines()[0][:500])
        client.set_terminated(run_id, status="FAILED")
        failed = True
        raise
    finally:  # also when Tune stops the trial (ASHA, or at max_t on the last epoch)
        if not failed:
            _close_trial_run(spec, run_id, outcome)


def _close_trial_run(spec: ExperimentSpec, run_id: str, outcome: TrainOutcome | None = None
                     ) -> None:
    """A trial that reported every epoch ends like any run (:func:`finish_run`: evaluated,
    detector logged) and is FINISHED; one stopped early is KILLED and tagged so."""
    client = tracking.client_for(spec)
    epochs = tracking.metric_history(spec, run_id, "epoch")
    done = bool(epochs) and int(epochs[-1][1]) + 1 >= spec.train.epochs
    if not done:
        client.set_tag(run_id, "oodlab.stopped_early", "true")
        client.set_terminated(run_id, status="KILLED")
        return
    if run_id_has_detector(client, run_id):  # a resumed search: evaluated already
        client.set_terminated(run_id, status="FINISHED")
        return
    if outcome is not None:
        model = outcome.model
    else:  # Tune stopped the trial right after its last report: use that checkpoint
        import ray.train

        checkpoint = ray.train.Checkpoint(client.get_run(run_id).data.tags[
            tracking.SELECTED_CHECKPOINT_TAG])
        bundle = load_bundle(spec, include_test=False)
        model = model_from_checkpoint(spec, checkpoint, bundle.num_classes)
    ok = False
    try:
        finish_run(spec, run_id, model, register=False)  # `oodlab promote` registers
        ok = True
    finally:
        tracking.end_run(spec, run_id, ok)


def run_id_has_detector(client, run_id: str) -> bool:
    return tracking.MODEL_URI_TAG in client.get_run(run_id).data.tags


def _child_run(spec: ExperimentSpec, search: str, trial_id: str, parent_run_id: str) -> str:
    """The trial's MLflow run; a trial resumed after a driver restart reuses its run."""
    client = tracking.client_for(spec)
    existing = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.`{SEARCH_TAG}` = '{search}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1)
    if existing:
        client.update_run(existing[0].info.run_id, status="RUNNING")
        return existing[0].info.run_id
    tags = {SEARCH_TAG: search, TRIAL_TAG: trial_id, ROLE_TAG: "trial"}
    return tracking.start_run(spec, tags=tags, parent_run_id=parent_run_id)


def _parent_run(spec: ExperimentSpec, name: str, space_path: str | Path, resume: bool) -> str:
    client = tracking.client_for(spec)
    exp_id = tracking.ensure_experiment(client, spec)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{SEARCH_TAG}` = '{name}' and tags.`{ROLE_TAG}` = "
                                "'search'", max_results=1)
    if found:
        if not resume:
            raise SpecError(f"a search named {name!r} already exists in experiment "
                            f"{spec.tracking.experiment!r}; pass --resume to continue it or "
                            "--name to start a new one")
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run_id = tracking.start_run(spec.model_copy(update={"name": name}),
                                tags={SEARCH_TAG: name, ROLE_TAG: "search"})
    client.log_artifact(run_id, str(space_path))
    return run_id


class _Progress(tune.Callback):
    """One line per finished trial: its first objective for the model it serves (the value
    the final table and ``oodlab promote`` judge it by, :func:`served_value`), the last
    epoch's beside it when that differs, the best so far, and the search's ETA (trials left
    at the pace of those finished so far). Values come from the trials'
    MLflow runs, so a resumed search counts the trials of the killed one; Tune's last result
    stands in for a run that cannot be read (a progress line never stops a search)."""

    def __init__(self, spec: ExperimentSpec, space: SearchSpace, name: str) -> None:
        self.spec, self.name = spec, name
        self.obj = space.objectives[0]
        self.total = space.num_samples
        self.setup()

    def setup(self, **info: Any) -> None:
        """Tune calls it as the search (or its resumption) starts: the ETA's clock."""
        self.started, self.finished_here = time.monotonic(), 0

    def _logged(self) -> dict[str, dict[str, float]]:
        """Each trial run's latest metrics, by Tune trial id."""
        try:
            client = tracking.client_for(self.spec)
            exp = client.get_experiment_by_name(self.spec.tracking.experiment)
            runs = _trial_runs(client, exp.experiment_id, self.name) if exp else []
        except Exception:  # noqa: BLE001 - the tracking store is down: Tune's values only
            return {}
        return {r.data.tags.get(TRIAL_TAG): r.data.metrics for r in runs}

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        metric, logged = self.obj.metric, self._logged()

        def value(t) -> float | None:
            m = logged.get(t.trial_id)
            return served_value(m, metric) if m else (t.last_result or {}).get(metric)

        done = [t for t in trials if t is trial or t.status in ("TERMINATED", "ERROR")]
        values = [v for t in done if (v := value(t)) is not None]
        best = (max if self.obj.mode == "max" else min)(values) if values else None
        shown, last = value(trial), (trial.last_result or {}).get(metric)
        text = "n/a" if shown is None else f"{shown:.4f}"
        if last is not None and shown is not None and f"{last:.4f}" != text:
            text += f" (last epoch {last:.4f})"
        epochs = (trial.last_result or {}).get("training_iteration", 0)
        self.finished_here += 1  # the pace of this process's trials (a resumed search)
        clock = time_left(time.monotonic() - self.started, self.finished_here,
                          max(self.total - len(done), 0))
        progress(f"trial {len(done)}/{self.total} {trial.trial_id} done after {epochs} "
                 f"epoch(s): {metric} {text}, best so far "
                 f"{'n/a' if best is None else f'{best:.4f}'} ({clock})", source="tune")


def _trial_runs(client, exp_id: str, name: str, where: str = "") -> list:
    """The MLflow runs of search ``name``'s trials (``where``: more of the filter)."""
    return client.search_runs([exp_id], filter_string=(
        f"tags.`{SEARCH_TAG}` = '{name}' and tags.`{ROLE_TAG}` = 'trial'{where}"),
        max_results=5000)


def run_search(spec: ExperimentSpec, space: SearchSpace, space_path: str | Path, *,
               name: str | None = None, resume: bool = False,
               storage_url: str | None = None) -> SearchOutcome:
    """Run (or continue) the search; returns every trial, the Pareto front and the best."""
    check_space(space, spec)
    spec = spec.pinned()  # trials run in their own directories: give them absolute paths
    space_path = Path(space_path).resolve()  # Ray may move this process's cwd (a Ray job's)
    name = name or f"{spec.name}-search"
    spec = trial_spec(spec, space)
    exp_path = f"{storage_path(spec)}/tune/{name}"
    if resume and not tune.Tuner.can_restore(exp_path):
        raise SpecError(f"--resume: no search to continue at {exp_path}")
    if not resume and Path(exp_path).exists():
        raise SpecError(f"search directory {exp_path} exists; pass --resume to continue the "
                        "search or --name to start a new one")
    from oodlab.train.pipeline import init_ray

    # save the search state at most a second after every trial event, so a killed driver
    # loses no finished trial (Tune's "auto" waits 10 s or more between saves). Not 0: that
    # saves at every turn of Tune's loop, and each save uploads the whole experiment
    # directory to remote storage, about eight times a second
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # verbose=0 (the RunConfig below) is silent only in Tune's legacy output engine: the new
    # one prints its experiment box and paths whatever the verbosity; _Progress reports
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    init_ray(spec)  # a multi-node search with node-local storage or tracking stops here
    parent = _parent_run(spec, name, space_path, resume)
    url = study_url(spec, storage_url)
    trainable = tune.with_resources(
        tune.with_parameters(_trial_driver, base=spec.model_dump(mode="json"), search=name,
                             parent_run_id=parent), DRIVER_RESOURCES)
    ok = False
    try:
        if resume:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = _new_tuner(spec, space, name, url, trainable)
        grid = tuner.fit()
        _close_stopped_trials(spec, name)  # evaluate trials Tune stopped at their last epoch
        outcome = _collect(spec, space, name, parent, grid, url, exp_path)
        _log_search(spec, space, outcome)
        ok = True
        return outcome
    finally:
        _close_stopped_trials(spec, name)
        tracking.end_run(spec, parent, ok)


def _new_tuner(spec: ExperimentSpec, space: SearchSpace, name: str, url: str, trainable
               ) -> tune.Tuner:
    metrics = [o.metric for o in space.objectives]
    modes = [o.mode for o in space.objectives]
    s = space.searcher
    if s.name == "tpe":  # TPE models feasibility from each trial's constraints (Optuna 5)
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    single = len(metrics) == 1
    searcher = ConstrainedOptunaSearch(
        space.constraints, metric=metrics[0] if single else metrics,
        mode=modes[0] if single else modes, sampler=sampler, study_name=name,
        storage=optuna.storages.RDBStorage(url))
    if space.scheduler.name == "asha":
        scheduler = ASHAScheduler(
            metric=metrics[0], mode=modes[0], time_attr="training_iteration",
            max_t=spec.train.epochs, grace_period=min(space.scheduler.grace_period,
                                                      spec.train.epochs),
            reduction_factor=space.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space={k: tune_domain(p) for k, p in space.params.items()},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=space.num_samples,
                                    max_concurrent_trials=space.max_concurrent),
        run_config=tune.RunConfig(name=name, storage_path=f"{storage_path(spec)}/tune",
                                  callbacks=[_Progress(spec, space, name)], verbose=0),
    )


class ConstrainedOptunaSearch(OptunaSearch):
    """Ray Tune's Optuna searcher that also tells the study how far each finished trial is
    outside the search space's constraints (Optuna's ``Trial.set_constraint``, one value per
    constraint, <= 0 when kept), so a constrained TPE learns where feasible trials lie."""

    def __init__(self, constraints: list[Constraint], *args: Any, **kwargs: Any) -> None:
        self._constraints = list(constraints)
        super().__init__(*args, **kwargs)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        ot_trial = getattr(self, "_ot_trials", {}).get(trial_id)
        if self._constraints and ot_trial is not None and result:
            for c in self._constraints:
                ot_trial.set_constraint(c.describe(),
                                        min(c.violation(result.get(c.metric)), 1e6))
        super().on_trial_complete(trial_id, result, error)


def _collect(spec: ExperimentSpec, space: SearchSpace, name: str, parent: str, grid,
             url: str, exp_path: str) -> SearchOutcome:
    client = tracking.client_for(spec)
    exp_id = client.get_run(parent).info.experiment_id
    runs = {r.data.tags.get(TRIAL_TAG): r for r in _trial_runs(client, exp_id, name)}
    metrics = {r.info.run_id: r.data.metrics for r in runs.values()}  # latest values
    trials = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        run_id = runs[trial_id].info.run_id if trial_id in runs else None
        # a finished trial serves its selected epoch: judge it by that model's values
        logged = metrics.get(run_id, {})

        def value(metric: str, m=m, logged=logged) -> float | None:
            return served_value(logged, metric) if logged else m.get(metric)

        values = [float(v) if (v := value(o.metric)) is not None else math.nan
                  for o in space.objectives]
        trials.append(TrialRecord(
            trial_id=trial_id, run_id=run_id,
            params={k: result.config.get(k) for k in space.params},
            values=values, epochs=int(m.get("training_iteration", 0)),
            status="error" if result.error else "done",
            violations=[c.violation(value(c.metric)) for c in space.constraints]))
    if not any(not math.isnan(t.values[0]) for t in trials):
        raise RuntimeError(f"search {name!r}: no trial reported {space.objectives[0].metric}")
    pareto, best = select_best(trials, space)
    return SearchOutcome(name, parent, trials, pareto, best, url, exp_path,
                         rank_correlation(trials, space, metrics))


def select_best(trials: list[TrialRecord], space: SearchSpace
                ) -> tuple[list[TrialRecord], TrialRecord | None]:
    """Constraints first, then the objectives: the Pareto front of the trials that keep every
    constraint, and its best on the first objective (None when no trial is feasible)."""
    feasible = [t for t in trials
                if t.feasible and not any(math.isnan(v) for v in t.values)]
    pareto = pareto_front(feasible, [o.mode for o in space.objectives]) if feasible else []
    first = space.objectives[0]
    best = max(pareto, key=lambda t: t.values[0] if first.mode == "max" else -t.values[0],
               default=None)
    return pareto, best


def rank_correlation(trials: list[TrialRecord], space: SearchSpace,
                     metrics: dict[str, dict[str, float]]) -> dict[str, RankCorrelation]:
    """Spearman's rank correlation, over the trials that finished (each evaluated once on the
    test sets by the one run path), between each ``val/<m>`` objective and its ``test/<m>``:
    does the validation metric that picks the champion rank the trials as the test sets do?
    ``metrics``: each trial run's logged metrics. NaN with fewer than three finished trials
    or a constant column."""
    from scipy.stats import spearmanr

    out: dict[str, RankCorrelation] = {}
    runs = {t.run_id: metrics.get(t.run_id, {}) for t in trials if t.run_id}
    for i, obj in enumerate(space.objectives):
        if not obj.metric.startswith("val/"):
            continue
        test_key = "test/" + obj.metric.removeprefix("val/")
        pairs = [(t.values[i], runs[t.run_id][test_key]) for t in trials
                 if t.run_id and test_key in runs[t.run_id] and not math.isnan(t.values[i])]
        rho = math.nan
        if len(pairs) >= 3 and len({p[0] for p in pairs}) > 1 and len({p[1] for p in pairs}) > 1:
            rho = float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)
        out[obj.metric] = RankCorrelation(rho, len(pairs))
    return out


def pareto_front(trials: list[TrialRecord], modes: list[str]) -> list[TrialRecord]:
    """Trials no other trial dominates (at least as good on every objective, better on one):
    Optuna's :attr:`optuna.study.Study.best_trials` over the trials' last reported values.

    The front is taken over these records (Tune's results, which carry the MLflow run ids),
    each added to an in-memory study as a completed trial numbered by its position, rather
    than over the searcher's stored study: that one may hold trials Tune never finished
    (asked before a driver was killed, or told a NaN) and has no link back to Tune's ids.
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
    try:
        study = optuna.create_study(
            directions=["maximize" if m == "max" else "minimize" for m in modes])
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.add_trials([optuna.trial.create_trial(values=t.values) for t in trials])
    front = {ft.number for ft in study.best_trials}
    return [t for i, t in enumerate(trials) if i in front]


def _log_search(spec: ExperimentSpec, space: SearchSpace, out: SearchOutcome) -> None:
    client = tracking.client_for(spec)
    names = [o.metric for o in space.objectives]
    table = {"trial_id": [t.trial_id for t in out.trials],
             "run_id": [t.run_id or "" for t in out.trials],
             "epochs": [t.epochs for t in out.trials],
             "pareto": [t in out.pareto for t in out.trials],
             "feasible": [t.feasible for t in out.trials]}
    table |= {k: [t.params[k] for t in out.trials] for k in space.params}
    table |= {m: [t.values[i] for t in out.trials] for i, m in enumerate(names)}
    client.log_table(out.parent_run_id, table, "trials.json")
    best = out.best.values if out.best is not None else [math.nan] * len(names)
    tracking.log_metrics(client, out.parent_run_id, {
        "search/num_trials": len(out.trials),
        "search/num_feasible": sum(t.feasible for t in out.trials),
        "search/total_epochs": sum(t.epochs for t in out.trials),
        **{f"search/best/{m}": best[i] for i, m in enumerate(names)},
        **{f"search/spearman_val_test/{m}": c.rho for m, c in out.rank_correlation.items()},
        **{f"search/spearman_trials/{m}": c.trials for m, c in out.rank_correlation.items()}})
    client.set_tag(out.parent_run_id, "oodlab.best_run_id",
                   out.best.run_id or "" if out.best is not None else "")
    fig = plots.parallel_coordinates_figure(
        [t.params for t in out.trials], [t.values[0] for t in out.trials], names[0])
    tracking.log_figure(spec, out.parent_run_id, fig, "plots/parallel_coordinates.png")
    plots.close(fig)


def _close_stopped_trials(spec: ExperimentSpec, name: str) -> None:
    """Close trial runs a stopped trial driver left RUNNING (see :func:`_close_trial_run`),
    each with its own sampled spec: one that reported every epoch is evaluated here."""
    client = tracking.client_for(spec)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    if exp is None:
        return
    for r in _trial_runs(client, exp.experiment_id, name,
                         " and attributes.status = 'RUNNING'"):
        _close_trial_run(run_spec(client, r.info.run_id), r.info.run_id)
