"""The Ray Train callback that logs a run's epochs to its MLflow run.

A module of its own, beside :mod:`oodlab.track.tracking`: Ray Train costs a process about
0.5 s to import, which a Serve replica or a CLI that only loads a registered model skips.
"""

from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from oodlab.spec import ExperimentSpec, TrainSpec
from oodlab.track.tracking import (
    CHECKPOINT_TAG,
    SELECTED_CHECKPOINT_TAG,
    log_metrics,
    tracking_uri,
)


class EpochMetricsCallback(UserCallback):
    """Ray Train callback (runs on the Train controller) that logs rank 0's epoch metrics,
    tags the latest checkpoint, and the best one so far on ``select_metric`` (the epoch that
    is evaluated and served; Ray keeps it by the same checkpoint score: ``train.select_metric``
    or, with ``train.select_constraints``, ``select/score``)."""

    def __init__(self, tracking_uri: str, run_id: str, train: TrainSpec) -> None:
        self.tracking_uri, self.run_id, self.train = tracking_uri, run_id, train
        self.best: float | None = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics:
            return
        m = metrics[0]
        client = MlflowClient(self.tracking_uri)
        log_metrics(client, self.run_id, m, step=int(m.get("epoch", 0)))
        if checkpoint is not None:  # the latest checkpoint, so a stopped run stays usable
            from oodlab.cluster.storage import checkpoint_uri

            uri = checkpoint_uri(checkpoint)
            client.set_tag(self.run_id, CHECKPOINT_TAG, uri)
            attribute = self.train.score_attribute
            value = m.get(attribute) if attribute else None
            if self.train.replaces(value, self.best):
                self.best = value
                client.set_tag(self.run_id, SELECTED_CHECKPOINT_TAG, uri)
                log_metrics(client, self.run_id, {"train/selected_epoch": m.get("epoch", 0)})


def epoch_callback(spec: ExperimentSpec, run_id: str) -> EpochMetricsCallback:
    """The callback that logs run ``run_id``'s epochs to its tracking server."""
    return EpochMetricsCallback(tracking_uri(spec), run_id, spec.train)
