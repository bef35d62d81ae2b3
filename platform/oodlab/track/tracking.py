"""MLflow glue: what the rest of oodlab calls to track runs and load models.

One MLflow run per experiment: the flattened spec as params, per-epoch metrics (logged by a
Ray Train ``UserCallback`` on the controller, from rank 0's report:
:mod:`oodlab.track.callback`), final metrics per OOD
set, the spec file, plots, and the detector as a pyfunc model whose ``predict`` returns
``score`` and ``is_ood``.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from oodlab.cluster.env import user_tracking_uri
from oodlab.detect.detector import Detector
from oodlab.detect.provenance import PREFIX as PROVENANCE_PREFIX
from oodlab.errors import ModelReferenceError
from oodlab.methods import load_detector_file
from oodlab.spec import ExperimentSpec, flatten

CHECKPOINT_TAG = "oodlab.checkpoint"  # the latest checkpoint (what a restart resumes)
SELECTED_CHECKPOINT_TAG = "oodlab.selected_checkpoint"  # the epoch served, so far (train.select_*)
MODEL_URI_TAG = "oodlab.model_uri"
DETECTOR_ARTIFACT = "detector"
DETECTOR_STATE = "detector_state"
MAX_PARAM_LEN = 500
MODEL_CODE = Path(__file__).with_name("pyfunc.py")  # pyfunc "models from code"


def tracking_uri(spec: ExperimentSpec) -> str:
    """MLFLOW_TRACKING_URI, else the spec's, else ``sqlite:///<workdir>/mlflow.db``."""
    uri = user_tracking_uri() or spec.tracking.tracking_uri
    if uri:
        return uri
    spec.workdir_path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{spec.workdir_path / 'mlflow.db'}"


def artifact_root(spec: ExperimentSpec) -> str | None:
    """Artifacts next to the local db (None = let a remote server decide)."""
    if tracking_uri(spec).startswith("sqlite:///") and not spec.storage:
        return (spec.workdir_path / "mlartifacts").as_uri()
    if spec.storage and spec.storage.startswith("s3://"):
        return spec.storage.rstrip("/") + "/mlartifacts"
    return None


def client_for(spec: ExperimentSpec) -> MlflowClient:
    uri = tracking_uri(spec)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def ensure_experiment(client: MlflowClient, spec: ExperimentSpec) -> str:
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = artifact_root(spec)
    if location:
        location = f"{location}/{spec.tracking.experiment}"
    return client.create_experiment(spec.tracking.experiment, artifact_location=location)


def start_run(spec: ExperimentSpec, spec_path: str | Path | None = None,
              tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """Create the run (a child of ``parent_run_id`` when given), log the spec as params and
    as a file; return the run id.

    The run is created with :meth:`MlflowClient.create_run`, not :func:`mlflow.start_run`: it
    must stay RUNNING after this returns (a trial's Ray Train run ends it), and a fluent run
    would occupy this thread's active-run stack until then. The parent link is MLflow's
    documented system tag ``mlflow.parentRunId`` (``MLFLOW_PARENT_RUN_ID``, what
    ``mlflow.start_run(parent_run_id=...)`` sets), so the UI nests the run under its parent and
    :meth:`MlflowClient.get_parent_run` finds it.
    """
    from oodlab.cluster.storage import preflight

    preflight(spec.storage)  # S3 problems: one clear error before any run or training
    client = client_for(spec)
    exp_id = ensure_experiment(client, spec)
    all_tags = {"oodlab.method": spec.method.name, "oodlab.seed": str(spec.seed),
                "oodlab.benchmark": spec.data.id} | (tags or {})
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(exp_id, tags=all_tags, run_name=spec.name)
    run_id = run.info.run_id
    params = {k: str(v)[:MAX_PARAM_LEN] for k, v in flatten(spec.model_dump(mode="json")).items()}
    # log_batch splits into MLflow's per-request limits itself (MAX_PARAMS_TAGS_PER_BATCH)
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as tmp:
        import yaml

        resolved = Path(tmp) / "spec.resolved.yaml"
        resolved.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        client.log_artifact(run_id, str(resolved))
        if spec_path is not None:
            client.log_artifact(run_id, str(spec_path))
    return run_id


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, Any],
                step: int | None = None) -> None:
    """Log the finite numeric entries of a dict (others are skipped) in one ``log_batch``,
    which MLflow splits into its per-request limits (MAX_METRICS_PER_BATCH)."""
    import time

    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[
        Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)])


def metric_history(spec: ExperimentSpec, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, sorted by step."""
    hist = client_for(spec).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in hist)


class DetectorModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper: ``predict`` takes [N, C, H, W] (or [N, H, W]) [0, 1] images."""

    def load_context(self, context) -> None:
        self.detector = load_detector_file(context.artifacts[DETECTOR_ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.ndim == 3:
            x = x.unsqueeze(1)
        scores, is_ood = self.detector.predict(x)
        return pd.DataFrame({"score": scores.numpy(), "is_ood": is_ood.numpy()})


def log_detector(spec: ExperimentSpec, run_id: str, detector: Detector) -> dict[str, Any]:
    """Log the detector as a pyfunc model (registered when ``tracking.model_name`` is set)."""
    client_for(spec)
    p = detector.preprocessing
    example = np.zeros((2, p["channels"], p["image_size"], p["image_size"]), dtype=np.float32)
    with (tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id),
          warnings.catch_warnings()):
        # predict takes arrays (hinted np.ndarray: no inference) and we give the signature
        warnings.filterwarnings("ignore", message=".*input example.*")
        path = detector.save(Path(tmp) / "detector.pt")
        mlflow.log_artifact(str(path), DETECTOR_STATE)  # for runs:/<run_id> references
        signature = mlflow.models.infer_signature(
            example, pd.DataFrame({"score": [0.0, 0.0], "is_ood": [False, False]}))
        info = mlflow.pyfunc.log_model(
            name=DETECTOR_ARTIFACT, python_model=str(MODEL_CODE),
            artifacts={DETECTOR_ARTIFACT: str(path)}, signature=signature,
            registered_model_name=spec.tracking.model_name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"mlflow=={mlflow.__version__}"],
        )
    return {"model_uri": info.model_uri, "version": info.registered_model_version}


def log_figure(spec: ExperimentSpec, run_id: str, fig, name: str) -> None:
    client_for(spec).log_figure(run_id, fig, name)


def end_run(spec: ExperimentSpec, run_id: str, ok: bool) -> None:
    status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    client_for(spec).set_terminated(run_id, status=status)


def newest_finished_run(spec: ExperimentSpec, tags: dict[str, str]) -> str | None:
    """``runs:/<id>`` of the newest FINISHED run in the spec's experiment whose tags equal
    ``tags``, or None."""
    client = client_for(spec)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    if exp is None:
        return None
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"{where} and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return f"runs:/{runs[0].info.run_id}" if runs else None


def run_of_spec(spec: ExperimentSpec, ref: str, field: str,
                id_train_hash: str | None = None) -> str:
    """``spec:<name>`` as ``runs:/<id>``: the newest finished run of the spec called ``<name>``
    with this spec's seed (and, given ``id_train_hash``, trained on that very ID training set:
    its ``oodlab.provenance.split.id_train`` tag), in this spec's experiment; an error naming
    ``field`` if none."""
    name = ref.removeprefix("spec:")
    tags = {"mlflow.runName": name, "oodlab.seed": str(spec.seed)}
    on = ""
    if id_train_hash is not None:
        tags[PROVENANCE_PREFIX + "split.id_train"] = id_train_hash
        on = f" on this ID training set (split.id_train {id_train_hash[:12]})"
    found = newest_finished_run(spec, tags)
    if found is None:
        raise ModelReferenceError(
            f"{field} {ref!r}: no finished run of spec {name!r} with seed {spec.seed}{on} in "
            f"experiment {spec.tracking.experiment!r}; run that spec first")
    return found


def resolve_init_from(spec: ExperimentSpec, id_train_hash: str | None = None) -> str | None:
    """``spec.init_from`` as a ``runs:/`` or ``models:/`` reference.

    ``spec:<name>`` means the newest finished run of the spec called ``<name>`` with this
    spec's seed, in this spec's experiment: how a pretrain -> finetune chain runs per seed.
    Given ``id_train_hash`` (:func:`oodlab.detect.provenance.dataset_hash` of the ID training
    split), only a run trained on the same images counts: a chain run at full size never
    starts from a pretraining capped by ``data.limit``, or the other way round.
    """
    ref = spec.init_from
    if ref is None or not ref.startswith("spec:"):
        return ref
    return run_of_spec(spec, ref, "init_from", id_train_hash)


def resolve_oe_backbone(spec: ExperimentSpec, id_train_hash: str) -> str:
    """``data.oe_select.backbone`` as ``random`` or a loadable reference.

    ``method:<m>`` (the default, ``method:bce``) is the newest finished run of method ``<m>``
    with this spec's seed trained on this very ID training set (its
    ``oodlab.provenance.split.id_train`` tag equals ``id_train_hash``), in this spec's
    experiment; ``spec:<name>`` the newest finished run of that spec with this seed on the
    same training set.
    """
    ref = spec.data.oe_select.backbone if spec.data.oe_select else "random"
    field = "data.oe_select.backbone"
    if ref.startswith("spec:"):
        return run_of_spec(spec, ref, field, id_train_hash)
    if not ref.startswith("method:"):
        return ref
    method, seed = ref.removeprefix("method:"), str(spec.seed)
    found = newest_finished_run(spec, {"oodlab.method": method, "oodlab.seed": seed,
                                       PROVENANCE_PREFIX + "split.id_train": id_train_hash})
    if found is None:
        raise ModelReferenceError(
            f"{field} {ref!r}: no finished {method} run with seed {seed} on this ID training "
            f"set (split.id_train {id_train_hash[:12]}) in experiment "
            f"{spec.tracking.experiment!r}; run the {method} baseline with the same data and "
            "seed first, or name a run (runs:/<id>), a detector file, or 'random'")
    return found


def load_detector(ref: str, tracking: str | None = None) -> Detector:
    """Load a detector from a file, ``runs:/<run_id>`` or ``models:/<name>@<alias>`` (or
    ``/<version>``), always with ``weights_only=True``. A bad reference is an error, never a
    silent fresh model."""
    if tracking:
        mlflow.set_tracking_uri(tracking)
    try:
        if ref.startswith("runs:/"):
            run_id = ref.removeprefix("runs:/").strip("/").split("/")[0]
            with tempfile.TemporaryDirectory() as tmp:
                path = MlflowClient().download_artifacts(run_id, f"{DETECTOR_STATE}/detector.pt",
                                                         tmp)
                return load_detector_file(path)
        if ref.startswith("models:/"):
            with tempfile.TemporaryDirectory() as tmp:
                root = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=tmp)
                return load_detector_file(Path(root) / "artifacts" / "detector.pt")
    except mlflow.exceptions.MlflowException as err:
        raise ModelReferenceError(f"cannot load a detector from {ref!r}: {err.message}") from None
    if Path(ref).is_file():
        return load_detector_file(ref)
    raise ModelReferenceError(f"cannot load a detector from {ref!r}: not a file, runs:/<run_id> or "
                     "models:/<name>@<alias>")
