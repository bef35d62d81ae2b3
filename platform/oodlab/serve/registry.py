"""The MLflow registry side of serving: resolve an alias to a version, load that version.

Loading itself goes through :func:`oodlab.track.tracking.load_detector` (``weights_only``); this
module only adds what serving needs on top: a pinned version number, the run's summary
metrics, and the model's identity for every response.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from oodlab.detect.detector import Detector
from oodlab.serve.config import ModelConfig, split_ref
from oodlab.track.tracking import ModelReferenceError, load_detector


@dataclass(frozen=True)
class ModelVersionRef:
    """A registry entry: ``name`` at ``version`` (reached through ``alias`` if any)."""

    name: str
    version: str
    alias: str | None
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass
class LoadedModel:
    """One loaded detector and who it is; replicas swap whole objects, never fields."""

    detector: Detector
    ref: ModelVersionRef
    metrics: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    loaded_at: float = field(default_factory=time.time)


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))


def resolve(ref: str, tracking_uri: str | None = None) -> ModelVersionRef:
    """``models:/name@alias`` or ``models:/name/version`` -> the registered version it is.

    Raises ModelReferenceError naming the model, alias or version that does not exist."""
    import mlflow

    name, alias, version = split_ref(ref)
    client = _client(tracking_uri)
    try:
        mv = (client.get_model_version_by_alias(name, alias) if alias
              else client.get_model_version(name, version))
    except mlflow.exceptions.MlflowException as err:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ModelReferenceError(
            f"model {ref!r}: registered model {name!r} has no {what} in "
            f"{tracking_uri or 'the default tracking store'} ({err.message})") from None
    return ModelVersionRef(name, str(mv.version), alias, mv.run_id)


def summary_metrics(run_id: str | None, tracking_uri: str | None) -> dict[str, float]:
    """The run's headline metrics: ``threshold``, ``test/*`` and ``val_final/*`` summaries
    (``test/auroc``, ``test/id_acc``...), not the per-set or per-score ones."""
    if not run_id:
        return {}
    metrics = _client(tracking_uri).get_run(run_id).data.metrics
    return {k: float(v) for k, v in sorted(metrics.items())
            if k == "threshold" or (k.startswith(("test/", "val_final/")) and k.count("/") == 1)}


def pick_device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but this replica sees no GPU "
                           "(give it num_gpus > 0)")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def load(cfg: ModelConfig, device: str = "cpu") -> LoadedModel:
    """Resolve ``cfg`` (alias, or the pinned version) and load that exact version."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # replica logs
    name, alias, _ = split_ref(cfg.model)
    pinned = resolve(cfg.load_ref, cfg.tracking_uri)
    ref = ModelVersionRef(name, pinned.version, alias, pinned.run_id)
    detector = load_detector(ref.uri, cfg.tracking_uri).to(device)
    detector.model.eval()
    return LoadedModel(detector, ref, summary_metrics(ref.run_id, cfg.tracking_uri), device)


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """What ``GET /v1/model`` shows about the model itself."""
    d = loaded.detector
    return {
        "name": loaded.ref.name, "version": loaded.ref.version, "alias": loaded.ref.alias,
        "run_id": loaded.ref.run_id, "method": d.meta.get("method") or d.spec["method"]["name"],
        "score": d.score_fn.name, "threshold": d.threshold, "num_classes": d.num_classes,
        "preprocessing": d.preprocessing, "metrics": loaded.metrics, "device": loaded.device,
    }
