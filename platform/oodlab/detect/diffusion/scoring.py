"""Lift-Map-Detect scoring of batches and of whole sets (Liu et al. 2023, "Unsupervised
Out-of-Distribution Detection with Diffusion Inpainting", ICML, Sec. 3).

A batch of B images and R attempts runs as ONE sampling pass over B·R images. Every batch
of a set gets its own seed (``seed + batch index``), so a set scores the same whether it is
scored in one process or spread over Ray workers.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from oodlab.console import progress, time_left
from oodlab.detect.diffusion.distances import Distance, check_distance, median, similarity
from oodlab.detect.diffusion.masks import alternating_masks
from oodlab.detect.diffusion.sampler import inpaint
from oodlab.detect.scores import PostHocScore, build_score
from oodlab.registry import SCORES

if TYPE_CHECKING:
    from torch.utils.data import DataLoader


@torch.no_grad()
def reconstruct(model: nn.Module, x: Tensor, *, masked: bool, steps: int, attempts: int,
                block_size: int, eta: float, noise_level: float, seed: int) -> Tensor:
    """Reconstructions [R, B, C, H, W] in [0, 1] (not clamped, as the reference) of [0, 1]
    images ``x``: LMD inpaints alternating checkerboards from t = T - 1; the baseline
    (``masked=False``) noises every pixel to t = noise_level·(T - 1) and denoises."""
    model.eval()
    n_t = int(model.alphas_cumprod.shape[0])
    b = len(x)
    x0 = (x * 2 - 1).repeat(attempts, 1, 1, 1)  # attempt-major: [R·B, C, H, W]
    if masked:
        if block_size >= x.shape[-1]:
            raise ValueError(f"block_size {block_size} px >= image size {x.shape[-1]} px: "
                             "the checkerboard has one block, the mask lifts nothing")
        known = alternating_masks(x.shape[-1], block_size, attempts).to(x.device)
        known = known.repeat_interleave(b, 0)
        t_start = n_t - 1
    else:
        known, t_start = torch.zeros(1, device=x.device), round(noise_level * (n_t - 1))
    gen = torch.Generator(device=x.device).manual_seed(seed)
    out = inpaint(model, x0, known, t_start=t_start, steps=steps, eta=eta, generator=gen)
    return ((out + 1) / 2).reshape(attempts, b, *x.shape[1:])


def score_batch(model: nn.Module, x: Tensor, *, distance: Distance, seed: int,
                lpips_weights: dict[str, str] | None = None, **kw: Any) -> Tensor:
    """Median over attempts of the per-attempt similarity (higher = more ID)."""
    rec = reconstruct(model, x, seed=seed, **kw)
    sims = torch.stack([similarity(distance, x, r, lpips_weights) for r in rec], 1)  # [B, R]
    return median(sims)


def _progress(label: str, done: int, total: int, t0: float) -> None:
    progress(f"{label}: {done}/{total} batches "
             f"({time_left(time.perf_counter() - t0, done, total - done)})")


def _score_remote(model: nn.Module, name: str, config: dict[str, Any], x: Tensor,
                  batch: int) -> Tensor:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    score = build_score(name, **config)
    return score.score_batch(model.to(device), x.to(device), batch).cpu()


def score_set(score: Any, model: nn.Module, loader: DataLoader, device: torch.device | str,
              workers: int = 1, label: str = "") -> Tensor:
    """Scores of a whole loader. ``workers > 1`` with Ray initialised spreads the batches
    over that many Ray tasks at a time (one GPU each when the cluster has GPUs), printing
    progress as batches finish; otherwise batches run here, in order."""
    xs = [x for x, _ in loader]
    label, t0, total = label or score.name, time.perf_counter(), len(xs)
    every = max(1, total // 10)
    import ray

    if workers <= 1 or not ray.is_initialized():
        out = []
        for i, x in enumerate(xs):
            out.append(score.score_batch(model, x.to(device), i).cpu())
            if (i + 1) % every == 0 or i + 1 == total:
                _progress(label, i + 1, total, t0)
        return torch.cat(out)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_score_remote)
    model_ref = ray.put(model.cpu().eval())
    pending: dict[Any, int] = {}
    results: dict[int, Tensor] = {}
    nxt = 0
    while nxt < total or pending:
        while nxt < total and len(pending) < workers:
            pending[task.remote(model_ref, score.name, score.config(), xs[nxt], nxt)] = nxt
            nxt += 1
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            results[pending.pop(ref)] = ray.get(ref)
        if len(results) % every == 0 or len(results) == total:
            _progress(label, len(results), total, t0)
    model.to(device)
    return torch.cat([results[i] for i in range(total)])


class _DiffusionScore(PostHocScore):
    """Reconstruction scores of a diffusion model (``oodlab.detect.diffusion``): median over
    ``attempts`` of the similarity of image and reconstruction (higher = more ID).

    Liu et al. 2023; ``steps`` strided sampler steps (1000 with ``eta=1`` = the paper's
    DDPM sampler), ``workers > 1`` spreads a set's batches over Ray tasks.
    """

    needs_model = True
    masked: ClassVar[bool]

    def __init__(self, steps: int = 1000, attempts: int = 10, block_size: int = 4,
                 eta: float = 1.0, noise_level: float = 0.5, distance: str = "mse",
                 lpips_weights: dict[str, str] | None = None, seed: int = 0,
                 workers: int = 1) -> None:
        for key, value, low in (("steps", steps, 1), ("attempts", attempts, 1),
                                ("block_size", block_size, 1), ("workers", workers, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{self.name}.{key} must be an integer >= {low}, got {value!r}")
        if not 0 <= eta <= 1:
            raise ValueError(f"{self.name}.eta must be in [0, 1], got {eta!r}")
        if not 0 < noise_level <= 1:
            raise ValueError(f"{self.name}.noise_level must be in (0, 1], got {noise_level!r}")
        check_distance(distance, lpips_weights)
        self.steps, self.attempts, self.block_size = int(steps), int(attempts), int(block_size)
        self.eta, self.noise_level, self.distance = float(eta), float(noise_level), distance
        self.seed, self.workers = int(seed), int(workers)
        self.lpips_weights = dict(lpips_weights) if lpips_weights else None

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        raise TypeError(f"{self.name} scores images with the diffusion model, not logits")

    def score_batch(self, model: nn.Module, x: Tensor, batch: int = 0) -> Tensor:
        """Scores of one batch of [0, 1] images; its noise is seeded with ``seed + batch``."""
        return score_batch(model, x, masked=self.masked, steps=self.steps,
                           attempts=self.attempts, block_size=self.block_size, eta=self.eta,
                           noise_level=self.noise_level, distance=self.distance,
                           lpips_weights=self.lpips_weights, seed=self.seed + batch)

    def score_model(self, model: nn.Module, x: Tensor) -> Tensor:
        return self.score_batch(model, x)

    def score_loader(self, model: nn.Module, loader, device: torch.device | str) -> Tensor:
        """A whole set, in parallel over Ray when ``workers > 1`` (progress printed)."""
        return score_set(self, model, loader, device, self.workers)

    def network_calls(self, num_timesteps: int) -> int:
        """U-Net evaluations per image."""
        from oodlab.detect.diffusion.sampler import network_calls

        t_start = num_timesteps - 1 if self.masked else round(
            self.noise_level * (num_timesteps - 1))
        return self.attempts * network_calls(t_start, self.steps)

    def config(self) -> dict[str, Any]:
        return {"steps": self.steps, "attempts": self.attempts, "block_size": self.block_size,
                "eta": self.eta, "noise_level": self.noise_level, "distance": self.distance,
                "lpips_weights": self.lpips_weights, "seed": self.seed, "workers": self.workers}


@SCORES.register
class LMD(_DiffusionScore):
    """Lift, Map, Detect (Liu et al. 2023): inpaint alternating checkerboards of
    ``block_size`` px from pure noise, keep the rest by replacement (their Sec. 3)."""

    name, masked = "lmd", True


@SCORES.register
class DiffusionRecon(_DiffusionScore):
    """Baseline: noise the whole image to ``noise_level``·T and denoise it, no mask."""

    name, masked = "diffusion_recon", False
