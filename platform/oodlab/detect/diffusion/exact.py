"""The exact (Bayes-optimal) ε-predictor of a finite training set: the function a DDPM trained
to convergence on that set approximates, so LMD (Liu et al., ICML 2023) run with it shows
what the sampler, masks and distance can reach when the model is not the bottleneck.

If the data distribution is the empirical one, p(x_0) = (1/N) Σ_i δ(x_0 - y_i), then under
q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) (Ho et al. 2020, Eq. 4) the posterior over the
training images is a softmax,

    w_i(x_t) ∝ exp(-‖x_t - sqrt(ᾱ_t) y_i‖² / (2 (1 - ᾱ_t))),

and the minimiser of the L_simple objective (Ho et al. 2020, Eq. 14) is

    x̂_0 = Σ_i w_i y_i,   ε̂ = (x_t - sqrt(ᾱ_t) x̂_0) / sqrt(1 - ᾱ_t)

(Tweedie's formula; cf. Karras et al. 2022, Eq. 57 for the same ideal denoiser in σ form).
The sum runs over the training set in chunks with a streaming log-sum-exp, so memory is
O(batch · (chunk + pixels)) whatever N is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from oodlab.detect.diffusion.schedule import abar_at


class ExactDenoiser(nn.Module):
    """``model(x_t, t)`` -> ε̂ of the empirical distribution of ``images`` ([-1, 1],
    [N, C, H, W]); drop-in for the U-Net in :func:`~oodlab.detect.diffusion.sampler.inpaint`
    (same call, same ``alphas_cumprod`` buffer). Computed in float64."""

    def __init__(self, images: Tensor, alphas_cumprod: Tensor, chunk: int = 1024) -> None:
        super().__init__()
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got "
                             f"{list(images.shape)}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        flat = images.detach().flatten(1).double()
        self.register_buffer("train_images", flat)
        self.register_buffer("train_sq_norms", (flat ** 2).sum(1))
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone())
        self.chunk = int(chunk)

    @classmethod
    def from_unit_images(cls, images01: Tensor, alphas_cumprod: Tensor,
                         chunk: int = 1024) -> ExactDenoiser:
        """From [0, 1] images (the datasets' range), mapped to [-1, 1] as in training."""
        return cls(images01 * 2 - 1, alphas_cumprod, chunk)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def posterior_mean(self, x: Tensor, t: Tensor) -> Tensor:
        """E[x_0 | x_t] = Σ_i w_i y_i, [B, C, H, W] (float64)."""
        xf = x.flatten(1).double()
        ab = abar_at(self.alphas_cumprod.double(), t.to(x.device)).view(-1, 1)
        scale, var2 = ab.sqrt(), 2 * (1 - ab)
        x_sq = (xf ** 2).sum(1, keepdim=True)
        run_max = torch.full_like(x_sq, -torch.inf)
        run_sum = torch.zeros_like(x_sq)
        acc = torch.zeros_like(xf)
        for lo in range(0, len(self.train_images), self.chunk):
            y = self.train_images[lo:lo + self.chunk]
            y_sq = self.train_sq_norms[lo:lo + self.chunk]
            # ‖x - s y‖² expanded: [B, n] without a [B, n, D] tensor; clamped at 0 (rounding)
            d2 = (x_sq - 2 * scale * (xf @ y.T) + ab * y_sq[None]).clamp(min=0)
            logits = -d2 / var2
            new_max = torch.maximum(run_max, logits.max(1, keepdim=True).values)
            keep = torch.exp(run_max - new_max)
            w = torch.exp(logits - new_max)
            run_sum = run_sum * keep + w.sum(1, keepdim=True)
            acc = acc * keep + w @ y
            run_max = new_max
        return (acc / run_sum).view(x.shape)

    @torch.no_grad()
    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        ab = abar_at(self.alphas_cumprod.double(), t.to(x.device)).view(-1, 1, 1, 1)
        x0 = self.posterior_mean(x, t)
        return ((x.double() - ab.sqrt() * x0) / (1 - ab).sqrt()).to(x.dtype)
