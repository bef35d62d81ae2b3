"""Outlier exposure for multi-class classifiers: ``oe`` and ``energy_oe``.

Both add a term on auxiliary outliers (OE samples) to the ID cross-entropy, with one forward
pass over ID and OE together (:func:`forward_id_and_oe`). Each epoch logs what the OE term does
(``train/<stat>``, :data:`OE_STATS`): the ID CE and the weighted OE term, the mean free energy
and max softmax of the ID and OE halves, and for ``energy_oe`` the fractions of ID and OE
samples on the wrong side of their margins (the squared hinges' active fractions; a term
whose hinges are never active trains nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from oodlab.methods.base import EpochMeans, Method, MethodParams, TrainState, forward_id_and_oe
from oodlab.registry import METHODS

if TYPE_CHECKING:
    from oodlab.spec import ExperimentSpec

OE_STATS = ("ce_id", "oe_term", "e_id", "e_oe", "msp_id", "msp_oe")
HINGE_STATS = ("in_active", "out_active")  # energy_oe only


def uniform_ce(logits_oe: Tensor) -> Tensor:
    """Cross-entropy from the softmax to the uniform distribution, mean over OE samples.

    Hendrycks et al. 2019, Eq. 1 with the OE term ``E[-(mean_c f_c - logsumexp f)]``
    (energy_ood/CIFAR/train.py, "OE" branch).
    """
    return -(logits_oe.mean(1) - torch.logsumexp(logits_oe, 1)).mean()


def free_energy(logits: Tensor) -> Tensor:
    """E(x) = -logsumexp_c f_c(x) (T = 1): ID samples have LOW free energy."""
    return -torch.logsumexp(logits, 1)


def energy_hinge(e_in: Tensor, e_out: Tensor, m_in: float, m_out: float) -> Tensor:
    """Squared energy hinge, Liu et al. 2020, Eq. 5.

    ``E_in[relu(E(x_in) - m_in)^2] + E_out[relu(m_out - E(x_out))^2]``: ID energies are pushed
    below ``m_in`` and OE energies above ``m_out`` (so m_in < m_out, both usually negative).
    """
    return F.relu(e_in - m_in).pow(2).mean() + F.relu(m_out - e_out).pow(2).mean()


def energy_margin_loss(logits_id: Tensor, logits_oe: Tensor, m_in: float, m_out: float) -> Tensor:
    """:func:`energy_hinge` on the multi-class free energy E = -logsumexp f."""
    return energy_hinge(free_energy(logits_id), free_energy(logits_oe), m_in, m_out)


class OEParams(MethodParams):
    name: Literal["oe"] = "oe"
    weight: float = Field(0.5, ge=0, description="lambda of the OE term (Hendrycks et al.: 0.5)")


class EnergyMarginParams(MethodParams):
    """Margins of :func:`energy_hinge`; shared by ``energy_oe`` and ``energy_oe_ml``."""

    m_in: float = Field(-25.0, description="ID free-energy margin (E_in pushed below it)")
    m_out: float = Field(-7.0, description="OE free-energy margin (E_out pushed above it)")
    weight: float = Field(0.1, ge=0, description="weight of the energy term (Liu et al.: 0.1)")

    @model_validator(mode="after")
    def _margins_ordered(self) -> EnergyMarginParams:
        if self.m_in >= self.m_out:
            raise ValueError(f"m_in ({self.m_in}) must be below m_out ({self.m_out})")
        return self


class EnergyOEParams(EnergyMarginParams):
    name: Literal["energy_oe"] = "energy_oe"


OutlierParams = OEParams | EnergyOEParams


def outlier_loss(params: OutlierParams, logits_id: Tensor, logits_oe: Tensor) -> Tensor:
    """The weighted OE term of ``oe`` or ``energy_oe`` (also used by UM + OE)."""
    if params.name == "oe":
        return params.weight * uniform_ce(logits_oe)
    return params.weight * energy_margin_loss(logits_id, logits_oe, params.m_in, params.m_out)


class _OEMethod(Method):
    """Shared skeleton: CE on the ID half + weight * outlier term on the OE half."""

    uses_oe = True
    stats: tuple[str, ...] = OE_STATS

    def __init__(self, spec: ExperimentSpec) -> None:
        super().__init__(spec)
        self._means = EpochMeans()

    @classmethod
    def reported_metrics(cls, spec: ExperimentSpec) -> set[str]:
        return super().reported_metrics(spec) | {f"train/{k}" for k in cls.stats}

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      oe_batch: tuple[Tensor, Tensor] | None, state: TrainState) -> Tensor:
        x, y = batch
        if oe_batch is None:
            raise ValueError(f"method {self.name!r} needs OE data: set data.oe in the spec")
        logits_id, logits_oe = forward_id_and_oe(model, x, oe_batch[0])
        ce, term = F.cross_entropy(logits_id, y), outlier_loss(self.params, logits_id, logits_oe)
        with torch.no_grad():
            self._means.add(ce_id=ce, oe_term=term, **self.record(logits_id, logits_oe))
        return ce + term

    def record(self, logits_id: Tensor, logits_oe: Tensor) -> dict[str, Tensor]:
        """This step's diagnostics beside the two loss terms (see the module doc)."""
        return {"e_id": free_energy(logits_id).mean(), "e_oe": free_energy(logits_oe).mean(),
                "msp_id": logits_id.softmax(1).amax(1).mean(),
                "msp_oe": logits_oe.softmax(1).amax(1).mean()}

    def epoch_metrics(self, model: nn.Module, state: TrainState) -> dict[str, float]:
        """This worker's epoch means of the step diagnostics as ``train/<stat>``."""
        if not self._means.steps:
            return {}
        return {f"train/{k}": v for k, v in self._means.pop(self.stats).items()}


@METHODS.register
class OutlierExposure(_OEMethod):
    """``oe``: L = CE(ID) + 0.5 * CE(OE -> uniform)."""

    name = "oe"
    Params = OEParams


@METHODS.register
class EnergyOE(_OEMethod):
    """``energy_oe``: L = CE(ID) + 0.1 * energy margin loss (m_in, m_out)."""

    name = "energy_oe"
    Params = EnergyOEParams
    stats = OE_STATS + HINGE_STATS

    def record(self, logits_id: Tensor, logits_oe: Tensor) -> dict[str, Tensor]:
        """Adds the active fractions of the two hinges: E_in > m_in and E_out < m_out."""
        p = self.params
        return {**super().record(logits_id, logits_oe),
                "in_active": (free_energy(logits_id) > p.m_in).float().mean(),
                "out_active": (free_energy(logits_oe) < p.m_out).float().mean()}
