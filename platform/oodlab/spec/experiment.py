"""Typed experiment specs (pydantic), loaded from YAML with errors that name the bad field.

An :class:`ExperimentSpec` is the one object that flows down the whole platform:
``spec (jobs/*.yaml) -> train -> evaluate -> tracking -> tune -> serve``.
Every section forbids unknown fields, so a typo is an error, not a silent default.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from oodlab.errors import SpecError
from oodlab.registry import DATASETS, METHODS, SCORES
from oodlab.spec.base import Constraint, MethodParams, StrictModel
from oodlab.spec.overrides import apply_overrides


class OESelectSpec(StrictModel):
    """EDGE's OE-dataset selection (oe_select.py): rank ``data.oe`` candidates, keep the best."""

    threshold: float = Field(0.0, ge=0, le=1, description="tau: keep normalised distance <= tau")
    top_k: int = Field(32, ge=1, description="singular values compared")
    direction: Literal["smallest", "largest"] = "smallest"
    batch_size: int = Field(128, ge=2)
    max_batches: int = Field(10, ge=1)
    backbone: str = Field("method:bce", description="feature extractor: 'method:<m>' (the "
                          "newest finished run of method <m> with this seed on this ID training "
                          "set, in this experiment), 'spec:<name>', 'random' (seeded init, as "
                          "EDGE's code), a detector file, runs:/<run_id> or "
                          "models:/<name>@<alias>")


SANITY_SETS = ("gaussian", "rademacher")  # noise: a sanity check, never in a headline mean
OOD_GROUPS = ("near_ood", "far_ood", "sanity_ood")


class DataSpec(StrictModel):
    """Which datasets play which role, and how images are shaped and batched.

    Test OOD sets are listed either grouped, as in OpenOOD v1.5 (Zhang et al. 2023):
    ``near_ood`` (semantic shift, similar pixels), ``far_ood`` (other domains) and
    ``sanity_ood`` (noise; reported, never in a headline mean), or, in older specs, ungrouped
    in ``test_ood`` (then the sanity-named sets gaussian/rademacher are left out of the
    headline mean). The two styles are not mixed. Test sets never appear in ``val_ood`` or
    ``oe``, and the ID set never appears among the OOD sets.
    """

    id: str = "mnist"
    root: str | None = Field(None, description="local root of external datasets (no download), "
                             "or s3://bucket/prefix staged into the cache")
    image_size: int = Field(28, ge=8, le=512)
    channels: Literal[1, 3] = 1
    holdout_classes: list[int] = Field(default_factory=list, description="near-OOD ID classes")
    val_ood: list[str] = Field(default_factory=lambda: ["val_letters", "val_photos", "val_noise"])
    test_ood: list[str] = Field(
        default_factory=lambda: ["letters", "photos", "gaussian", "rademacher", "blobs"],
        description="ungrouped test OOD sets (older specs); empty when groups are used")
    near_ood: list[str] = Field(default_factory=list, description="near-OOD test sets")
    far_ood: list[str] = Field(default_factory=list, description="far-OOD test sets")
    sanity_ood: list[str] = Field(default_factory=list,
                                  description="sanity test sets (noise), never in a headline")
    oe: list[str] = Field(default_factory=list, description="OE candidate sets mixed for training")
    oe_select: OESelectSpec | None = Field(None, description="select among data.oe (EDGE)")
    imbalance_ratio: float | None = Field(
        None, ge=1, le=100, description="long tail ρ of the multi-label mosaics; default: the "
        "set's own (10 for mnist_mosaic, 50 for fashion_mosaic)")
    limit: int | None = Field(None, ge=1, description="cap on samples per split (quick runs)")
    batch_size: int = Field(128, ge=1)
    oe_batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    cache_dir: str | None = None

    @property
    def grouped(self) -> bool:
        """Whether the test OOD sets are listed by group (near / far / sanity)."""
        return bool(self.near_ood or self.far_ood or self.sanity_ood)

    def test_sets(self) -> dict[str, list[str]]:
        """Test OOD set names by group: near, far, sanity, ungrouped (empty ones left out)."""
        groups = {"near": self.near_ood, "far": self.far_ood, "sanity": self.sanity_ood,
                  "ungrouped": self.test_ood}
        return {g: list(names) for g, names in groups.items() if names}

    @model_validator(mode="before")
    @classmethod
    def _groups_replace_default_test_ood(cls, raw: Any) -> Any:
        """A spec that lists groups and no ``test_ood`` gets no default ungrouped sets."""
        if isinstance(raw, dict) and any(raw.get(g) for g in OOD_GROUPS) \
                and "test_ood" not in raw:
            raw = {**raw, "test_ood": []}
        return raw

    @model_validator(mode="after")
    def _roles_do_not_overlap(self) -> DataSpec:
        if self.oe_select is not None and not self.oe:
            raise ValueError("oe_select needs the OE candidates listed in data.oe")
        lists = {"test_ood": self.test_ood, "near_ood": self.near_ood,
                 "far_ood": self.far_ood, "sanity_ood": self.sanity_ood}
        if self.grouped and self.test_ood:
            raise ValueError(
                f"test_ood {self.test_ood} cannot be mixed with near_ood/far_ood/sanity_ood; "
                "list every test set in a group (sanity = noise)")
        if self.grouped and not (self.near_ood or self.far_ood):
            raise ValueError("near_ood/far_ood: grouped test sets need at least one near or "
                             "far set (the headline mean is over near + far; sanity sets are "
                             "never in it)")
        seen: dict[str, str] = {}
        for field, names in lists.items():
            for n in names:
                if n in seen:
                    raise ValueError(f"{field}: {n!r} is listed twice (also in {seen[n]}); a "
                                     "test set belongs to one group")
                seen[n] = field
        overlap = (set(self.val_ood) | set(self.oe)) & set(seen)
        if overlap:
            fields = sorted({seen[n] for n in overlap})
            raise ValueError(
                f"{'/'.join(fields)} sets {sorted(overlap)} also appear in val_ood/oe; test OOD "
                "sets must never be used for training or model selection"
            )
        for field, names in {**lists, "val_ood": self.val_ood, "oe": self.oe}.items():
            if self.id in names:
                raise ValueError(f"{field}: the ID set {self.id!r} cannot also be an OOD set")
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


class SelectConstraint(Constraint):
    """A bound an epoch must keep to be selected (``train.select_constraints``). With
    ``relative_to: init`` the bounds are offsets from the value the metric has on the
    ``init_from`` model, measured on the same validation data before the first step:
    ``{metric: val/id_acc, min: -0.01, relative_to: init}`` serves no epoch of a fine-tune
    that classifies worse than the model it started from, minus 0.01."""

    relative_to: Literal["init"] | None = None

    def bounds(self, init: dict[str, float]) -> Constraint:
        """The absolute bound (``init``: the init model's metrics, read when relative)."""
        if self.relative_to is None:
            return Constraint(metric=self.metric, min=self.min, max=self.max)
        ref = init[self.metric]
        return Constraint(metric=self.metric,
                          min=None if self.min is None else ref + self.min,
                          max=None if self.max is None else ref + self.max)

    def describe(self) -> str:
        return super().describe() + (" relative to the init model" if self.relative_to else "")


SELECT_SCORE = "select/score"  # the checkpoint score when train.select_constraints is set


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
    select_metric: str | None = Field(
        "val/auroc", description="the epoch whose checkpoint is evaluated and served: best on "
        "this per-epoch validation metric (Ray Train's checkpoint score); null = the last "
        "epoch. Left at its default, a spec without validation OOD sets uses the last epoch")
    select_mode: Literal["max", "min"] = "max"
    select_constraints: list[SelectConstraint] = Field(
        default_factory=list, description="bounds an epoch must keep to be selected, e.g. "
        "{metric: val/id_acc, min: -0.01, relative_to: init}; the epoch served is the best on "
        "select_metric among those that keep them, else the last epoch (select/feasible = 0)")

    @property
    def score_attribute(self) -> str | None:
        """What Ray Train scores checkpoints by: ``select_metric``, or ``select/score`` (the
        metric where the epoch keeps ``select_constraints``, else the worst value)."""
        if self.select_metric is None:
            return None
        return SELECT_SCORE if self.select_constraints else self.select_metric

    @property
    def needs_init_metrics(self) -> bool:
        """A constraint is relative to the init model: its validation metrics are measured
        once before the first step."""
        return any(c.relative_to == "init" for c in self.select_constraints)

    def replaces(self, value: float | None, best: float | None) -> bool:
        """Whether an epoch scoring ``value`` on :attr:`score_attribute` replaces the one
        selected so far (``best``; None before the first). Without a score every epoch does
        (the last is served); an infeasible best (non-finite) is replaced by any later epoch,
        so with no feasible epoch the last is served."""
        if self.score_attribute is None or best is None or not math.isfinite(best):
            return True
        if value is None:
            return False
        return value > best if self.select_mode == "max" else value < best


class EvalSpec(StrictModel):
    """Post-hoc scores to evaluate; the first one is the detector that gets served."""

    scores: list[str] = Field(default_factory=lambda: ["energy", "msp", "max_logit"], min_length=1)
    score_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tpr: float = Field(0.95, gt=0, lt=1, description="ID true-positive rate of the threshold")
    epoch_val_limit: int = Field(1000, ge=1, description="ID-train samples for per-epoch fits")
    head_fraction: float = Field(0.5, gt=0, le=1, description="label share of head classes")
    placement: Literal["auto", "driver", "task"] = Field(
        "auto", description="where the final test evaluation runs: 'driver' (the process that "
        "started the run), 'task' (a Ray task with resources.cpus_per_worker CPUs and a GPU "
        "when resources.use_gpu and the cluster has one), 'auto' (a task when the cluster has "
        "more than one node or the run uses a GPU, else the driver)")

    @field_validator("scores")
    @classmethod
    def _known_scores(cls, scores: list[str]) -> list[str]:
        unknown = [s for s in scores if s not in SCORES]
        if unknown:
            raise ValueError(f"unknown score(s) {unknown}; allowed: {sorted(SCORES)}")
        return scores

    @field_validator("score_params")
    @classmethod
    def _known_score_params(cls, params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Unknown scores, parameters or values fail at spec load, not after training. Scores
        that run the network (``needs_model``) check their values when the method builds them."""
        for name, kwargs in params.items():
            if name not in SCORES:
                raise ValueError(f"unknown score {name!r}; allowed: {sorted(SCORES)}")
            if not SCORES[name].needs_model:
                try:
                    SCORES[name](**kwargs)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{name}: {err}") from None
        return params


class ResourcesSpec(StrictModel):
    """Ray Train ScalingConfig and FailureConfig."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts; -1 = unlimited")
    loader_workers: int = Field(
        0, ge=0, description="DataLoader processes per Train worker that read and decode "
                             "training images off the training process (0: in it; pays off "
                             "for images decoded from files, not for in-memory arrays: "
                             "bench/data_path.py); count them in cpus_per_worker")


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
                    "spec:<name> (the newest finished run of that spec with the same seed, "
                    "trained on the same ID training images)")
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    method: SerializeAsAny[MethodParams]
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

    @field_validator("method", mode="wrap")
    @classmethod
    def _method_params(cls, value: Any, handler: Any) -> MethodParams:
        """Validate ``method`` with the params class of the method it names (registered in
        :data:`oodlab.registry.METHODS`), so errors read ``method.<field>``."""
        if isinstance(value, MethodParams):
            return value
        name = value.get("name") if isinstance(value, dict) else None
        if name is None:
            raise ValueError(f"a method section needs a name; known: {METHODS.names()}")
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; known: {METHODS.names()}")
        return METHODS.get(name).Params.model_validate(value)

    @model_validator(mode="after")
    def _datasets_exist(self) -> ExperimentSpec:
        known = set(DATASETS.names())
        fields = {"data.id": [self.data.id], "data.val_ood": self.data.val_ood,
                  "data.test_ood": self.data.test_ood, "data.near_ood": self.data.near_ood,
                  "data.far_ood": self.data.far_ood, "data.sanity_ood": self.data.sanity_ood,
                  "data.oe": self.data.oe}
        for field, names in fields.items():
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"{field}: unknown dataset(s) {unknown}; see `oodlab data list`")
        return self

    @model_validator(mode="after")
    def _scores_fit_the_method(self) -> ExperimentSpec:
        """A score fitted with ID class labels (``needs_labels``: mahalanobis) needs a model
        trained with them; an unsupervised method's model has none."""
        method = METHODS.get(self.method.name)
        if method.kind == "unsupervised":
            bad = [s for s in self.eval.scores if getattr(SCORES.get(s), "needs_labels", False)]
            if bad:
                raise ValueError(
                    f"eval.scores: {bad} need(s) ID class labels, but method "
                    f"{self.method.name!r} trains without labels (kind 'unsupervised'); use "
                    "label-free scores such as knn or cluster_mahalanobis")
        return self

    @model_validator(mode="after")
    def _method_inputs(self) -> ExperimentSpec:
        """What the method declares it needs, read from its class: no model is built."""
        method = METHODS.get(self.method.name)
        if method.needs_init_from and self.init_from is None:
            raise ValueError(f"init_from: method {self.method.name!r} finetunes a trained model; "
                             "set init_from (runs:/<run_id>, models:/<name>@<alias> or "
                             "spec:<spec name>)")
        if method.needs_oe(self.method) and not self.data.oe:
            raise ValueError(f"data.oe: method {self.method.name!r} needs OE data; "
                             "list OE sets (see `oodlab data list`, role oe)")
        method.check(self)
        metric = self.train.select_metric
        if metric is not None and metric not in method.reported_metrics(self):
            if "select_metric" in self.train.model_fields_set:
                raise ValueError(f"train.select_metric: {metric!r} is never reported by "
                                 f"{self.method.name!r} runs of this spec")
            self.train.select_metric = None  # the default needs validation OOD sets
        for i, c in enumerate(self.train.select_constraints):
            where = f"train.select_constraints.{i}"
            if self.train.select_metric is None:
                raise ValueError(f"{where}: constraints choose among epochs by "
                                 "train.select_metric; set it (this spec selects the last epoch)")
            if c.metric not in method.reported_metrics(self):
                raise ValueError(f"{where}.metric: {c.metric!r} is never reported by "
                                 f"{self.method.name!r} runs of this spec")
            if c.relative_to == "init" and self.init_from is None:
                raise ValueError(f"{where}.relative_to: 'init' needs init_from (the model the "
                                 "run starts from)")
        return self


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<spec>"
        lines.append(f"  {loc}: {e['msg']}")
    return "invalid spec:\n" + "\n".join(lines)


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
