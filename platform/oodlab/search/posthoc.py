"""``oodlab tune-posthoc``: search post-hoc score knobs of a trained checkpoint on cached
features, with Optuna over Ray tasks, on validation OOD only.

1. :func:`extract` caches the checkpoint's outputs (``oodlab.detect.cache``): one Ray task
   per shard of every set (ID train / val / test, validation and test OOD), a GPU per task
   when the cluster has GPUs. A second search on the same checkpoint and data reads the
   cache and runs no network.
2. :func:`search` runs, per score, a seeded TPE study (Optuna ask/tell) whose trials are Ray
   tasks: fit on ID train (bounded-memory ``fit_chunks``), score ID val and every validation
   OOD set, objective = mean validation AUROC. Each trial is an MLflow child run. Before any
   trial, :func:`knob_effects` checks that every searched knob changes the score (a knob with
   no effect is an error). A score that needs the network (ODIN's input perturbation,
   ``needs_model``) cannot be read from the cache: its trials run the model over the
   validation sets, and only those (it fits nothing on ID train), on a GPU each when the
   cluster has GPUs (as do the trials of a search without the cache).
3. Test sets are scored once, at the end, for the default and the best setting of each
   score; the best detector over all scores is logged to the parent run (and registered when
   ``tracking.model_name`` is set) like a trained run's, so ``oodlab promote`` works on it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset

from oodlab.console import progress as say
from oodlab.detect.cache import FeatureCache, cache_for, checkpoint_hash, data_hash
from oodlab.detect.detector import Detector
from oodlab.detect.evaluate import group_means
from oodlab.detect.metrics import ood_metrics, threshold_at_tpr
from oodlab.detect.outputs import Outputs, collect_outputs, score_loader, set_head
from oodlab.detect.provenance import bundle_split_tags, code_version, digest
from oodlab.detect.scores import PostHocScore, build_score
from oodlab.detect.stats import chunks_of
from oodlab.errors import SpecError
from oodlab.spec import ExperimentSpec

# knob -> (kind, low, high[, log]) ; "C" / "D" stand for the number of classes / feature dim
Space = dict[str, tuple]
SPACES: dict[str, Space] = {
    "msp": {}, "max_logit": {},
    # 0 = Lee et al.'s exact tied covariance, 1 = Euclidean distance to the nearest class mean
    "mahalanobis": {"shrinkage": ("float", 0.0, 1.0, False)},
    "energy": {"temperature": ("float", 0.05, 100.0, True)},
    # Liang et al. 2018 (Sec. 4) search T in 1..1000 and eps in [0, 0.004]; eps needs the network
    "odin": {"temperature": ("float", 1.0, 1000.0, True), "epsilon": ("float", 0.0, 0.004, False)},
    "knn": {"k": ("int", 1, 200, True)},
    "react": {"percentile": ("float", 50.0, 99.9, False)},
    "ash": {"percentile": ("float", 10.0, 95.0, False), "variant": ("cat", "s", "p", "b")},
    "vim": {"dim": ("int", 2, "D-1", True)},
    "gen": {"gamma": ("float", 0.01, 1.0, True), "top": ("int", 1, "C", False)},
}
DEFAULT_SCORES = list(SPACES)


def _resolve(v: Any, num_classes: int, dim: int) -> Any:
    if isinstance(v, str) and v in ("C", "D-1"):
        return num_classes if v == "C" else dim - 1
    return v


def suggest(trial, space: Space, num_classes: int, dim: int) -> dict[str, Any]:
    """Sample one setting of ``space`` from an Optuna trial."""
    out: dict[str, Any] = {}
    for knob, (kind, *args) in space.items():
        if kind == "cat":
            out[knob] = trial.suggest_categorical(knob, list(args))
            continue
        low, high = (_resolve(a, num_classes, dim) for a in args[:2])
        log = bool(args[2]) if len(args) > 2 else False
        fn = trial.suggest_int if kind == "int" else trial.suggest_float
        out[knob] = fn(knob, low, high, log=log)
    return out


def fitted(name: str, params: dict[str, Any], train: Outputs | None, *,
           supervised: bool = True) -> PostHocScore:
    """A score fitted on ID-train outputs in chunks (bounded memory)."""
    score = build_score(name, **params)
    if score.needs_fit:
        if train is None:
            raise ValueError(f"score {name!r} must be fitted on ID-train outputs")
        labels = train.labels if supervised and train.labels.ndim == 1 else None
        set_head(score, train.head)
        score.fit_chunks(chunks_of(train.features, train.logits, labels, 8192))
    return score


def knob_effects(name: str, space: Space, train: Outputs, probe: Outputs, num_classes: int,
                 *, score_probe: Callable[[PostHocScore], Tensor] | None = None
                 ) -> dict[str, float]:
    """For each knob: the largest change of the probe scores between its two extreme values
    (the others at their defaults). A knob that changes no score is a SpecError: a search
    over it would silently search nothing. ``score_probe`` scores the probe images through
    the network, for scores that need it (``needs_model``: ODIN)."""
    def probe_scores(score: PostHocScore) -> Tensor:
        if score_probe is not None:
            return score_probe(score).double()
        if score.needs_model:
            raise ValueError(f"score {name!r} needs the network: pass score_probe")
        return score.score(probe.logits, probe.features).double()

    effects = {}
    for knob, (kind, *args) in space.items():
        values = list(args) if kind == "cat" else [
            _resolve(a, num_classes, train.features.shape[1]) for a in args[:2]]
        scores = [probe_scores(fitted(name, {knob: v}, train)) for v in values]
        change = max((s - scores[0]).abs().max().item() for s in scores[1:])
        # a change that only rescales all scores leaves every ranking as it is
        ranks = [s.argsort().argsort().double() for s in scores]
        moved = max((r - ranks[0]).abs().max().item() for r in ranks[1:])
        if not change > 1e-9 or (kind != "cat" and moved == 0 and _monotone_knob(name, knob)):
            raise SpecError(f"search space of {name!r}: knob {knob!r} does not change the score "
                            f"between {values} (max change {change:.3g}); drop it")
        effects[knob] = change
    return effects


def _monotone_knob(name: str, knob: str) -> bool:
    """Knobs whose only possible effect is the ranking (a pure rescaling is no effect)."""
    return (name, knob) in {("energy", "temperature"), ("odin", "temperature"),
                            ("knn", "k"), ("gen", "gamma"), ("gen", "top")}


def val_objective(scores: dict[str, Tensor]) -> dict[str, float]:
    """Per-set validation AUROC/FPR and their means (the objective: ``val/auroc``), from the
    scores of ``id_val`` and of every ``val_ood:<name>`` set."""
    s_id = scores["id_val"]
    per = {k.removeprefix("val_ood:"): ood_metrics(s_id, s) for k, s in scores.items()
           if k.startswith("val_ood:")}
    out = {f"val/{n}/{k}": v for n, m in per.items() for k, v in m.items()
           if k in ("auroc", "fpr95")}
    out["val/auroc"] = float(np.mean([m["auroc"] for m in per.values()]))
    out["val/fpr95"] = float(np.mean([m["fpr95"] for m in per.values()]))
    return out


# ---------------------------------------------------------------- Ray tasks


def _model_from_state(state: dict[str, Any]):
    from oodlab.methods import detector_from_state

    return detector_from_state(state).model


def _extract_shard(state: dict[str, Any], ds, lo: int, hi: int, batch_size: int) -> Outputs:
    from oodlab.data.bundle import eval_loader

    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model_from_state(state).to(device)
    return collect_outputs(model, eval_loader(Subset(ds, range(lo, hi)), batch_size), device)


def is_val(key: str) -> bool:
    return key == "id_val" or key.startswith("val_ood:")


def _trial(name: str, params: dict[str, Any], outputs: dict[str, Outputs] | None,
           network: tuple | None) -> dict[str, float]:
    """One setting: fit on ID train, score the validation sets. ``network`` = (state, sets,
    batch size): run the model over the sets, as a search without a cache must, and as a
    score that needs the network (ODIN) always does."""
    from oodlab.data.bundle import eval_loader

    torch.set_num_threads(1)
    if network is not None:
        state, sets, bs = network
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = _model_from_state(state).to(device)
        if build_score(name).needs_model:
            score = fitted(name, params, None)
            return val_objective({k: score.score_loader(model, eval_loader(ds, bs), device)
                                  for k, ds in sets.items() if is_val(k)})
        outputs = {k: collect_outputs(model, eval_loader(ds, bs), device)
                   for k, ds in sets.items()}
    assert outputs is not None
    score = fitted(name, params, outputs["id_train"])
    return val_objective({k: score.score(o.logits, o.features) for k, o in outputs.items()
                          if is_val(k)})


# ---------------------------------------------------------------- extraction


def sets_of(bundle) -> dict[str, Any]:
    sets = {"id_train": bundle.id_train, "id_val": bundle.id_val, "id_test": bundle.id_test}
    sets |= {f"val_ood:{n}": ds for n, ds in bundle.val_ood.items()}
    sets |= {f"ood:{n}": ds for n, ds in bundle.test_ood.items()}
    return sets


def extract(state: dict[str, Any], spec: ExperimentSpec, bundle, root: str | Path, *,
            shard_size: int = 4096) -> tuple[FeatureCache, bool]:
    """The cache of this checkpoint on this data; (cache, hit). On a miss every shard of
    every set is one Ray task (a GPU each when the cluster has any)."""
    import ray

    sets = sets_of(bundle)
    key_data = data_hash(spec.data.model_dump(mode="json") | {"seed": spec.seed},
                         {k: len(ds) for k, ds in sets.items()})
    cache = cache_for(root, checkpoint_hash(state["model_state"]), key_data)
    if cache.complete:
        return cache, True
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(_extract_shard)
    state_ref = ray.put(state)
    jobs = []
    for name, ds in sets.items():
        ds_ref = ray.put(ds)
        for i, lo in enumerate(range(0, len(ds), shard_size)):
            hi = min(lo + shard_size, len(ds))
            jobs.append((name, i, hi - lo, task.remote(state_ref, ds_ref, lo, hi,
                                                        spec.data.eval_batch_size)))
    shards: dict[str, list[tuple[str, int]]] = {n: [] for n in sets}
    head = None
    for name, i, rows, ref in jobs:
        out = ray.get(ref)
        head = head or out.head
        shards[name].append((cache.write_shard(name, i, out), rows))
    cache.finish(shards, head, {"checkpoint": cache.path.name.split("-")[0],
                                "data": key_data, "gpu": gpus})
    return cache, False


# ---------------------------------------------------------------- the search


@dataclass
class ScoreSearch:
    name: str
    default: dict[str, Any]
    best: dict[str, Any]
    default_val: float
    best_val: float
    trials: list[tuple[dict[str, Any], float]] = field(default_factory=list)
    knob_effects: dict[str, float] = field(default_factory=dict)
    test_default: dict[str, float] = field(default_factory=dict)
    test_best: dict[str, float] = field(default_factory=dict)


def search_score(name: str, outputs: dict[str, Outputs] | None, n_trials: int, seed: int, *,
                 num_classes: int, dim: int, parallel: int, network: tuple | None = None,
                 on_trial: Callable[[str, int, dict, dict], None] | None = None,
                 ) -> ScoreSearch:
    """Seeded TPE over ``SPACES[name]`` (the default setting is trial 0), trials as Ray tasks
    run ``parallel`` at a time."""
    import optuna
    import ray

    space = SPACES[name]
    gpu = network is not None and ray.cluster_resources().get("GPU", 0) > 0  # trials run it
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_trial)
    out_ref = ray.put(outputs) if outputs is not None else None
    net_ref = ray.put(network) if network is not None else None
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    defaults = {k: v for k, v in build_score(name).config().items() if k in space}
    for k, (kind, *args) in space.items():  # defaults "half of D" / "M above C" in range
        if kind == "int":
            high = _resolve(args[1], num_classes, dim)
            defaults[k] = min(high, dim // 2 if defaults.get(k) is None else defaults[k])
    if space:
        study.enqueue_trial(defaults)
    total = n_trials if space else 1
    trials: list[tuple[dict[str, Any], float]] = []
    done = 0
    while done < total:
        batch = [study.ask() for _ in range(min(parallel, total - done))]
        params = [suggest(t, space, num_classes, dim) for t in batch]
        results = ray.get([task.remote(name, p, out_ref, net_ref) for p in params])
        for t, p, r in zip(batch, params, results, strict=True):
            study.tell(t, r["val/auroc"])
            trials.append((p, r["val/auroc"]))
            if on_trial:
                on_trial(name, t.number, p, r)
        done += len(batch)
    best = max(trials, key=lambda pv: pv[1])
    return ScoreSearch(name, defaults, best[0], trials[0][1], best[1], trials)


SetScorer = Callable[[PostHocScore, str], Tensor]


def set_scorer(outputs: dict[str, Outputs], model: torch.nn.Module, datasets: dict[str, Any],
               batch_size: int) -> SetScorer:
    """Scores of one set (by cache key): from the cached outputs, or through the model for a
    score that needs the network (:func:`oodlab.detect.outputs.score_loader`)."""
    from oodlab.data.bundle import eval_loader

    def scores_of(score: PostHocScore, key: str) -> Tensor:
        return score_loader(model, score, eval_loader(datasets[key], batch_size),
                            outputs.get(key))

    return scores_of


def test_metrics(score: PostHocScore, scores_of: SetScorer, keys: list[str],
                 groups: dict[str, list[str]]) -> dict[str, float]:
    """Test scoring, once: per-set metrics and OpenOOD group means (headline ``mean``)."""
    s_id = scores_of(score, "id_test")
    per = {k.removeprefix("ood:"): ood_metrics(s_id, scores_of(score, k))
           for k in keys if k.startswith("ood:")}
    flat = {f"{n}/{k}": v for n, m in per.items() for k, v in m.items()}
    flat |= {f"{g}/{k}": v for g, m in group_means(per, groups).items() for k, v in m.items()}
    return flat


def spec_hash(spec: ExperimentSpec) -> str:
    return digest(spec.model_dump(mode="json"))


def tune_posthoc(ref: str, *, overrides: list[str] | None = None, scores: list[str] | None = None,
                 n_trials: int = 50, seed: int = 0, use_cache: bool = True,
                 parallel: int | None = None, register: bool = True,
                 tracking_uri: str | None = None) -> dict[str, Any]:
    """The whole command: load the checkpoint (``runs:/`` and ``models:/`` refs are read from
    ``tracking_uri``), cache its outputs, search every score, score the test sets once, log
    and register the best detector. Returns a summary dict."""
    import ray
    import yaml

    from oodlab.cluster.ray_local import init_ray
    from oodlab.data.bundle import load_bundle
    from oodlab.spec.experiment import validate_spec
    from oodlab.spec.overrides import apply_overrides
    from oodlab.track import tracking

    scores = scores or DEFAULT_SCORES
    bad = [s for s in scores if s not in SPACES]
    if bad:
        raise SpecError(f"--scores: no search space for {bad}; known: {sorted(SPACES)}")
    t0 = time.perf_counter()
    detector = tracking.load_detector(ref, tracking_uri)
    state = detector.state()
    raw = apply_overrides(dict(state["spec"]), overrides or [])
    spec = validate_spec(raw | {"name": f"{state['spec']['name']}_posthoc"})
    init_ray(num_cpus=None)
    parallel = parallel or max(1, int(ray.cluster_resources().get("CPU", 1)))
    bundle = load_bundle(spec, include_test=True)
    root = Path(spec.storage or spec.workdir_path) / "feature_cache"
    t_extract = time.perf_counter()
    cache, hit = extract(state, spec, bundle, root)
    t_extract = time.perf_counter() - t_extract
    outputs = {name: cache.outputs(name) for name in cache.sets}
    num_classes, dim = bundle.num_classes, outputs["id_train"].features.shape[1]
    datasets, bs = sets_of(bundle), spec.data.eval_batch_size
    val_sets = {k: v for k, v in datasets.items() if is_val(k)}
    network = None if use_cache else (state, val_sets | {"id_train": bundle.id_train}, bs)
    scores_of = set_scorer(outputs, detector.model, datasets, bs)
    probe = {"id_val": Subset(bundle.id_val, range(min(512, len(bundle.id_val))))}
    probe_scorer = set_scorer({}, detector.model, probe, bs)
    provenance = {"oodlab.provenance.checkpoint": cache.path.name.split("-")[0],
                  "oodlab.provenance.data": cache.path.name.split("-")[1],
                  "oodlab.provenance.spec": spec_hash(spec),
                  "oodlab.provenance.code": code_version(),
                  "oodlab.posthoc.source": ref, "oodlab.posthoc.cache": str(cache.path)}
    provenance |= bundle_split_tags(bundle)
    client = tracking.client_for(spec)
    parent = tracking.start_run(spec, tags=provenance | {"oodlab.posthoc": "true"})
    exp_id = client.get_run(parent).info.experiment_id

    def log_trial(name: str, number: int, params: dict, metrics: dict) -> None:
        from mlflow.entities import Metric, Param

        run = client.create_run(exp_id, run_name=f"{name}-{number}", tags={
            "mlflow.parentRunId": parent, "oodlab.score": name} | provenance)
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id,
                         params=[Param(k, str(v)) for k, v in params.items()],
                         metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        client.set_terminated(run.info.run_id)

    results: dict[str, ScoreSearch] = {}
    t_search = time.perf_counter()
    for name in scores:
        # a score that needs the network (ODIN) runs it over the validation sets every trial
        needs_net = build_score(name).needs_model
        net = (state, val_sets, bs) if needs_net else network
        effects = knob_effects(name, SPACES[name], outputs["id_train"], outputs["id_val"],
                               num_classes, score_probe=(lambda s: probe_scorer(s, "id_val"))
                               if needs_net else None)
        res = search_score(name, None if net else outputs, n_trials, seed,
                           num_classes=num_classes, dim=dim, parallel=parallel,
                           network=net, on_trial=log_trial)
        res.knob_effects = effects
        results[name] = res
        say(f"{name}: val/auroc default {res.default_val:.4f} -> best {res.best_val:.4f} "
            f"{res.best}")
    t_search = time.perf_counter() - t_search
    # test sets: scored once, at the end, for the default and the best setting
    metrics: dict[str, float] = {}
    for name, res in results.items():
        res.test_default = test_metrics(fitted(name, res.default, outputs["id_train"]),
                                        scores_of, list(outputs), bundle.test_groups)
        res.test_best = res.test_default if res.best == res.default else test_metrics(
            fitted(name, res.best, outputs["id_train"]), scores_of, list(outputs),
            bundle.test_groups)
        metrics |= {f"val/{name}/default/auroc": res.default_val,
                    f"val/{name}/tuned/auroc": res.best_val}
        metrics |= {f"test/{name}/default/{k}": v for k, v in res.test_default.items()}
        metrics |= {f"test/{name}/tuned/{k}": v for k, v in res.test_best.items()}
    champion = max(results.values(), key=lambda r: r.best_val)
    score = fitted(champion.name, champion.best, outputs["id_train"])
    threshold = threshold_at_tpr(scores_of(score, "id_val"), spec.eval.tpr)
    best_spec = spec.model_copy(update={"eval": spec.eval.model_copy(update={
        "scores": [champion.name],
        "score_params": {champion.name: champion.best}})})
    metrics |= {"val/auroc": champion.best_val, "threshold": threshold}
    metrics |= {f"test/{k.removeprefix('mean/')}": v for k, v in champion.test_best.items()
                if k.startswith("mean/")}
    metrics |= {"time/extract_s": t_extract, "time/search_s": t_search,
                "time/total_s": time.perf_counter() - t0, "cache_hit": float(hit)}
    tracking.log_metrics(client, parent, metrics)
    best = Detector(detector.model, score, spec=best_spec.model_dump(mode="json"),
                    num_classes=bundle.num_classes, threshold=threshold,
                    meta={"posthoc_source": ref} | provenance)
    if register:
        info = tracking.log_detector(best_spec if best_spec.tracking.model_name else spec,
                                     parent, best)
        client.set_tag(parent, tracking.MODEL_URI_TAG, info["model_uri"])
    with mlflow_tmp() as tmp:
        (tmp / "spec.resolved.yaml").write_text(
            yaml.safe_dump(best_spec.model_dump(mode="json"), sort_keys=False))
        client.log_artifact(parent, str(tmp / "spec.resolved.yaml"))
        (tmp / "posthoc.json").write_text(json.dumps(
            {n: {"default": r.default, "best": r.best, "default_val": r.default_val,
                 "best_val": r.best_val, "knob_effects": r.knob_effects,
                 "test_default": r.test_default, "test_best": r.test_best,
                 "trial_values": [v for _, v in r.trials]} for n, r in results.items()},
            indent=1, default=float))
        client.log_artifact(parent, str(tmp / "posthoc.json"))
    client.set_terminated(parent)
    return {"run_id": parent, "source": ref, "provenance": provenance,
            "cache": str(cache.path), "cache_hit": hit,
            "best_score": champion.name, "best_params": champion.best,
            "val_auroc": champion.best_val, "time_extract_s": t_extract,
            "time_search_s": t_search, "results": results, "metrics": metrics}


def mlflow_tmp():
    import contextlib
    import tempfile

    @contextlib.contextmanager
    def ctx():
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)

    return ctx()


__all__ = ["SPACES", "ScoreSearch", "extract", "knob_effects", "search_score", "tune_posthoc"]
