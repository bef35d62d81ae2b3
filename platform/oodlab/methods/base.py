"""The method interface: every OOD method is one small class that plugs into the one loop.

A method decides how a model is built, what the loss of one step is, and which network is
evaluated and served (inside a :class:`~oodlab.detect.detector.Detector`). Everything else
(data, DDP, checkpoints, tracking) is the platform's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from oodlab.detect.evaluate import METRIC_KEYS
from oodlab.spec.base import MethodParams

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.data import DataLoader

    from oodlab.data.bundle import DataBundle
    from oodlab.spec import ExperimentSpec

Kind = Literal["multiclass", "multilabel", "unsupervised"]


@dataclass
class TrainState:
    """What a method may read (and, in ``extra``, write) during training.

    ``extra`` holds method state that must survive a restart (e.g. a loss constraint);
    it is saved in every checkpoint and restored before ``on_fit_start``.
    """

    epoch: int = 0
    step: int = 0
    num_classes: int = 0
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    extra: dict[str, Any] = field(default_factory=dict)


class EpochMeans:
    """Running means of per-step training quantities, read and reset once per epoch.

    A method calls :meth:`add` in ``training_step`` and :meth:`pop` in ``epoch_metrics``.
    Tensors are summed detached, where they live, and read once per epoch (no device sync per
    step); names never added in the epoch come out as 0.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor | float] = {}
        self.steps = 0

    def add(self, **values: Tensor | float) -> None:
        """Add one step's values (one step per call)."""
        for name, v in values.items():
            v = v.detach() if isinstance(v, Tensor) else float(v)
            self._sums[name] = self._sums.get(name, 0.0) + v
        self.steps += 1

    def pop(self, names: tuple[str, ...]) -> dict[str, float]:
        """The epoch's means of ``names``, and a reset."""
        out = {k: float(self._sums.get(k, 0.0)) / max(self.steps, 1) for k in names}
        self._sums, self.steps = {}, 0
        return out


@dataclass
class Loaders:
    """The data a method's hooks may look at."""

    id_train: DataLoader
    oe: DataLoader | None = None


class Method:
    """Base class with the defaults most methods want; subclasses override ``training_step``.

    A method is one file: a :class:`MethodParams` subclass (its ``name`` a ``Literal``) and a
    ``Method`` subclass registered with ``@METHODS.register`` (:mod:`oodlab.registry`).
    Class-level declarations (``kind``, ``uses_oe``, ``needs_init_from``, :meth:`check`,
    :meth:`reported_metrics`) are all the spec layer reads: validating a spec builds no model.
    The instance hooks below are called by the training loop in this order::

        build -> on_fit_start -> wrap -> [training_step ...] -> on_epoch_end
              -> epoch_metrics -> validation_metrics -> epoch_figures  (per epoch)
        export (after training, for evaluation and serving)
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    kind: ClassVar[Kind] = "multiclass"
    uses_oe: ClassVar[bool] = False  # trains on OE data (see also needs_oe)
    needs_init_from: ClassVar[bool] = False  # finetuning methods: the spec must set init_from

    def __init__(self, spec: ExperimentSpec) -> None:
        self.spec = spec
        self.params = spec.method

    # ---------------------------------------------------------------- class-level declarations
    @classmethod
    def needs_oe(cls, params: MethodParams) -> bool:
        """Whether a run with these params trains on OE data (default: ``uses_oe``)."""
        return cls.uses_oe

    @classmethod
    def check(cls, spec: ExperimentSpec) -> None:
        """Extra checks of a spec for this method; raise ``ValueError`` naming the field.
        Called while the spec is validated, so it must stay cheap: no model, no data."""

    @classmethod
    def reported_metrics(cls, spec: ExperimentSpec) -> set[str]:
        """Every per-epoch metric a run of ``spec`` reports: what a search may optimise.
        Methods that add metrics (``epoch_metrics``, ``validation_metrics``) extend this."""
        out = {"epoch", "train/loss", "train/lr", "train/images_per_s"}
        if cls.kind != "unsupervised":  # unsupervised methods report no ID accuracy
            out.add("val/id_map" if cls.kind == "multilabel" else "val/id_acc")
        if spec.data.val_ood:
            keys = METRIC_KEYS
            out |= {f"val/{k}" for k in keys}
            out |= {f"val/{s}/{k}" for s in spec.data.val_ood for k in keys}
        return out

    # ------------------------------------------------------------------------ instance hooks
    def build(self, num_classes: int) -> nn.Module:
        """Build the network; the default is the backbone named in ``spec.model``."""
        from oodlab.models import build_model

        return build_model(self.spec.model, num_classes=num_classes,
                           in_channels=self.spec.data.channels)

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      oe_batch: tuple[Tensor, Tensor] | None, state: TrainState) -> Tensor:
        """Return the scalar loss of one mini-batch."""
        raise NotImplementedError

    def on_fit_start(self, model: nn.Module, loaders: Loaders, state: TrainState) -> None:
        """Called once per worker before the first epoch (also after a restart, with
        ``state.extra`` restored) on the plain backbone holding its initial weights."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module that is trained (default: the backbone itself). Checkpoints hold its
        state; e.g. ``umap`` adds learnable masks and freezes the weights."""
        return model

    def export(self, model: nn.Module) -> nn.Module:
        """The plain backbone that is evaluated and served, from the trained ``wrap`` module."""
        return model

    def on_epoch_end(self, model: nn.Module, loaders: Loaders, state: TrainState) -> None:
        """Called on every worker after each epoch, before the checkpoint is written."""

    def epoch_metrics(self, model: nn.Module, state: TrainState) -> dict[str, float]:
        """Extra per-epoch metrics of the method, logged to MLflow with the epoch's others."""
        return {}

    def validation_metrics(self, model: nn.Module, bundle: DataBundle,
                           device: torch.device | str) -> dict[str, float] | None:
        """The per-epoch validation view (rank 0). ``None`` (the default) means the
        platform's: ID accuracy and validation-OOD metrics of the first ``eval.scores``."""
        return None

    def epoch_figures(self, model: nn.Module, state: TrainState) -> dict[str, Figure]:
        """Figures to log to the run after this epoch (rank 0), by artifact path."""
        return {}


def forward_id_and_oe(model: nn.Module, x: Tensor, x_oe: Tensor | None
                      ) -> tuple[Tensor, Tensor | None]:
    """One forward pass over ``cat([x, x_oe])`` so BatchNorm sees ID and OE together.

    This matches the reference OE, Energy-OE and EDGE code. Returns (ID logits, OE logits).
    """
    if x_oe is None:
        return model(x)[0], None
    logits = model(torch.cat([x, x_oe]))[0]
    return logits[: len(x)], logits[len(x):]
