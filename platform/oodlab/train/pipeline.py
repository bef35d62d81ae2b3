"""The one path of a run: spec -> Ray Train -> evaluate -> MLflow.

:func:`run_experiment` is ``oodlab run``; a search trial (``oodlab tune``) trains with the
same :func:`~oodlab.train.loop.fit` and ends in the same :func:`finish_run`, so every run,
searched or not, is evaluated and logged the same way (metrics, plots, epoch summary,
detector), and ``oodlab promote`` only registers what a run already logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oodlab.cluster import preflight, ray_local, storage
from oodlab.console import progress
from oodlab.data.bundle import DataBundle, load_bundle, test_ood_names
from oodlab.detect import oe_select
from oodlab.detect.cache import checkpoint_hash
from oodlab.detect.evaluate import EvalReport, SetCallback, evaluate
from oodlab.detect.provenance import PREFIX, bundle_split_tags, dataset_hash, spec_tags
from oodlab.errors import ModelReferenceError
from oodlab.methods import build_method
from oodlab.spec import ExperimentSpec, OESelectSpec
from oodlab.track import plots, tracking
from oodlab.track.callback import epoch_callback
from oodlab.train.loop import fit, storage_path

EVAL_WHERE_TAG = "oodlab.eval.where"


@dataclass
class RunResult:
    run_id: str
    metrics: dict[str, float]
    report: EvalReport
    model: dict[str, Any]
    tracking_uri: str


def init_ray(spec: ExperimentSpec | None = None) -> None:
    """Connect to RAY_ADDRESS if set, else start (or reuse) a local Ray; with ``spec``, refuse
    a run that spans Ray nodes while its storage or MLflow store is on one node's disk
    (:mod:`oodlab.cluster.preflight`), before any MLflow run or training starts."""
    if spec is not None:
        storage.preflight(spec.storage)  # S3: bucket, credentials, access; before Ray starts
    ray_local.init_ray()
    if spec is not None:
        r = spec.resources
        preflight.check(storage_path(spec), tracking.tracking_uri(spec),
                        num_workers=r.num_workers, cpus_per_worker=r.cpus_per_worker,
                        use_gpu=r.use_gpu)


def run_experiment(spec: ExperimentSpec, spec_path: str | Path | None = None,
                   tags: dict[str, str] | None = None, parent_run_id: str | None = None
                   ) -> RunResult:
    """Train, evaluate and track one experiment. The MLflow run is FAILED if anything raises."""
    bundle = load_bundle(spec)  # build/cache data and fail on a bad root before Ray starts
    id_train_hash = dataset_hash(bundle.id_train)
    init_ref = tracking.resolve_init_from(spec, id_train_hash)
    init_state = initial_weights(spec, bundle.num_classes, init_ref)  # a bad ref fails here
    oe_ref = None  # a missing OE-selection backbone fails here too, before any run starts
    if spec.data.oe_select is not None:
        oe_ref = tracking.resolve_oe_backbone(spec, id_train_hash)
    init_ray(spec)
    tags = (tags or {}) | {ray_local.HARDWARE_TAG: ray_local.hardware()}
    tags |= spec_tags(spec.model_dump(mode="json"))  # provenance: spec, data, code
    tags |= bundle_split_tags(bundle)
    if init_ref is not None:
        tags |= {"oodlab.init_from": init_ref}
    run_id = tracking.start_run(spec, spec_path, tags=tags, parent_run_id=parent_run_id)
    ok = False
    try:
        if spec.data.oe_select is not None:
            spec = apply_oe_selection(spec, bundle, run_id, oe_ref)
        outcome = fit(spec, run_name=f"{spec.name}-{run_id}", num_classes=bundle.num_classes,
                      callbacks=[epoch_callback(spec, run_id)], init_state=init_state,
                      run_id=run_id)
        result = finish_run(spec, run_id, outcome.model, bundle)
        ok = True
        return result
    finally:
        tracking.end_run(spec, run_id, ok)


def finish_run(spec: ExperimentSpec, run_id: str, model: nn.Module,
               bundle: DataBundle | None = None, *, register: bool = True) -> RunResult:
    """Evaluate a trained model once on the test sets and log everything to ``run_id``:
    metrics (each OOD set's as soon as it is scored), plots, the epoch summary and the
    detector (registered when ``register`` and the spec names a ``tracking.model_name``;
    search trials leave that to ``oodlab promote``). Where the evaluation runs:
    ``eval.placement`` (:func:`eval_placement`); the tag ``oodlab.eval.where`` records it."""
    supervised = build_method(spec).kind != "unsupervised"
    client = tracking.client_for(spec)
    placement = eval_placement(spec)
    if placement == "task":
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpus = 1 if spec.resources.use_gpu and preflight.cluster_shape().max_node_gpus >= 1 else 0
        task = ray.remote(num_cpus=spec.resources.cpus_per_worker, num_gpus=gpus)(evaluate_here)
        report, where = ray.get(task.options(
            runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": tracking.tracking_uri(spec)}},
            # a Tune trial's placement group holds no CPU for it: schedule outside of it
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
        ).remote(spec, run_id, model.cpu(), supervised))
    else:
        report, where = evaluate_here(spec, run_id, model, supervised, bundle)
    client.set_tag(run_id, EVAL_WHERE_TAG, f"{placement}: {where}")
    report.detector.meta.update({"run_id": run_id, "method": spec.method.name})
    streamed = {f"test/{s}/{n}/" for s in spec.eval.scores for n in test_ood_names(spec.data)}
    tracking.log_metrics(client, run_id, {k: v for k, v in report.metrics.items()
                                          if k[:k.rfind("/") + 1] not in streamed},
                         step=spec.train.epochs)
    _log_plots(spec, run_id, report)
    logged = spec if register else spec.model_copy(update={
        "tracking": spec.tracking.model_copy(update={"model_name": None})})
    model_info = tracking.log_detector(logged, run_id, report.detector)
    client.set_tag(run_id, tracking.MODEL_URI_TAG, model_info["model_uri"])
    # the served weights; the same key as oodlab tune-posthoc's feature cache of this run
    weights = checkpoint_hash(report.detector.model.state_dict())
    client.set_tag(run_id, PREFIX + "checkpoint", weights)
    return RunResult(run_id, report.metrics, report, model_info, tracking.tracking_uri(spec))


def eval_placement(spec: ExperimentSpec) -> str:
    """``eval.placement`` resolved: with ``auto``, a Ray task when the cluster has more than
    one node (the driver may be a small head pod) or the run uses a GPU, else the driver."""
    if spec.eval.placement != "auto":
        return spec.eval.placement
    import ray

    if not ray.is_initialized():
        return "driver"
    shape = preflight.cluster_shape()
    uses_gpu = spec.resources.use_gpu and shape.max_node_gpus >= 1
    return "task" if shape.nodes > 1 or uses_gpu else "driver"


def set_logger(spec: ExperimentSpec, run_id: str) -> SetCallback:
    """Log each test set's metrics as soon as it is scored, and print one line per set."""
    client = tracking.client_for(spec)

    def on_set(key: str, per_score: dict[str, dict[str, float]]) -> None:
        kind, name = key.split(":", 1)
        if kind == "test":
            tracking.log_metrics(client, run_id, {
                f"test/{s}/{name}/{k}": v for s, m in per_score.items() for k, v in m.items()},
                step=spec.train.epochs)
        progress(f"scored {kind} OOD set {name}: " + ", ".join(
            f"{s} AUROC {m['auroc']:.3f}" for s, m in per_score.items()))

    return on_set


def evaluate_here(spec: ExperimentSpec, run_id: str, model: nn.Module, supervised: bool,
                  bundle: DataBundle | None = None) -> tuple[EvalReport, str]:
    """:func:`~oodlab.detect.evaluate.evaluate` in this process (the driver, or the Ray task
    of :func:`finish_run`), streaming per-set metrics to MLflow; returns the report (model on
    the CPU) and where it ran."""
    import socket

    import ray

    device = "cuda" if spec.resources.use_gpu and torch.cuda.is_available() else "cpu"
    report = evaluate(spec, model, bundle or load_bundle(spec), supervised=supervised,
                      device=device, on_set=set_logger(spec, run_id))
    report.detector.model.cpu()
    node = ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else "none"
    return report, f"{socket.gethostname()} pid {os.getpid()} ({device}, Ray node {node})"


def initial_weights(spec: ExperimentSpec, num_classes: int, ref: str | None = None
                    ) -> dict | None:
    """Weights of ``ref`` (default: ``spec.init_from`` resolved), loaded with weights_only and
    checked to fit the spec's model.

    A missing run/model or an architecture mismatch is an error before training starts,
    never a silent random initialisation (a finetune from random weights would look like a
    result of the finetuning method).
    """
    ref = ref or tracking.resolve_init_from(spec)
    if ref is None:
        return None
    state = tracking.load_detector(ref, tracking.tracking_uri(spec)).model.state_dict()
    model = build_method(spec).build(num_classes)
    try:
        model.load_state_dict(state)  # strict
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ModelReferenceError(
            f"init_from {ref!r} does not fit model {spec.model.arch!r} with "
            f"{num_classes} classes: {first}") from None
    return {k: v.cpu() for k, v in state.items()}


def oe_select_backbone(spec: ExperimentSpec, bundle: DataBundle, ref: str | None = None
                       ) -> tuple[nn.Module, str]:
    """The feature extractor of the OE selection and the reference it came from: by default
    the spec's own trained ``bce`` run on the same ID training set and seed
    (:func:`tracking.resolve_oe_backbone`, unless ``ref`` is that resolved already), a named
    run or file, or the spec's architecture randomly initialised with its seed
    (``backbone: random``, the reference code's choice)."""
    ref = ref or tracking.resolve_oe_backbone(spec, dataset_hash(bundle.id_train))
    if ref == "random":
        torch.manual_seed(spec.seed)
        return build_method(spec).build(bundle.num_classes), ref
    return tracking.load_detector(ref, tracking.tracking_uri(spec)).model, ref


def select_oe(spec: ExperimentSpec, bundle: DataBundle | None = None,
              backbone: str | None = None) -> tuple[list[oe_select.Candidate], str]:
    """Rank the spec's OE candidates with EDGE's measure (``oodlab oe-select``); also return
    the backbone reference used (``backbone``: one already resolved)."""
    bundle = bundle or load_bundle(spec, include_test=False)
    cfg = spec.data.oe_select or OESelectSpec()
    model, ref = oe_select_backbone(spec, bundle, backbone)
    return oe_select.select(spec, cfg, bundle.id_train, bundle.oe_sets, model), ref


def log_oe_selection(spec: ExperimentSpec, run_id: str, rows: list[oe_select.Candidate],
                     backbone: str) -> None:
    client = tracking.client_for(spec)
    client.log_table(run_id, {k: [r[k] for r in oe_select.as_table(rows)]
                              for k in ("name", "distance", "normalised", "selected")},
                     "oe_selection.json")
    chosen = [r.name for r in rows if r.selected]
    client.log_param(run_id, "data.oe_selected", ",".join(chosen))
    client.set_tag(run_id, "oodlab.oe_select.backbone", backbone)


def apply_oe_selection(spec: ExperimentSpec, bundle, run_id: str,
                       backbone: str | None = None) -> ExperimentSpec:
    """Select the OE sets, log the ranking, and return the spec that trains on the choice
    (``backbone``: the selection's backbone reference, if resolved already)."""
    rows, backbone = select_oe(spec, bundle, backbone)
    log_oe_selection(spec, run_id, rows, backbone)
    chosen = [r.name for r in rows if r.selected]
    data = spec.data.model_copy(update={"oe": chosen, "oe_select": None})
    return spec.model_copy(update={"data": data})


def _log_plots(spec: ExperimentSpec, run_id: str, report: EvalReport) -> None:
    for name, res in report.scores.items():
        for kind, make in (("roc", plots.roc_figure), ("hist", plots.histogram_figure)):
            fig = make(res)
            tracking.log_figure(spec, run_id, fig, f"plots/{kind}_{name}.png")
            plots.close(fig)
    history = {key: tracking.metric_history(spec, run_id, key)
               for key in ("val/auroc", "val/id_acc", "val/id_map")}
    tracking.log_metrics(tracking.client_for(spec), run_id, epoch_summary(history["val/auroc"]))
    fig = plots.epoch_figure(history, title=f"{spec.name}: validation per epoch")
    tracking.log_figure(spec, run_id, fig, "plots/epochs.png")
    plots.close(fig)
    if report.id_groups:
        res = report.scores[spec.eval.scores[0]]
        fig = plots.headtail_figure(res, report.id_groups)
        tracking.log_figure(spec, run_id, fig, f"plots/headtail_{res.name}.png")
        plots.close(fig)


def epoch_summary(auroc: list[tuple[int, float]]) -> dict[str, float]:
    """The intermediate-epoch view (Unleashing Mask's observation) as numbers: the best
    validation-OOD AUROC over epochs, its epoch (1-based), and how much the last epoch lost
    against it."""
    if not auroc:
        return {}
    best_epoch, best = max(auroc, key=lambda p: (p[1], -p[0]))
    last = auroc[-1][1]
    return {"val/best_auroc": best, "val/best_auroc_epoch": float(best_epoch + 1),
            "val/last_auroc_drop": best - last}


def results_table(metrics: dict[str, float], scores: list[str], sets: list[str]) -> str:
    """A plain-text table: one row per (score, OOD set), columns AUROC / AUPR / FPR@95."""
    header = f"{'score':<12}{'OOD set':<16}{'AUROC':>8}{'AUPR-in':>9}{'AUPR-out':>10}{'FPR@95':>8}"
    lines = [header, "-" * len(header)]
    groups = [g for g in ("near", "far", "sanity") if f"test/{scores[0]}/{g}/auroc" in metrics]
    for s in scores:
        for d in [*sets, *(f"{g} (mean)" for g in groups), "mean"]:
            k = f"test/{s}/{d.removesuffix(' (mean)')}"
            lines.append(f"{s:<12}{d:<16}{metrics[k + '/auroc']:>8.3f}"
                         f"{metrics[k + '/aupr_in']:>9.3f}{metrics[k + '/aupr_out']:>10.3f}"
                         f"{metrics[k + '/fpr95']:>8.3f}")
    return "\n".join(lines)


def headtail_table(metrics: dict[str, float], score: str) -> str:
    """Mean AUROC / FPR@95 over OOD sets for all, head and tail-only ID test images."""
    lines = [f"head/tail breakdown, score {score} "
             f"({int(metrics['headtail/num_head_classes'])} head classes)",
             f"{'ID group':<12}{'images':>8}{'AUROC':>8}{'FPR@95':>8}"]
    for g in ("all", "head", "tail_only"):
        k = f"headtail/{score}/{g}"
        if f"{k}/mean/auroc" in metrics:
            lines.append(f"{g:<12}{int(metrics[k + '/count']):>8}"
                         f"{metrics[k + '/mean/auroc']:>8.3f}{metrics[k + '/mean/fpr95']:>8.3f}")
        else:
            lines.append(f"{g:<12}{int(metrics.get(k + '/count', 0)):>8}{'-':>8}{'-':>8}")
    flagged = metrics.get(f"headtail/{score}/tail_only/flagged_ood")
    if flagged is not None:
        lines.append(f"tail-only ID images flagged OOD at the served threshold: {flagged:.3f}")
    return "\n".join(lines)
