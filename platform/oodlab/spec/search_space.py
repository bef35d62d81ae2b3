"""Declarative Tune/Optuna search spaces (``search_spaces/<method>.yaml``), typed and checked
against the experiment spec before any trial starts.

A space names spec fields by their dotted path (``method.m_in``, ``data.oe_select.threshold``)
and gives each a distribution; the objective is one or two per-epoch metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from oodlab.registry import METHODS
from oodlab.spec import (
    ExperimentSpec,
    ResourcesSpec,
    SpecError,
    apply_overrides,
    validate_spec,
)
from oodlab.spec.base import Constraint, StrictModel


class _Range(StrictModel):
    """A [low, high] range; an empty one is an error."""

    @model_validator(mode="after")
    def _range(self) -> _Range:
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low}) must be below high ({self.high})")
        return self

    def extremes(self) -> list[Any]:
        return [self.low, self.high]


class Uniform(_Range):
    type: Literal["uniform"]
    low: float
    high: float


class LogUniform(Uniform):
    type: Literal["loguniform"]  # type: ignore[assignment]

    @model_validator(mode="after")
    def _positive(self) -> LogUniform:
        if self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self


class IntRange(_Range):
    type: Literal["int"]
    low: int
    high: int = Field(description="inclusive")
    step: int = Field(1, ge=1)


class Categorical(StrictModel):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)

    def extremes(self) -> list[Any]:
        return list(self.choices)


Param = Annotated[Uniform | LogUniform | IntRange | Categorical, Field(discriminator="type")]


class Objective(StrictModel):
    metric: str = Field(description="a per-epoch metric, e.g. val/auroc, val/id_acc")
    mode: Literal["max", "min"] = "max"


class Scheduler(StrictModel):
    """ASHA stops poor trials early on the first objective; FIFO runs every trial to the end."""

    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs before a trial may be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class Searcher(StrictModel):
    name: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(4, ge=1, description="TPE: random trials before modelling")


class SearchSpace(StrictModel):
    """One search: what to vary, what to optimise, how many trials, how to stop them."""

    method: str = Field(description="the spec's method.name this space is written for")
    objectives: list[Objective] = Field(min_length=1, max_length=2)
    constraints: list[Constraint] = Field(
        default_factory=list, description="bounds a trial must keep to be selected")
    params: dict[str, Param] = Field(min_length=1)
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(1, ge=1)
    resources: ResourcesSpec | None = Field(None, description="per trial; default: the spec's")
    scheduler: Scheduler = Field(default_factory=Scheduler)
    searcher: Searcher = Field(default_factory=Searcher)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file; errors name the bad field."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"search space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
        return SearchSpace.model_validate(raw)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise SpecError(f"invalid search space {path}:\n" + "\n".join(lines)) from None


def reported_metrics(spec: ExperimentSpec) -> set[str]:
    """The per-epoch metrics a run of ``spec`` reports (what a search may optimise), as its
    method declares them (:meth:`oodlab.methods.base.Method.reported_metrics`)."""
    return METHODS.get(spec.method.name).reported_metrics(spec)


def check_space(space: SearchSpace, spec: ExperimentSpec) -> None:
    """Fail before any trial starts: wrong method, unknown field, out-of-range value, a metric
    the method never reports."""
    if space.method != spec.method.name:
        raise SpecError(f"search space is for method {space.method!r} but the spec's method is "
                        f"{spec.method.name!r}")
    known = reported_metrics(spec)
    for kind, metric in ([("objective", o.metric) for o in space.objectives]
                         + [("constraint", c.metric) for c in space.constraints]):
        if metric not in known:
            raise SpecError(f"{kind} metric {metric!r} is never reported by "
                            f"{spec.method.name!r} runs of this spec; known: {sorted(known)}")
    raw = spec.model_dump(mode="json")
    for name, param in space.params.items():
        for value in param.extremes():
            try:
                validate_spec(apply_overrides(raw, [], {name: value}))
            except SpecError as err:
                detail = str(err).removeprefix("invalid spec:\n").strip()
                raise SpecError(f"search space params.{name} = {value!r} does not fit the "
                                f"spec: {detail}") from None


def apply_params(spec: ExperimentSpec, params: dict[str, Any], **top: Any) -> ExperimentSpec:
    """The spec with sampled ``params`` (dotted keys) and top-level fields (e.g. name) set."""
    return validate_spec(apply_overrides(spec.model_dump(mode="json") | top, [], params))
