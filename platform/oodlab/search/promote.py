"""``oodlab promote``: register a run's detector and name it champion only if it is better.

Every finished run, searched or not, has already been evaluated and logged its detector
(:func:`oodlab.train.pipeline.finish_run`); promotion only registers it.
Selection uses the run's *validation* metric (default ``val/auroc``, the last epoch's value);
test metrics are computed once, logged and shown, never compared.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml

from oodlab.errors import ModelReferenceError
from oodlab.spec import ExperimentSpec, SpecError, validate_spec
from oodlab.track import tracking


def served_value(metrics: dict[str, float], metric: str) -> float | None:
    """A run's value of a validation ``metric`` for the model it serves: ``val_final/<m>``
    (measured on the selected checkpoint by the final evaluation) when the run has it, else
    the last per-epoch value (a trial stopped early)."""
    if metric.startswith("val/"):
        final = metrics.get("val_final/" + metric.removeprefix("val/"))
        if final is not None:
            return final
    return metrics.get(metric)


@dataclass
class Promotion:
    run_id: str
    model_name: str
    version: str
    value: float
    champion_value: float | None
    champion: bool
    test_metrics: dict[str, float]


def run_spec(client: mlflow.MlflowClient, run_id: str) -> ExperimentSpec:
    """The resolved spec a run was started with (its ``spec.resolved.yaml`` artifact)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "spec.resolved.yaml", tmp)
        except mlflow.exceptions.MlflowException as err:
            raise ModelReferenceError(
                f"run {run_id}: no spec.resolved.yaml artifact ({err.message})") from None
        return validate_spec(yaml.safe_load(Path(path).read_text()))


def promote(run_id: str, *, tracking_uri: str | None = None, metric: str = "val/auroc",
            mode: str = "max", model_name: str | None = None, alias: str = "champion",
            force: bool = False) -> Promotion:
    """Register ``run_id``'s detector as a new version; move ``alias`` to it only if its
    validation ``metric`` beats the current holder's (or ``force``)."""
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    spec = run_spec(client, run_id)
    if tracking_uri:
        spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(
            update={"tracking_uri": tracking_uri})})
    name = model_name or spec.tracking.model_name
    if not name:
        raise SpecError(f"run {run_id}: its spec has no tracking.model_name; pass --model-name")
    value = served_value(run.data.metrics, metric)
    if value is None:
        raise SpecError(f"run {run_id} has no metric {metric!r}; it has "
                        f"{sorted(k for k in run.data.metrics if k.startswith('val/'))[:12]}")

    uri = run.data.tags.get(tracking.MODEL_URI_TAG)
    if uri is None:  # every finished run and trial logs one (oodlab.train.pipeline)
        why = ("it was stopped early by the search scheduler"
               if run.data.tags.get("oodlab.stopped_early") == "true"
               else f"its status is {run.info.status}")
        raise ModelReferenceError(f"run {run_id} has no logged detector ({why}); "
                                  "promote a run that finished")
    test = {k: v for k, v in client.get_run(run_id).data.metrics.items()
            if k.startswith("test/") and k.count("/") == 1}

    mlflow.set_tracking_uri(tracking.tracking_uri(spec))
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = existing[0].version if existing else mlflow.register_model(uri, name).version
    holder_value = None
    try:
        holder = client.get_model_version_by_alias(name, alias)
        holder_value = served_value(client.get_run(holder.run_id).data.metrics, metric)
    except mlflow.exceptions.MlflowException:
        holder = None  # no champion yet
    better = holder_value is None or (value > holder_value if mode == "max"
                                      else value < holder_value)
    if better or force:
        client.set_registered_model_alias(name, alias, version)
    client.set_tag(run_id, "oodlab.registered", f"{name}/{version}")
    return Promotion(run_id, name, str(version), value, holder_value, better or force, test)


def describe(p: Promotion, metric: str, alias: str = "champion") -> str:
    """A short human summary of a promotion."""
    held = "none" if p.champion_value is None else f"{p.champion_value:.4f}"
    verdict = (f"now @{alias}" if p.champion else f"not promoted: @{alias} stays "
               f"(its {metric} {held} is at least as good)")
    lines = [f"registered {p.model_name} version {p.version} from run {p.run_id}",
             f"{metric} {p.value:.4f} vs current @{alias} {held}: {verdict}"]
    if p.test_metrics:
        lines.append("test (reported, not used for selection): " + ", ".join(
            f"{k.removeprefix('test/')} {v:.4f}" for k, v in sorted(p.test_metrics.items())))
    return "\n".join(lines)
