"""The spec layer: typed experiment specs, ``--set`` overrides and search spaces.

Everything above it receives an :class:`ExperimentSpec`; nothing here imports a model, a
dataset or Ray. Names of methods, scores and datasets are checked against
:mod:`oodlab.registry`.
"""

from oodlab.errors import SpecError
from oodlab.spec.base import MethodParams, StrictModel
from oodlab.spec.experiment import (
    SELECT_SCORE,
    DataSpec,
    EvalSpec,
    ExperimentSpec,
    ModelSpec,
    OESelectSpec,
    ResourcesSpec,
    SelectConstraint,
    TrackingSpec,
    TrainSpec,
    load_spec,
    validate_spec,
)
from oodlab.spec.overrides import apply_overrides, flatten, parse_override, set_path

__all__ = [
    "SELECT_SCORE", "DataSpec", "EvalSpec", "ExperimentSpec", "MethodParams", "ModelSpec",
    "OESelectSpec", "ResourcesSpec", "SelectConstraint", "SpecError", "StrictModel",
    "TrackingSpec", "TrainSpec", "apply_overrides", "flatten", "load_spec", "parse_override",
    "set_path", "validate_spec",
]
