"""Method plug-ins: one file per method family, each class registered with one decorator.

To add a method, write ``methods/<name>.py``::

    class MyParams(MethodParams):
        name: Literal["my_method"] = "my_method"
        weight: float = Field(1.0, gt=0)

    @METHODS.register
    class MyMethod(Method):
        name = "my_method"
        Params = MyParams

        def training_step(self, model, batch, oe_batch, state):
            ...

and a search space in ``search_spaces/``. Nothing else changes: :data:`METHODS` finds the
file on its first lookup, and specs and search spaces accept the name and its metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from oodlab.detect.detector import Detector, read_state
from oodlab.methods.base import Loaders, Method, MethodParams, TrainState
from oodlab.registry import METHODS
from oodlab.spec import validate_spec

if TYPE_CHECKING:
    from torch import nn

    from oodlab.spec import ExperimentSpec


def build_method(spec: ExperimentSpec) -> Method:
    """Instantiate the method named in ``spec.method.name``."""
    return METHODS.get(spec.method.name)(spec)


def detector_from_state(state: dict[str, Any]) -> Detector:
    """Rebuild a saved detector: the network its spec's method builds, then its weights."""
    spec = validate_spec(state["spec"])
    model: nn.Module = build_method(spec).build(state["num_classes"])
    return Detector.from_state(state, model)


def load_detector_file(path: str | Path) -> Detector:
    """Load a detector saved with :meth:`Detector.save` (``weights_only``: no pickled code)."""
    return detector_from_state(read_state(path))


__all__ = ["METHODS", "Loaders", "Method", "MethodParams", "TrainState", "build_method",
           "detector_from_state", "load_detector_file"]
