"""Base classes of every typed spec section: unknown fields are errors, not silent defaults."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """A pydantic model that forbids unknown fields and validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class MethodParams(StrictModel):
    """Base of each method's ``method:`` section; a method's subclass narrows ``name`` to a
    ``Literal`` and adds its knobs."""

    name: str


class Constraint(StrictModel):
    """A bound on a reported metric that must hold for a trial (a search space's
    ``constraints``, on the trial's last value) or an epoch (``train.select_constraints``) to
    be selected, e.g. ``{metric: val/id_acc, min: 0.96}``: the best OOD detector that still
    classifies.

    Infeasible trials are never selected or promoted; TPE also learns them (Optuna's
    ``Trial.set_constraint``: a value <= 0 is feasible)."""

    metric: str = Field(description="a per-epoch metric, e.g. val/id_acc")
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _has_a_bound(self) -> Constraint:
        if self.min is None and self.max is None:
            raise ValueError(f"constraint on {self.metric!r} needs min and/or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"constraint on {self.metric!r}: min {self.min} > max {self.max}")
        return self

    def violation(self, value: float | None) -> float:
        """How far ``value`` lies outside the bounds (0 when inside; inf when missing)."""
        if value is None or math.isnan(value):
            return math.inf
        low = 0.0 if self.min is None else self.min - value
        high = 0.0 if self.max is None else value - self.max
        return max(low, high, 0.0)

    def describe(self) -> str:
        parts = ([f">= {self.min:g}"] if self.min is not None else []) + (
            [f"<= {self.max:g}"] if self.max is not None else [])
        return f"{self.metric} {' and '.join(parts)}"
