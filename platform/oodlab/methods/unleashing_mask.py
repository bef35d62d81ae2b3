"""Unleashing Mask (Zhu et al., ICML 2023): ``um`` finetunes, ``umap`` learns a pruning mask.

Both start from a trained model (``init_from``) and minimise the flooded ID loss
``|CE - ℓ̂| + ℓ̂`` (flooding, Ishida et al. 2020; reference code tmlr-group/Unleashing-Mask,
``utils/custom_loss.py``), so the training loss hovers at the level ``ℓ̂`` of the randomly
masked trained model (``estimate_loss.py``) and the model forgets the atypical samples it
memorised late in training. Unlike the reference code the loss is always on when the method
is ``um``/``umap`` with ``flood: true`` (there, ``utils/net_utils.get_criterion`` silently
falls back to plain CE when a config sets ``criterion: CrossEntropyLoss``, as the shipped ones
do), and a missing starting model is an error (the reference ``pretrained()`` continues from
random weights). ``flood: false`` is the control: the identical finetune with plain CE.

The flood acts on the global mini-batch mean: under DDP the batch CE is all-reduced before
the sign ``sign(CE - ℓ̂)`` is taken, so every worker ascends or descends together, exactly as
one process with the whole batch would (the reference trains on one process).

``um_pretrain`` trains the starting model as the reference's CIFAR pipeline does
(``data/cifar.py``: random crop with zero padding and horizontal flip; dropout in
``model.dropout``), so that the late-epoch memorisation UM targets can happen; ``um`` and
``umap`` can use the same augmentation while they finetune (the reference finetunes on the
same augmented loader).

Either may add an OE term (``outlier: {name: oe|energy_oe, ...}``); the flood acts on the
ID term only (as in the reference ``main_OE.py``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from oodlab.methods.base import (
    EpochMeans,
    Loaders,
    Method,
    MethodParams,
    TrainState,
    forward_id_and_oe,
)
from oodlab.methods.ops.augment import step_generator
from oodlab.methods.ops.pruning import (
    add_popup_masks,
    bake_popup_masks,
    popup_masks,
    random_masked_copy,
)
from oodlab.methods.outlier_exposure import EnergyOEParams, OEParams, outlier_loss
from oodlab.registry import METHODS

LOSS_CONSTRAINT = "loss_constraint"


def flood_loss(loss: Tensor, loss_constraint: float, mean: Tensor | None = None) -> Tensor:
    """``|L_B - ℓ̂| + ℓ̂`` on the mini-batch mean ``L_B`` (not per sample), as in the reference
    ``utils/custom_loss.py``.

    Its gradient is ``sign(L_B - ℓ̂) * dL_B``: descent above the constraint, ascent below it.
    With ``mean`` (the detached mean of ``L_B`` over every worker) the sign is taken on that
    global mean instead: value ``|mean - ℓ̂| + ℓ̂``, gradient ``sign(mean - ℓ̂) * dL_B``, so the
    gradient DDP averages is the flood of the global batch.
    """
    if mean is None:
        return (loss - loss_constraint).abs() + loss_constraint
    mean = mean.detach()
    return (torch.sign(mean - loss_constraint) * (loss - loss.detach())
            + (mean - loss_constraint).abs() + loss_constraint)


def global_mean(value: Tensor) -> Tensor:
    """The detached mean of a scalar over every DDP worker (itself on one process)."""
    value = value.detach()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def pad_crop_flip(x: Tensor, padding: int, hflip: bool, g: torch.Generator) -> Tensor:
    """Per-image random crop of the zero-padded batch back to its size, then a horizontal
    flip with probability 0.5: torchvision's ``RandomCrop(size, padding)`` and
    ``RandomHorizontalFlip()`` (the reference ``data/cifar.py``), batched on ``x``'s device."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=g, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [N, H, 1]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [N, 1, W]
        idx = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)  # [N, C, H, W]
    if hflip:
        flip = torch.rand(n, generator=g, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


@torch.no_grad()
def estimate_loss_constraint(model: nn.Module, dataset: Dataset, *, keep: float, seed: int,
                             masks: int = 1, batch_size: int = 512,
                             device: torch.device | str = "cpu", rank: int = 0,
                             world_size: int = 1) -> float:
    """ℓ̂ = mean CE over ``dataset`` of ``model`` with ``1 - keep`` of each layer's weights
    zeroed at random (the reference ``estimate_loss.py`` / ``trainers/default.modifier``, but
    seeded and on the images as stored, with no augmentation; eval mode as there), averaged
    over ``masks`` random masks (seeds ``seed``, ``seed + 100003``, ...; the reference draws
    one unseeded mask).

    With several workers each scores every ``world_size``-th image and the sums are
    all-reduced, so the result is the exact mean over the whole set on every worker.
    """
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(masks):
        masked = random_masked_copy(model, keep, seed + 100_003 * i).to(device).eval()
        for x, y in DataLoader(shard, batch_size=batch_size, shuffle=False):
            x, y = x.to(device), y.to(device)
            totals[0] += F.cross_entropy(masked(x)[0], y, reduction="sum").double()
            totals[1] += len(y)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    if totals[1] == 0:
        raise ValueError("cannot estimate the loss constraint on an empty training set")
    return float(totals[0] / totals[1])


Outlier = Annotated[OEParams | EnergyOEParams, Field(discriminator="name")]


class AugmentKnobs(MethodParams):
    """The reference's training augmentation (``RandomCrop(padding)``, ``RandomHorizontalFlip``)."""

    crop_padding: int = Field(0, ge=0, le=8, description="random crop of the zero-padded "
                              "image (pixels each side; 0 = off; reference CIFAR: 4 of 32)")
    hflip: bool = Field(False, description="random horizontal flip, p 0.5 (off for digits)")


class AugmentedCE:
    """Shared by the methods below: the seeded augmentation of the ID batch."""

    spec: object
    params: AugmentKnobs

    def augment(self, x: Tensor, state: TrainState) -> Tensor:
        p = self.params
        if p.crop_padding == 0 and not p.hflip:
            return x
        g = step_generator(x.device, self.spec.seed, state.rank, state.step)
        return pad_crop_flip(x, p.crop_padding, p.hflip, g)


class UMPretrainParams(AugmentKnobs):
    name: Literal["um_pretrain"] = "um_pretrain"


@METHODS.register
class UnleashingMaskPretrain(AugmentedCE, Method):
    """``um_pretrain``: plain CE on the augmented ID batch, the model UM starts from."""

    name = "um_pretrain"
    Params = UMPretrainParams

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      oe_batch: tuple[Tensor, Tensor] | None, state: TrainState) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(self.augment(x, state))[0], y)


class UnleashParams(AugmentKnobs):
    """Knobs shared by ``um`` and ``umap``."""

    loss_constraint: float | None = Field(
        None, gt=0, description="ℓ̂; null = estimate at fit start from the masked trained model")
    keep: float = Field(0.965, gt=0, le=1, description="fraction of each layer's weights kept "
                        "when estimating ℓ̂ (0.965 = 3.5% zeroed, the reference value)")
    masks: int = Field(1, ge=1, le=100, description="random masks ℓ̂ is averaged over "
                       "(1 = the reference code)")
    flood: bool = Field(True, description="false = plain CE with everything else identical "
                        "(the control that isolates the flood; ℓ̂ is still estimated and the "
                        "ascent fraction counts the steps that would have ascended)")
    outlier: Outlier | None = Field(
        None, description="optional OE term on auxiliary outliers: {name: oe|energy_oe, ...}")


class UMParams(UnleashParams):
    name: Literal["um"] = "um"


class UMAPParams(UnleashParams):
    name: Literal["umap"] = "umap"
    keep_ratio: float = Field(0.8, gt=0, le=1, description="fraction of each layer's weights "
                              "the learned mask keeps (0.8 = prune 20%, the reference value)")


@METHODS.register
class UnleashingMask(AugmentedCE, Method):
    """``um``: finetune all weights with the flooded loss."""

    name = "um"
    Params = UMParams
    needs_init_from = True

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.uses_oe = self.needs_oe(self.params)
        self._means = EpochMeans()

    @classmethod
    def needs_oe(cls, params: UnleashParams) -> bool:
        """UM + OE: with an ``outlier`` term the finetune trains on OE data too."""
        return params.outlier is not None

    @classmethod
    def reported_metrics(cls, spec) -> set[str]:
        return super().reported_metrics(spec) | {f"{cls.name}/{k}" for k in (
            "loss_constraint", "ascent_fraction", "train_ce")}

    def on_fit_start(self, model: nn.Module, loaders: Loaders, state: TrainState) -> None:
        """Fix ℓ̂ once per run (given, or estimated); a restart reuses the stored value."""
        if LOSS_CONSTRAINT in state.extra:
            return
        ell = self.params.loss_constraint
        if ell is None:
            ell = estimate_loss_constraint(
                model, loaders.id_train.dataset, keep=self.params.keep, seed=self.spec.seed,
                masks=self.params.masks, batch_size=self.spec.data.eval_batch_size,
                device=state.device, rank=state.rank, world_size=state.world_size)
        state.extra[LOSS_CONSTRAINT] = float(ell)

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      oe_batch: tuple[Tensor, Tensor] | None, state: TrainState) -> Tensor:
        x, y = batch
        ell = state.extra[LOSS_CONSTRAINT]
        logits_id, logits_oe = forward_id_and_oe(model, self.augment(x, state),
                                                 None if oe_batch is None else oe_batch[0])
        ce = F.cross_entropy(logits_id, y)
        mean = global_mean(ce)  # every worker floods the same global batch mean
        self._means.add(ascent_fraction=float(mean < ell), train_ce=mean)
        loss = flood_loss(ce, ell, mean) if self.params.flood else ce
        if self.params.outlier is not None:
            if logits_oe is None:
                raise ValueError(f"method {self.name!r} with an outlier term needs OE data: "
                                 "set data.oe in the spec")
            loss = loss + outlier_loss(self.params.outlier, logits_id, logits_oe)
        return loss

    def epoch_metrics(self, model: nn.Module, state: TrainState) -> dict[str, float]:
        """ℓ̂, the mean training CE the flood saw (global batch means, augmented, train mode)
        and the fraction of this epoch's steps that were gradient ascent (CE < ℓ̂; with
        ``flood: false`` the steps that would have been)."""
        means = self._means.pop(("ascent_fraction", "train_ce"))
        return {f"{self.name}/loss_constraint": state.extra[LOSS_CONSTRAINT],
                **{f"{self.name}/{k}": v for k, v in means.items()}}


@METHODS.register
class UnleashingMaskPruning(UnleashingMask):
    """``umap``: weights frozen; per-weight popup scores learn which ``keep_ratio`` to keep."""

    name = "umap"
    Params = UMAPParams
    _last_masks: dict[str, Tensor] | None = None

    @classmethod
    def reported_metrics(cls, spec) -> set[str]:
        return super().reported_metrics(spec) | {"umap/mask_changed_fraction"}

    def wrap(self, model: nn.Module) -> nn.Module:
        return add_popup_masks(model, self.params.keep_ratio, self.spec.seed)

    def export(self, model: nn.Module) -> nn.Module:
        return bake_popup_masks(model)

    def epoch_metrics(self, model: nn.Module, state: TrainState) -> dict[str, float]:
        """Adds the fraction of weights whose keep/prune decision changed this epoch."""
        masks = popup_masks(model)
        before, self._last_masks = self._last_masks, masks
        changed = 0.0
        if before is not None:
            changed = sum(int((masks[k] != before[k]).sum()) for k in masks) / sum(
                m.numel() for m in masks.values())
        return super().epoch_metrics(model, state) | {"umap/mask_changed_fraction": changed}
