"""The strided replacement inpainter (LMD's "Map" step, Liu et al., ICML 2023; reference code
zhenzhel/lift_map_detect, ``controllable_generation.get_pc_inpainter``) and its unmasked
variant.

One reverse step from t to t' < t (DDIM, Song et al. 2021, Eq. 12, with η):

    x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t),  clipped to [-1, 1]
    σ   = η · sqrt((1 - ᾱ_t') / (1 - ᾱ_t)) · sqrt(1 - ᾱ_t / ᾱ_t')
    x_t' = sqrt(ᾱ_t') x̂_0 + sqrt(1 - ᾱ_t' - σ²) ε + σ z

With η = 1 and all T steps this is DDPM's ancestral sampler (the discrete counterpart of the
reference's reverse-SDE Euler-Maruyama; 1000 steps = the paper's setting); fewer steps
stride over the schedule. After every step the known pixels are replaced by a fresh sample
of q(x_t' | x_0) (as ``get_pc_inpainter`` does after each reverse step); the last step goes
to t' = -1, ᾱ = 1, so the known pixels end as the original exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from oodlab.detect.diffusion.schedule import abar_at, q_sample

StepHook = Callable[[int, Tensor, Tensor], None]


def timesteps(t_start: int, steps: int) -> list[int]:
    """``steps`` (at most t_start + 1) evenly strided timesteps from ``t_start`` down to 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = np.unique(np.round(np.linspace(0, t_start, min(steps, t_start + 1))).astype(int))
    return [int(t) for t in ts[::-1]]


def network_calls(t_start: int, steps: int) -> int:
    """U-Net evaluations of one sampling pass (one per step)."""
    return len(timesteps(t_start, steps))


@torch.no_grad()
def inpaint(model: nn.Module, x0: Tensor, known: Tensor, *, t_start: int, steps: int,
            eta: float = 1.0, generator: torch.Generator | None = None,
            on_step: StepHook | None = None) -> Tensor:
    """Replacement inpainting of ``x0`` ([-1, 1], [N, C, H, W]) where ``known`` is 0.

    ``known`` broadcasts to ``x0`` (1 = keep). Starts from x_{t_start} ~ q(· | x0) in every
    pixel (≈ pure noise when t_start = T - 1). ``on_step(t', x, noise)`` sees x after the
    replacement, with the noise used to re-noise the known pixels (for tests).
    """
    abar = model.alphas_cumprod

    def randn() -> Tensor:
        return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)

    ts = timesteps(t_start, steps)
    x = q_sample(x0, ts[0], randn(), abar)
    known = known.to(x0)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ab, ab_prev = abar_at(abar, t).to(x0), abar_at(abar, t_prev).to(x0)
        eps = model(x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
        x0_hat = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
        sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        x = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if t_prev >= 0 and sigma > 0:
            x = x + sigma * randn()
        noise = randn()
        x = known * q_sample(x0, t_prev, noise, abar) + (1 - known) * x
        if on_step is not None:
            on_step(t_prev, x, noise)
    return x
