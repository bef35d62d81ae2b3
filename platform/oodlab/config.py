"""Typed experiment specs (pydantic), loaded from YAML with errors that name the bad field.

An :class:`ExperimentSpec` is the one object that flows down the whole platform:
``spec (jobs/*.yaml) -> train -> evaluate -> tracking -> tune -> serve``.
Every section forbids unknown fields, so a typo is an error, not a silent default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from oodlab.methods import METHOD_SPECS
from oodlab.schema import StrictModel

MethodSpec = Annotated[METHOD_SPECS, Field(discriminator="name")]


class SpecError(ValueError):
    """A spec that cannot be run. The message names each bad field and what is allowed."""


class OESelectSpec(StrictModel):
    """EDGE's OE-dataset selection (oe_select.py): rank ``data.oe`` candidates, keep the best."""

    threshold: float = Field(0.0, ge=0, le=1, description="tau: keep normalised distance <= tau")
    top_k: int = Field(32, ge=1, description="singular values compared")
    direction: Literal["smallest", "largest"] = "smallest"
    batch_size: int = Field(128, ge=2)
    max_batches: int = Field(10, ge=1)
    backbone: str = Field("random", description="'random' (seeded init), a detector file, "
                          "runs:/<run_id> or models:/<name>@<alias>")


class DataSpec(StrictModel):
    """Which datasets play which role, and how images are shaped and batched."""

    id: str = "mnist"
    root: str | None = Field(None, description="local root of external datasets (no download), "
                             "or s3://bucket/prefix staged into the cache")
    image_size: int = Field(28, ge=8, le=512)
    channels: Literal[1, 3] = 1
    holdout_classes: list[int] = Field(default_factory=list, description="near-OOD digit classes")
    val_ood: list[str] = Field(default_factory=lambda: ["val_letters", "val_photos", "val_noise"])
    test_ood: list[str] = Field(
        default_factory=lambda: ["letters", "photos", "gaussian", "rademacher", "blobs"]
    )
    oe: list[str] = Field(default_factory=list, description="OE candidate sets mixed for training")
    oe_select: OESelectSpec | None = Field(None, description="select among data.oe (EDGE)")
    imbalance_ratio: float = Field(10.0, ge=1, description="long tail of multi-label mosaics")
    limit: int | None = Field(None, ge=1, description="cap on samples per split (quick runs)")
    batch_size: int = Field(128, ge=1)
    oe_batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _roles_do_not_overlap(self) -> DataSpec:
        overlap = (set(self.val_ood) | set(self.oe)) & set(self.test_ood)
        if self.oe_select is not None and not self.oe:
            raise ValueError("oe_select needs the OE candidates listed in data.oe")
        if overlap:
            raise ValueError(
                f"test_ood sets {sorted(overlap)} also appear in val_ood/oe; test OOD sets must "
                "never be used for training or model selection"
            )
        return self


class ModelSpec(StrictModel):
    """Backbone choice. Every model returns (logits, penultimate features)."""

    arch: Literal["small_cnn", "resnet18", "densenet"] = "small_cnn"
    width: int = Field(32, ge=4, le=512, description="base channel count (small_cnn, resnet18)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    depth: int = Field(100, ge=10, le=250, description="DenseNet-BC depth, 6n + 4 (100 = paper)")
    growth: int = Field(12, ge=2, le=64, description="DenseNet-BC growth rate k")

    @field_validator("depth")
    @classmethod
    def _densenet_depth(cls, v: int) -> int:
        if (v - 4) % 6 != 0:
            raise ValueError(f"DenseNet-BC depth must be 6n + 4 (e.g. 40, 100), got {v}")
        return v


class TrainSpec(StrictModel):
    """Optimisation settings for the one training loop."""

    epochs: int = Field(5, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    scheduler: Literal["cosine", "none"] = "cosine"
    log_every_n_steps: int = Field(20, ge=1)


class EvalSpec(StrictModel):
    """Post-hoc scores to evaluate; the first one is the detector that gets served."""

    scores: list[str] = Field(default_factory=lambda: ["energy", "msp", "max_logit"], min_length=1)
    score_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tpr: float = Field(0.95, gt=0, lt=1, description="ID true-positive rate of the threshold")
    epoch_val_limit: int = Field(1000, ge=1, description="ID-train samples for per-epoch fits")
    head_fraction: float = Field(0.5, gt=0, le=1, description="label share of head classes")

    @field_validator("scores")
    @classmethod
    def _known_scores(cls, scores: list[str]) -> list[str]:
        from oodlab.scores import SCORES

        unknown = [s for s in scores if s not in SCORES]
        if unknown:
            raise ValueError(f"unknown score(s) {unknown}; allowed: {sorted(SCORES)}")
        return scores


class ResourcesSpec(StrictModel):
    """Ray Train ScalingConfig and FailureConfig."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts; -1 = unlimited")


class TrackingSpec(StrictModel):
    """MLflow settings; environment variables override (MLFLOW_TRACKING_URI)."""

    experiment: str = "oodlab"
    tracking_uri: str | None = None
    model_name: str | None = Field(None, description="register the detector under this name")


class ExperimentSpec(StrictModel):
    """One experiment: data + method + model + train + eval + resources + tracking."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    workdir: str = Field(".oodlab", description="local working dir (MLflow db, checkpoints)")
    storage: str | None = Field(
        None, description="checkpoints + Tune state (and, for s3://, MLflow artifacts): a local "
                          "path or s3://bucket/prefix (endpoint and credentials from the AWS "
                          "variables, see docs/kubernetes.md); default <workdir>/ray")
    init_from: str | None = Field(
        None, pattern=r"^(runs:/[0-9a-f]+/?|models:/.+|spec:[A-Za-z0-9_.-]+)$",
        description="start from an earlier model: runs:/<run_id>, models:/<name>@<alias>, or "
                    "spec:<name> (the newest finished run of that spec with the same seed)")
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    method: MethodSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @property
    def workdir_path(self) -> Path:
        return Path(os.environ.get("OODLAB_WORKDIR", self.workdir)).expanduser().resolve()

    def pinned(self) -> ExperimentSpec:
        """A copy whose local paths are absolute, resolved from this process's directory.

        Hand this to code that runs elsewhere on the same machine (a Tune trial runs in its
        own trial directory) so that it finds the same MLflow store, storage and caches.
        """
        def absolute(path: str | None) -> str | None:
            if path is None or "://" in path:
                return path
            return str(Path(path).expanduser().resolve())

        data = self.data.model_copy(update={"cache_dir": absolute(self.data.cache_dir),
                                            "root": absolute(self.data.root)})
        return self.model_copy(update={"workdir": str(self.workdir_path),
                                       "storage": absolute(self.storage), "data": data})

    @model_validator(mode="after")
    def _datasets_exist(self) -> ExperimentSpec:
        from oodlab.data import list_datasets

        known = {d.name for d in list_datasets()}
        fields = {"data.id": [self.data.id], "data.val_ood": self.data.val_ood,
                  "data.test_ood": self.data.test_ood, "data.oe": self.data.oe}
        for field, names in fields.items():
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"{field}: unknown dataset(s) {unknown}; see `oodlab data list`")
        return self

    @model_validator(mode="after")
    def _method_inputs(self) -> ExperimentSpec:
        from oodlab.methods import build_method

        method = build_method(self)
        if method.needs_init_from and self.init_from is None:
            raise ValueError(f"init_from: method {self.method.name!r} finetunes a trained model; "
                             "set init_from (runs:/<run_id>, models:/<name>@<alias> or "
                             "spec:<spec name>)")
        if method.uses_oe and not self.data.oe:
            raise ValueError(f"data.oe: method {self.method.name!r} needs OE data; "
                             "list OE sets (see `oodlab data list`, role oe)")
        return self


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<spec>"
        lines.append(f"  {loc}: {e['msg']}")
    return "invalid spec:\n" + "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise SpecError(f"--set {item!r}: empty key")
    return key.strip().split("."), yaml.safe_load(raw)


def set_path(raw: dict[str, Any], keys: list[str], value: Any, label: str) -> None:
    """Set ``raw[k0][k1]...[kn] = value`` in place, creating empty (or null) sections."""
    node = raw
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise SpecError(f"{label}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str],
                    values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return a copy of the raw spec with dotted ``key=value`` overrides (strings, values read
    as YAML) and already-typed ``values`` (``{"method.m_in": -20.0}``) applied."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        set_path(out, keys, value, f"--set {item!r}")
    for key, value in (values or {}).items():
        set_path(out, key.split("."), value, key)
    return out


def validate_spec(raw: dict[str, Any]) -> ExperimentSpec:
    """Validate a raw dict, raising :class:`SpecError` with every bad field named."""
    try:
        return ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ExperimentSpec:
    """Load a YAML spec file, apply ``--set`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a YAML mapping, got {type(raw).__name__}")
    return validate_spec(apply_overrides(raw, overrides or []))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys (for MLflow params and Tune search spaces)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
