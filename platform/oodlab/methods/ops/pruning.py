"""Layer-wise weight masks for Unleashing Mask: random masks (to estimate the loss constraint)
and learned "popup" masks (UMAP, the edge-popup algorithm of Ramanujan et al. 2020).

Both act on the ``weight`` of every ``Conv2d`` and ``Linear`` layer, the first conv and the
classifier included; biases and BatchNorm are never masked, as in the reference code
(tmlr-group/Unleashing-Mask, ``utils/builder.py``, ``utils/conv_type.py``). A keep fraction
``keep`` means ``int((1 - keep) * numel)`` weights of each layer are zeroed (``prune_rate`` in
the reference code's ``GetSubnet`` is likewise the fraction *kept*: 0.965 zeroes 3.5%).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

MASKED_TYPES = (nn.Conv2d, nn.Linear)


def maskable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs whose weights get masked, in a fixed order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MASKED_TYPES)]


def num_pruned(numel: int, keep: float) -> int:
    """How many of ``numel`` weights a layer with keep fraction ``keep`` zeroes."""
    return int((1.0 - keep) * numel)


def top_mask(scores: Tensor, keep: float) -> Tensor:
    """1 on all but the ``num_pruned`` lowest entries of ``scores`` (ties broken by index)."""
    flat = scores.flatten()
    mask = torch.ones_like(flat)
    k = num_pruned(flat.numel(), keep)
    if k > 0:
        mask[flat.argsort()[:k]] = 0.0
    return mask.view_as(scores)


def random_masked_copy(model: nn.Module, keep: float, seed: int) -> nn.Module:
    """A copy of ``model`` with a random ``1 - keep`` fraction of each layer's weights zeroed.

    The mask comes from a generator seeded with ``seed``, so it is the same on every worker
    and every run (the reference code's mask comes from unseeded random scores).
    """
    gen = torch.Generator().manual_seed(seed)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in maskable_layers(masked):
            w = layer.weight
            scores = torch.rand(w.shape, generator=gen)
            w.mul_(top_mask(scores, keep).to(w.device, w.dtype))
    return masked


class PopupMask(nn.Module):
    """Parametrization ``W -> W * h(S)`` with a learnable score tensor ``S`` per weight.

    ``h(S)`` keeps the ``keep`` fraction of ``|S|`` with the largest values in the layer. The
    backward pass is straight-through: dL/d|S| = dL/dh = (dL/dW_eff) * W.
    """

    def __init__(self, shape: torch.Size, keep: float, generator: torch.Generator) -> None:
        super().__init__()
        self.keep = keep
        scores = torch.empty(shape)
        # kaiming_uniform_(a=sqrt(5)) as in the reference SubnetConv, from our own generator
        fan_in = math.prod(shape[1:])
        bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))
        scores.uniform_(-bound, bound, generator=generator)
        self.scores = nn.Parameter(scores)

    def mask(self) -> Tensor:
        a = self.scores.abs()
        hard = top_mask(a.detach(), self.keep)
        return hard + (a - a.detach())  # value: exactly the hard mask; grad: straight-through

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask()


def add_popup_masks(model: nn.Module, keep: float, seed: int) -> nn.Module:
    """Freeze every parameter of ``model`` and mask each maskable layer with a :class:`PopupMask`.

    Only the scores are trainable afterwards; BatchNorm running statistics still update in
    train mode (re-estimated under the mask, as in the reference code's UMAP training).
    """
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in maskable_layers(model):
        parametrize.register_parametrization(
            layer, "weight", PopupMask(layer.weight.shape, keep, gen))
    return model


def popup_masks(model: nn.Module) -> dict[str, Tensor]:
    """The current hard mask of every popup-masked layer, by layer name."""
    out = {}
    for name, layer in model.named_modules():
        if parametrize.is_parametrized(layer, "weight"):
            out[name] = top_mask(layer.parametrizations.weight[0].scores.detach().abs(),
                                 layer.parametrizations.weight[0].keep)
    return out


def bake_popup_masks(model: nn.Module) -> nn.Module:
    """Replace each popup mask by its effect: a plain layer whose weight is ``W * h(S)``.

    The result has the backbone's own state-dict keys, so it is served like any model.
    """
    for _, layer in list(model.named_modules()):
        if parametrize.is_parametrized(layer, "weight"):
            with torch.no_grad():
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
