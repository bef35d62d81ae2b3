"""Lift-Map-Detect scoring of batches and of whole sets (brief A.1; issue item 5).

A batch of B images and R attempts runs as ONE sampling pass over B·R images. Every batch
of a set gets its own seed (``seed + batch index``), so a set scores the same whether it is
scored in one process or spread over Ray workers.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from oodlab.diffusion.distances import Distance, median, similarity
from oodlab.diffusion.masks import alternating_masks
from oodlab.diffusion.sampler import inpaint

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
    sys.stdout.write(f"[oodlab] {label}: {done}/{total} batches "
                     f"({time.perf_counter() - t0:.0f} s)\n")
    sys.stdout.flush()


def _score_remote(model: nn.Module, name: str, config: dict[str, Any], x: Tensor,
                  batch: int) -> Tensor:
    from oodlab.scores import build_score

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
