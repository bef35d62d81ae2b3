"""Multi-label OOD methods: ``bce``, ``bce_oe``, ``energy_oe_ml`` and ``edge``.

All are scored with JointEnergy S(x) = sum_c softplus(f_c(x)) (Wang et al. 2021; higher =
more ID). EDGE: Sun et al., "Unknown-aware Multi-label Learning by Energy Distribution Gap
Expansion", AAAI 2025 (arXiv 2412.07499); reference code Yuchen-Sunflower/EDGE ``weg.py``
(``--score joint``). With OE, ID and OE go through one forward pass, as in ``weg.py``, so
BatchNorm sees them together.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from oodlab.detect.scores import joint_energy
from oodlab.methods.base import EpochMeans, Method, MethodParams, TrainState, forward_id_and_oe
from oodlab.methods.outlier_exposure import EnergyMarginParams, energy_hinge
from oodlab.registry import METHODS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from oodlab.spec import ExperimentSpec

TAIL_K = 32  # bottom-k ID samples behind the logged S(tail) of bce_oe / energy_oe_ml
STATS = ("l_conf", "l_gap", "gap_active", "s_id", "s_tail", "s_oe")
HISTORY = "energy_history"  # state.extra key: the per-epoch means, kept across restarts


def confidence_loss(logits_oe: Tensor) -> Tensor:
    """L_conf: BCE of OE logits toward the all-zero label, mean over samples x classes.

    EDGE's ``weg.py``: ``-log(1 - sigmoid(z_oe)).mean()`` == ``softplus(z_oe).mean()``
    (= S_JE(x_oe) / C on average); written with softplus for stability.
    """
    return F.softplus(logits_oe).mean()


def tail_scores(s_id: Tensor, k: int) -> Tensor:
    """The k LOWEST JointEnergy scores of the ID batch ("tail" samples, ``torch.topk(-S_in, k)``
    in EDGE's ``weg.py``; not defined by class frequency)."""
    return torch.topk(s_id, min(k, s_id.numel()), largest=False).values


def gap_hinge(s_id: Tensor, s_oe: Tensor, k: int, margin: float | Tensor) -> Tensor:
    """[n_oe, k] hinge relu(S(x_oe_i) - S(tail_j) + m) between every OE sample and every
    bottom-k ID sample (EDGE's ``weg.py``); nothing is detached, so gradients lower S(OE) and
    raise S(tail ID)."""
    tail = tail_scores(s_id, k)
    return F.relu(s_oe[:, None] - tail[None, :] + margin)


def gap_loss(logits_id: Tensor, logits_oe: Tensor, k: int, margin: float) -> Tensor:
    """L_gap = 1/(n_oe k) sum_i sum_j relu(S(x_oe_i) - S(tail_j) + m), as in EDGE's ``weg.py``,
    with S the JointEnergy (a sum over classes)."""
    return gap_hinge(joint_energy(logits_id), joint_energy(logits_oe), k, margin).mean()


def gap_margin(num_classes: int, margin: float, margin_rel: float) -> float:
    """m = margin + margin_rel * C ln 2: the margin in units of S0 = C ln 2, the JointEnergy of
    an undecided image (all C logits 0). JointEnergy grows with C, so an absolute m that acts
    for C = 80 (COCO) may never act for C = 10. The unit is fixed, never the batch's own S:
    a margin that grows with S(ID) would let L_gap grow S without bound."""
    return margin + margin_rel * num_classes * math.log(2)


def joint_energy_margin_loss(logits_id: Tensor, logits_oe: Tensor, m_in: float,
                             m_out: float) -> Tensor:
    """Liu et al.'s squared energy hinge (Eq. 5) on the *joint* free energy E_J = -S_JE.

    E_J(x_in) is pushed below ``m_in`` and E_J(x_oe) above ``m_out`` (m_in < m_out <= 0):
    equivalently S_JE(x_in) >= -m_in and S_JE(x_oe) <= -m_out.
    """
    return energy_hinge(-joint_energy(logits_id), -joint_energy(logits_oe), m_in, m_out)


class BCEParams(MethodParams):
    name: Literal["bce"] = "bce"


class BCEOEParams(MethodParams):
    name: Literal["bce_oe"] = "bce_oe"
    alpha: float = Field(1.0, ge=0, description="weight of L_conf on OE samples")


class EnergyOEMLParams(EnergyMarginParams):
    name: Literal["energy_oe_ml"] = "energy_oe_ml"
    m_in: float = Field(-6.0, description="joint free energy of ID pushed below (S_JE >= 6)")
    m_out: float = Field(-1.0, description="joint free energy of OE pushed above (S_JE <= 1)")


class EdgeParams(MethodParams):
    name: Literal["edge"] = "edge"
    alpha: float = Field(1.0, ge=0, description="weight of L_conf (EDGE weg.py: 1)")
    beta: float = Field(0.1, ge=0, description="weight of L_gap (EDGE weg.py: 0.1)")
    k: int = Field(32, ge=1, description="bottom-k ID samples per batch (README cmd: 32)")
    margin: float = Field(0.0, description="absolute part of m in L_gap (README cmd: 0)")
    margin_rel: float = Field(0.0, ge=0, description="m += margin_rel * C ln 2, the margin in "
                              "units of an undecided image's S (0 = EDGE's absolute m)")
    gap_start_epoch: int = Field(0, ge=0, description="L_gap is off before this epoch")


class _MultiLabel(Method):
    kind = "multilabel"

    def __init__(self, spec: ExperimentSpec) -> None:
        super().__init__(spec)
        self._means = EpochMeans()

    @classmethod
    def reported_metrics(cls, spec: ExperimentSpec) -> set[str]:
        extra = {f"train/{k}" for k in STATS} if cls.uses_oe else set()
        return super().reported_metrics(spec) | extra

    def id_loss(self, logits_id: Tensor, y: Tensor) -> Tensor:
        """L_id: BCE with logits on multi-hot targets, mean over samples x classes."""
        return F.binary_cross_entropy_with_logits(logits_id, y.float())

    def oe_term(self, logits_id: Tensor, logits_oe: Tensor, state: TrainState) -> Tensor:
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      oe_batch: tuple[Tensor, Tensor] | None, state: TrainState) -> Tensor:
        x, y = batch
        if y.ndim != 2:
            raise ValueError(f"method {self.name!r} needs multi-hot labels [N, C]; "
                             f"got shape {list(y.shape)} (use a multi-label dataset)")
        if not self.uses_oe:
            return self.id_loss(model(x)[0], y)
        if oe_batch is None:
            raise ValueError(f"method {self.name!r} needs OE data: set data.oe in the spec")
        logits_id, logits_oe = forward_id_and_oe(model, x, oe_batch[0])
        return self.id_loss(logits_id, y) + self.oe_term(logits_id, logits_oe, state)

    # ------------------------------------------------------------- the energy gap, per epoch
    def record(self, logits_id: Tensor, logits_oe: Tensor, k: int, margin: float,
               **losses: Tensor) -> None:
        """Accumulate this step's JointEnergy view: mean S of the ID batch, of its bottom-k
        ("tail") and of the OE batch, and the fraction of (OE, tail) pairs whose gap hinge
        relu(S_oe - S_tail + m) is active (for bce_oe / energy_oe_ml: m = 0, the fraction of
        pairs in the wrong order)."""
        with torch.no_grad():
            s_id, s_oe = joint_energy(logits_id), joint_energy(logits_oe)
            tail = tail_scores(s_id, k)
            active = (gap_hinge(s_id, s_oe, k, margin) > 0).float().mean()
            self._means.add(s_id=s_id.mean(), s_tail=tail.mean(), s_oe=s_oe.mean(),
                            gap_active=active, **losses)

    def epoch_metrics(self, model: nn.Module, state: TrainState) -> dict[str, float]:
        """This worker's epoch means of :meth:`record` as ``train/<stat>`` (rank 0's are
        logged), appended to ``state.extra`` for :meth:`epoch_figures`."""
        if not self.uses_oe or not self._means.steps:
            return {}
        means = self._means.pop(STATS)
        state.extra.setdefault(HISTORY, []).append({"epoch": state.epoch, **means})
        return {f"train/{k}": v for k, v in means.items()}

    def epoch_figures(self, model: nn.Module, state: TrainState) -> dict[str, Figure]:
        """``plots/energy_gap.png``: mean S(ID), S(tail), S(OE) and the active fraction of
        the gap hinge per epoch, redrawn after every epoch."""
        history = state.extra.get(HISTORY)
        if not history:
            return {}
        return {"plots/energy_gap.png": energy_gap_figure(history, f"{self.spec.name} "
                                                          f"({self.name})")}


def energy_gap_figure(history: list[dict[str, float]], title: str) -> Figure:
    """Per-epoch JointEnergy means (left axis) and the hinge's active fraction (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    epochs = [h["epoch"] + 1 for h in history]
    for key, label in (("s_id", "S(ID)"), ("s_tail", "S(tail ID)"), ("s_oe", "S(OE)")):
        ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean JointEnergy S")
    right = ax.twinx()
    right.plot(epochs, [h["gap_active"] for h in history], "k--", marker=".",
               label="active (OE, tail) pairs")
    right.set_ylim(0, 1)
    right.set_ylabel("active fraction")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="center right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


@METHODS.register
class BCE(_MultiLabel):
    """``bce``: BCE only; scored with JointEnergy this is the JointEnergy baseline."""

    name = "bce"
    Params = BCEParams


@METHODS.register
class BCEOE(_MultiLabel):
    """``bce_oe``: BCE + alpha * L_conf."""

    name, uses_oe = "bce_oe", True
    Params = BCEOEParams

    def oe_term(self, logits_id: Tensor, logits_oe: Tensor, state: TrainState) -> Tensor:
        l_conf = confidence_loss(logits_oe)
        self.record(logits_id, logits_oe, TAIL_K, 0.0, l_conf=l_conf)
        return self.params.alpha * l_conf


@METHODS.register
class EnergyOEML(_MultiLabel):
    """``energy_oe_ml``: BCE + weight * squared JointEnergy margins (m_in, m_out)."""

    name, uses_oe = "energy_oe_ml", True
    Params = EnergyOEMLParams

    def oe_term(self, logits_id: Tensor, logits_oe: Tensor, state: TrainState) -> Tensor:
        p = self.params
        self.record(logits_id, logits_oe, TAIL_K, 0.0)
        return p.weight * joint_energy_margin_loss(logits_id, logits_oe, p.m_in, p.m_out)


@METHODS.register
class Edge(_MultiLabel):
    """``edge`` (Sun et al., AAAI 2025): L = BCE + alpha L_conf + beta L_gap (``weg.py``),
    with beta = 0 before ``gap_start_epoch`` (the reference code's ``--start_epoch``) and the
    margin m = ``margin`` + ``margin_rel`` * C ln 2 (:func:`gap_margin`)."""

    name, uses_oe = "edge", True
    Params = EdgeParams

    def oe_term(self, logits_id: Tensor, logits_oe: Tensor, state: TrainState) -> Tensor:
        p = self.params
        s_id, s_oe = joint_energy(logits_id), joint_energy(logits_oe)
        m = gap_margin(logits_id.shape[1], p.margin, p.margin_rel)
        l_conf = confidence_loss(logits_oe)
        l_gap = gap_hinge(s_id, s_oe, p.k, m).mean()
        self.record(logits_id, logits_oe, p.k, m, l_conf=l_conf, l_gap=l_gap)
        loss = p.alpha * l_conf
        if state.epoch >= p.gap_start_epoch and p.beta > 0:
            loss = loss + p.beta * l_gap
        return loss
