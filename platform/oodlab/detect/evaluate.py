"""Evaluation: fit each post-hoc score on ID train, score ID and every OOD set, compute metrics.

Protocol: validation OOD sets drive model selection and the per-epoch
view; test OOD sets are scored once, here, at the end. The served threshold is calibrated
on ID *validation* data at ``spec.eval.tpr`` (95 %) and stored with the detector.

Test sets are grouped as in OpenOOD v1.5 (Zhang et al. 2023). Logged per score: every set,
``test/<score>/<set>/<metric>``; each group, ``test/<score>/{near,far,sanity}/<metric>``
(the mean over the group's sets); and the headline ``test/<score>/mean/<metric>`` (and
``test/<metric>`` for the served score) = the mean over the near + far sets, each set
weighted equally. Sanity sets (noise) are never in the headline: a model can ace them and
fail on real shifts. A spec with ungrouped ``data.test_ood`` keeps its old headline (the mean
over its sets) except that the sanity-named sets ``gaussian`` and ``rademacher`` are logged as
the ``sanity`` group and left out of it; only when every set is a sanity set is the headline
their mean, so that one is always logged. Metrics: see :mod:`oodlab.detect.metrics`
(``fpr95`` is ID-positive, ``fpr95_oodpos`` the OpenOOD convention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from oodlab.data.bundle import DataBundle, eval_loader
from oodlab.detect.detector import Detector
from oodlab.detect.headtail import breakdown, group_masks, head_classes
from oodlab.detect.metrics import accuracy, mean_average_precision, ood_metrics, threshold_at_tpr
from oodlab.detect.outputs import Outputs, collect_outputs, fit_score, score_loader
from oodlab.registry import SCORES
from oodlab.spec import ExperimentSpec
from oodlab.spec.experiment import SANITY_SETS

if TYPE_CHECKING:
    from oodlab.methods.base import Method

METRIC_KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_oodpos")
GROUPS = ("near", "far", "sanity")


def _mean(per_set: dict[str, dict[str, float]], names: list[str]) -> dict[str, float]:
    return {k: float(np.mean([per_set[n][k] for n in names])) if names else float("nan")
            for k in METRIC_KEYS}


def group_means(per_set: dict[str, dict[str, float]],
                groups: dict[str, list[str]] | None = None) -> dict[str, dict[str, float]]:
    """Metric means per group (``near``, ``far``, ``sanity``; only groups with a set) and the
    headline ``mean``: over near + far when ``groups`` names any group, else (ungrouped sets)
    over every set but the sanity-named ones (``gaussian``, ``rademacher``), which form the
    ``sanity`` group; when all sets are sanity sets the headline is their mean."""
    groups = groups or {}
    member = {g: [n for n in groups.get(g, []) if n in per_set] for g in GROUPS}
    if any(member.values()):
        headline = member["near"] + member["far"]
    else:
        member["sanity"] = [n for n in per_set if n in SANITY_SETS]
        headline = [n for n in per_set if n not in SANITY_SETS] or list(per_set)
    out = {g: _mean(per_set, names) for g, names in member.items() if names}
    out["mean"] = _mean(per_set, headline)
    return out


@dataclass
class ScoreResult:
    """One score's values on every set, its metrics per OOD set, and its threshold."""

    name: str
    id_val: Tensor
    id_test: Tensor
    ood: dict[str, Tensor]
    threshold: float
    per_set: dict[str, dict[str, float]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # near / far / sanity names

    @property
    def group_means(self) -> dict[str, dict[str, float]]:
        """Means per group and the headline ``mean`` (see :func:`group_means`)."""
        return group_means(self.per_set, self.groups)

    @property
    def mean(self) -> dict[str, float]:
        """The headline: mean over near + far sets (never the sanity sets)."""
        return self.group_means["mean"]


@dataclass
class EvalReport:
    """Flat MLflow-ready metrics, the raw scores (for plots), and the detector to serve."""

    metrics: dict[str, float]
    scores: dict[str, ScoreResult]
    detector: Detector
    id_groups: dict[str, Tensor] = field(default_factory=dict)  # multi-label: head / tail_only


def first_n(ds, n: int):
    """The first ``n`` samples of ``ds`` (all of it when smaller)."""
    return ds if len(ds) <= n else Subset(ds, range(n))


def id_metric(logits: Tensor, labels: Tensor) -> tuple[str, float]:
    """("id_acc", top-1 accuracy) for single labels, ("id_map", mAP) for multi-hot labels."""
    if labels.ndim == 2:
        return "id_map", mean_average_precision(logits, labels)
    return "id_acc", accuracy(logits, labels)


def validation_metrics(model: nn.Module, bundle: DataBundle, spec: ExperimentSpec,
                       method: Method, device: torch.device | str = "cpu") -> dict[str, float]:
    """Per-epoch view on validation data only: ID accuracy and val-OOD metrics of the
    primary score (fitted on at most ``eval.epoch_val_limit`` ID-train samples), unless the
    method has its own (:meth:`Method.validation_metrics`, e.g. ddpm's cheap view)."""
    own = method.validation_metrics(model, bundle, device)
    if own is not None:
        return own
    ev, bs = spec.eval, spec.data.eval_batch_size
    name = ev.scores[0]
    train_loader = eval_loader(first_n(bundle.id_train, ev.epoch_val_limit), bs)
    train_out = collect_outputs(model, train_loader, device)
    score = fit_score(name, ev.score_params.get(name, {}), train_out,
                      supervised=method.kind != "unsupervised")
    val_loader = eval_loader(bundle.id_val, bs)
    val_out = collect_outputs(model, val_loader, device)
    id_scores = score_loader(model, score, val_loader, val_out, device)
    out: dict[str, float] = {}
    if method.kind != "unsupervised":  # no classifier head: no ID accuracy
        name_id, value_id = id_metric(val_out.logits, val_out.labels)
        out[f"val/{name_id}"] = value_id
    per_set = []
    for set_name, ds in bundle.val_ood.items():
        loader = eval_loader(ds, bs)
        s = score_loader(model, score, loader, _maybe_outputs(model, score, loader, device), device)
        m = ood_metrics(id_scores, s)
        per_set.append(m)
        out.update({f"val/{set_name}/{k}": v for k, v in m.items()})
    if per_set:
        out.update({f"val/{k}": float(np.mean([m[k] for m in per_set])) for k in METRIC_KEYS})
    return out


def _maybe_outputs(model, score, loader, device) -> Outputs | None:
    return None if score.needs_model else collect_outputs(model, loader, device)


SetCallback = Callable[[str, dict[str, dict[str, float]]], None]


def evaluate(spec: ExperimentSpec, model: nn.Module, bundle: DataBundle, *, supervised: bool,
             device: torch.device | str = "cpu", on_set: SetCallback | None = None
             ) -> EvalReport:
    """Score every set with every score in ``spec.eval.scores``; the first one is served.

    ``supervised``: the model was trained with ID labels (its method's ``kind`` is not
    ``unsupervised``), so ID accuracy/mAP is reported.

    Streamed, one OOD set at a time: the model runs once over each set, every score reads that
    set's outputs, its metrics go to ``on_set(set_name, {score: metrics})`` (to log and print
    them as they come), and its logits/features are dropped before the next set. Held at once:
    the ID validation and test outputs, one OOD set's, and one score value per image; ID-train
    outputs only while the scores are fitted (the kNN bank keeps a bounded sample of them).
    """
    if bundle.id_test is None:
        raise ValueError("evaluate() needs the test sets: load the bundle with include_test=True")
    model = model.to(device).eval()
    bs = spec.data.eval_batch_size
    # logits/features only when something reads them (not for scores that run the model, lmd)
    need_outputs = supervised or any(SCORES[s].needs_fit or not SCORES[s].needs_model
                                     for s in spec.eval.scores)

    def outputs_of(ds) -> tuple[DataLoader, Outputs | None]:
        loader = eval_loader(ds, bs)
        return loader, collect_outputs(model, loader, device) if need_outputs else None

    id_train = outputs_of(bundle.id_train)[1]
    scores = {name: fit_score(name, spec.eval.score_params.get(name, {}), id_train,
                              supervised=supervised) for name in spec.eval.scores}
    train_labels = id_train.labels if id_train is not None else None
    del id_train  # fitted: the scores keep what they need
    val_loader, val_out = outputs_of(bundle.id_val)
    test_loader, test_out = outputs_of(bundle.id_test)

    # final validation numbers go under val_final/ so they never mix with the per-epoch val/*
    metrics: dict[str, float] = {}
    if supervised:  # ID accuracy / mAP need labels the model was trained to predict
        test_name, test_value = id_metric(test_out.logits, test_out.labels)
        val_name, val_value = id_metric(val_out.logits, val_out.labels)
        metrics = {f"test/{test_name}": test_value, f"val_final/{val_name}": val_value}
    multilabel = supervised and test_out.labels.ndim == 2
    groups: dict[str, Tensor] = {}
    if multilabel:
        head = head_classes(train_labels, spec.eval.head_fraction)
        groups = group_masks(test_out.labels, head)
        metrics["headtail/num_head_classes"] = float(head.sum())
    results = {}
    for name, score in scores.items():
        id_val = score_loader(model, score, val_loader, val_out, device)
        results[name] = ScoreResult(name, id_val,
                                    score_loader(model, score, test_loader, test_out, device),
                                    {}, threshold_at_tpr(id_val, spec.eval.tpr),
                                    groups=bundle.test_groups)
    val_sets: dict[str, list[dict[str, float]]] = {name: [] for name in scores}
    for kind, sets in (("test", bundle.test_ood), ("val", bundle.val_ood)):
        for set_name, ds in sets.items():
            loader, out = outputs_of(ds)
            per_score = {}
            for name, score in scores.items():
                res = results[name]
                s = score_loader(model, score, loader, out, device)
                m = per_score[name] = ood_metrics(res.id_test if kind == "test" else res.id_val,
                                                  s)
                if kind == "test":
                    res.ood[set_name], res.per_set[set_name] = s, m
                    metrics.update({f"test/{name}/{set_name}/{k}": v for k, v in m.items()})
                else:
                    val_sets[name].append(m)
            del out
            if on_set is not None:
                on_set(f"{kind}:{set_name}", per_score)

    detector = None
    for name, res in results.items():
        for group, m in res.group_means.items():  # near / far / sanity and the headline mean
            metrics.update({f"test/{name}/{group}/{k}": v for k, v in m.items()})
        if val_sets[name]:
            metrics.update({f"val_final/{name}/mean/{k}":
                            float(np.mean([m[k] for m in val_sets[name]])) for k in METRIC_KEYS})
        if multilabel:
            ht = breakdown(res.id_test, test_out.labels, res.ood, head, res.threshold)
            metrics.update({f"headtail/{name}/{k}": v for k, v in ht.items()})
        if detector is None:  # the first score is the one served
            detector = Detector(model, scores[name], spec=spec.model_dump(mode="json"),
                                num_classes=bundle.num_classes, threshold=res.threshold)
            metrics["threshold"] = res.threshold
            metrics.update({f"test/{k}": v for k, v in res.mean.items()})
            if val_sets[name]:
                metrics.update({f"val_final/{k}": metrics[f"val_final/{name}/mean/{k}"]
                                for k in METRIC_KEYS})
    assert detector is not None  # eval.scores has at least one entry (validated)
    return EvalReport(metrics=metrics, scores=results, detector=detector, id_groups=groups)
