"""Multi-label OOD methods: ``bce``, ``bce_oe``, ``energy_oe_ml`` and ``edge``.

All are scored with JointEnergy S(x) = sum_c softplus(f_c(x)) (Wang et al. 2021; higher =
more ID). EDGE: Sun et al., "Unknown-aware Multi-label Learning by Energy Distribution Gap
Expansion", AAAI 2025 (arXiv 2412.07499); reference code Yuchen-Sunflower/EDGE ``weg.py``
(``--score joint``). With OE, ID and OE go through one forward pass, as in ``weg.py``, so
BatchNorm sees them together.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from oodlab.detect.scores import joint_energy
from oodlab.methods.base import Method, MethodParams, TrainState, forward_id_and_oe
from oodlab.methods.outlier_exposure import EnergyMarginParams, energy_hinge
from oodlab.registry import METHODS


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


def gap_loss(logits_id: Tensor, logits_oe: Tensor, k: int, margin: float) -> Tensor:
    """L_gap = 1/(n_oe k) sum_i sum_j relu(S(x_oe_i) - S(tail_j) + m), as in EDGE's ``weg.py``.

    A pairwise hinge between every OE sample and every bottom-k ID sample; nothing is
    detached, so gradients lower S(OE) and raise S(tail ID).
    """
    tail = tail_scores(joint_energy(logits_id), k)
    s_oe = joint_energy(logits_oe)
    return F.relu(s_oe[:, None] - tail[None, :] + margin).mean()


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
    margin: float = Field(0.0, description="m in L_gap (README cmd: 0; argparse default: 1)")
    gap_start_epoch: int = Field(0, ge=0, description="L_gap is off before this epoch")


class _MultiLabel(Method):
    kind = "multilabel"

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
        return self.params.alpha * confidence_loss(logits_oe)


@METHODS.register
class EnergyOEML(_MultiLabel):
    """``energy_oe_ml``: BCE + weight * squared JointEnergy margins (m_in, m_out)."""

    name, uses_oe = "energy_oe_ml", True
    Params = EnergyOEMLParams

    def oe_term(self, logits_id: Tensor, logits_oe: Tensor, state: TrainState) -> Tensor:
        p = self.params
        return p.weight * joint_energy_margin_loss(logits_id, logits_oe, p.m_in, p.m_out)


@METHODS.register
class Edge(_MultiLabel):
    """``edge`` (Sun et al., AAAI 2025): L = BCE + alpha L_conf + beta L_gap (``weg.py``),
    with beta = 0 before ``gap_start_epoch`` (the reference code's ``--start_epoch``)."""

    name, uses_oe = "edge", True
    Params = EdgeParams

    def oe_term(self, logits_id: Tensor, logits_oe: Tensor, state: TrainState) -> Tensor:
        p = self.params
        loss = p.alpha * confidence_loss(logits_oe)
        if state.epoch >= p.gap_start_epoch and p.beta > 0:
            loss = loss + p.beta * gap_loss(logits_id, logits_oe, p.k, p.margin)
        return loss
