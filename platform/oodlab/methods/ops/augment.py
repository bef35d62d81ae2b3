"""Batched, seeded image augmentations on tensors, for contrastive methods (SimCLR, CCL).

They run inside a method's ``training_step`` on the training device, on whole batches of
[0, 1] images ``[N, C, H, W]``, so the data pipeline stays unchanged. The recipe follows
SimCLR (Chen et al., ICML 2020) and SSD (Sehwag et al., ICLR 2021; inspire-group/SSD
``data.py``): random resized crop, optional horizontal flip, colour jitter
(brightness, contrast and, for RGB, saturation; applied with probability ``jitter_p``) and,
for RGB, random grayscale. Hue jitter is not implemented and the jitter order is fixed
(brightness, contrast, saturation); torchvision randomises the order.

On one-channel images saturation, hue and grayscale are no-ops, so SSD's recipe reduces to:
crop area 0.2-1 (the default here; CSI uses 0.08-1), horizontal flip p 0.5 (``hflip_p``; off
by default, as digits are not mirror-symmetric) and brightness/contrast jitter 0.4 with p 0.8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from oodlab.spec.base import StrictModel

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale
_LUMA = (0.299, 0.587, 0.114)


class AugmentParams(StrictModel):
    """The two-view augmentation of a contrastive method (SSD's CIFAR recipe, flip off)."""

    crop_min_scale: float = Field(0.2, gt=0, le=1, description="smallest crop area as a "
                                  "fraction of the image (SSD: 0.2, CSI: 0.08)")
    crop_max_scale: float = Field(1.0, gt=0, le=1, description="largest crop area fraction")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="range of crop "
                                            "aspect ratios (w/h)")
    hflip_p: float = Field(0.0, ge=0, le=1, description="horizontal flip probability (0 for "
                           "digits, which are not mirror-symmetric; 0.5 for natural images)")
    jitter_p: float = Field(0.8, ge=0, le=1, description="probability of colour jitter")
    brightness: float = Field(0.4, ge=0, lt=1, description="brightness factor ~ U[1-b, 1+b]")
    contrast: float = Field(0.4, ge=0, lt=1, description="contrast factor ~ U[1-c, 1+c]")
    saturation: float = Field(0.4, ge=0, lt=1, description="saturation factor ~ U[1-s, 1+s] "
                              "(RGB only)")
    grayscale_p: float = Field(0.2, ge=0, le=1, description="probability of converting to "
                               "grayscale (RGB only)")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentParams:
        if self.crop_min_scale > self.crop_max_scale:
            raise ValueError(f"crop_min_scale ({self.crop_min_scale}) must be <= "
                             f"crop_max_scale ({self.crop_max_scale})")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError(f"crop_ratio must be (low, high) with 0 < low <= high, got "
                             f"{self.crop_ratio}")
        return self


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _gray(x: Tensor) -> Tensor:
    """Luma of RGB images (the image itself if it has one channel), shape [N, 1, H, W]."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def resized_crop(x: Tensor, p: AugmentParams, g: torch.Generator) -> Tensor:
    """Random resized crop (+ optional flip) of every image, resampled to its own size."""
    n, dev = len(x), x.device
    area = _uniform(n, p.crop_min_scale, p.crop_max_scale, g, dev)
    log_r = _uniform(n, math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1]), g, dev)
    ratio = log_r.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the side
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=g, device=dev) - 1)  # centre in [-1, 1]
    cy = (1 - h) * (2 * torch.rand(n, generator=g, device=dev) - 1)
    flip = torch.where(torch.rand(n, generator=g, device=dev) < p.hflip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def color_jitter(x: Tensor, p: AugmentParams, g: torch.Generator) -> Tensor:
    """Brightness, contrast and (RGB) saturation jitter, each image with prob. ``jitter_p``."""
    n, dev = len(x), x.device
    on = (torch.rand(n, generator=g, device=dev) < p.jitter_p).to(x.dtype).view(n, 1, 1, 1)

    def factor(strength: float) -> Tensor:
        f = _uniform(n, 1 - strength, 1 + strength, g, dev).view(n, 1, 1, 1)
        return on * f + (1 - on)  # factor 1 = unchanged

    out = (x * factor(p.brightness)).clamp(0, 1)
    mean = _gray(out).mean((1, 2, 3), keepdim=True)
    out = ((out - mean) * factor(p.contrast) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(out)
        out = ((out - gray) * factor(p.saturation) + gray).clamp(0, 1)
    return out


def random_grayscale(x: Tensor, p: AugmentParams, g: torch.Generator) -> Tensor:
    """Replace RGB images by their luma with probability ``grayscale_p`` (no-op for 1 channel)."""
    if x.shape[1] == 1 or p.grayscale_p == 0:
        return x
    on = torch.rand(len(x), generator=g, device=x.device) < p.grayscale_p
    return torch.where(on.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


def augment(x: Tensor, p: AugmentParams, g: torch.Generator) -> Tensor:
    """One augmented view of a batch of [0, 1] images; all randomness comes from ``g``."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"augment expects [N, 1|3, H, W] images, got {list(x.shape)}")
    return random_grayscale(color_jitter(resized_crop(x, p, g), p, g), p, g)


def step_generator(device: torch.device | str, seed: int, rank: int, step: int
                   ) -> torch.Generator:
    """A generator on ``device`` seeded by (seed, rank, step): a resumed run redraws the same
    views, and every worker draws different ones."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1))
    return g
