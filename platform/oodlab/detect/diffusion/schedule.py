"""DDPM noise schedules (linear: Ho et al. 2020; cosine: Nichol & Dhariwal 2021) and q(x_t|x_0)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Schedule = Literal["linear", "cosine"]


def betas(kind: Schedule, timesteps: int, beta_start: float = 1e-4,
          beta_end: float = 0.02) -> Tensor:
    """β_1..β_T (float64). Linear: evenly spaced from ``beta_start`` to ``beta_end``.
    Cosine: β_t = 1 - ᾱ_t/ᾱ_{t-1} with ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008,
    clipped at 0.999."""
    if timesteps < 1:
        raise ValueError(f"method.timesteps must be >= 1, got {timesteps}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"method.schedule must be 'linear' or 'cosine', got {kind!r}")


def alphas_cumprod(kind: Schedule, timesteps: int, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> Tensor:
    """ᾱ_t = Π_{s<=t} (1 - β_s), t = 0..T-1 (0-based)."""
    return torch.cumprod(1 - betas(kind, timesteps, beta_start, beta_end), 0)


def abar_at(alphas_cum: Tensor, t: Tensor | int) -> Tensor:
    """ᾱ_t per sample, with ᾱ_{-1} = 1 (the clean image) for t = -1."""
    t = torch.as_tensor(t, device=alphas_cum.device).long()
    one = torch.ones((), dtype=alphas_cum.dtype, device=alphas_cum.device)
    return torch.where(t >= 0, alphas_cum[t.clamp(min=0)], one)


def q_sample(x0: Tensor, t: Tensor | int, noise: Tensor, alphas_cum: Tensor) -> Tensor:
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (Ho et al. Eq. 4); t may be per sample."""
    ab = abar_at(alphas_cum, t).to(x0.dtype)
    if ab.ndim:
        ab = ab.view(-1, *([1] * (x0.ndim - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
