"""Method registry: each method is one class with a typed params section.

To add a method: write ``methods/<name>.py`` with a ``MethodParams`` subclass (its ``name``
field a ``Literal``) and a ``Method`` subclass, then list both below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from oodlab.methods.base import Loaders, Method, MethodParams, TrainState
from oodlab.methods.contrastive import CCL, CCLParams, SimCLR, SimCLRParams
from oodlab.methods.ddpm import DDPM, DDPMParams
from oodlab.methods.multilabel import (
    BCE,
    BCEOE,
    BCEOEParams,
    BCEParams,
    Edge,
    EdgeParams,
    EnergyOEML,
    EnergyOEMLParams,
)
from oodlab.methods.outlier_exposure import EnergyOE, EnergyOEParams, OEParams, OutlierExposure
from oodlab.methods.supervised import Supervised, SupervisedParams
from oodlab.methods.unleashing_mask import (
    UMAPParams,
    UMParams,
    UnleashingMask,
    UnleashingMaskPruning,
)

if TYPE_CHECKING:
    from oodlab.config import ExperimentSpec

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Supervised, OutlierExposure, EnergyOE, BCE, BCEOE, EnergyOEML, Edge,
                        UnleashingMask, UnleashingMaskPruning, DDPM, SimCLR, CCL)
}
_PARAMS: tuple[type[MethodParams], ...] = (
    SupervisedParams, OEParams, EnergyOEParams, BCEParams, BCEOEParams, EnergyOEMLParams,
    EdgeParams, UMParams, UMAPParams, DDPMParams, SimCLRParams, CCLParams,
)
METHOD_SPECS = Union[_PARAMS]  # noqa: UP007  (a runtime union for pydantic's discriminator)


def build_method(spec: ExperimentSpec) -> Method:
    """Instantiate the method named in ``spec.method.name``."""
    return METHODS[spec.method.name](spec)


__all__ = ["METHODS", "METHOD_SPECS", "Loaders", "Method", "MethodParams", "TrainState",
           "build_method"]
