"""LMD's "Detect" step (Liu et al., ICML 2023; reference code zhenzhel/lift_map_detect,
``detect.py``): per-image distances between original and reconstruction, in [0, 1]
pixel space, and the median over attempts."""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Distance = Literal["mse", "ssim", "lpips"]


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean over C×H×W of the squared difference, per image."""
    return ((a - b) ** 2).flatten(1).mean(1)


def ssim(a: Tensor, b: Tensor, win_size: int = 7, data_range: float = 1.0) -> Tensor:
    """Mean SSIM per image, as ``skimage.metrics.structural_similarity`` with its defaults
    (uniform ``win_size`` window, K1 = 0.01, K2 = 0.03, sample covariance, border of
    (win_size - 1) / 2 px cropped, mean over channels) — the SSIM of LMD's reference code
    (zhenzhel/lift_map_detect, ``detect.py``)."""
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"ssim needs images of at least {win_size} px, got {list(a.shape)}")
    a, b = a.double(), b.double()
    np_ = win_size ** 2
    cov_norm = np_ / (np_ - 1)

    def avg(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, win_size, stride=1)

    ux, uy = avg(a), avg(b)
    vx = cov_norm * (avg(a * a) - ux * ux)
    vy = cov_norm * (avg(b * b) - uy * uy)
    vxy = cov_norm * (avg(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def median(d: Tensor) -> Tensor:
    """Median over attempts (dim 1) as ``np.median``: the mean of the two middle values
    when the count is even (``torch.median`` would return the lower one)."""
    return torch.quantile(d.double(), 0.5, dim=1).to(d.dtype)


def check_distance(distance: str, lpips_weights: dict[str, str] | None) -> None:
    """Fail early and clearly on a distance that cannot run here (LPIPS: its weights are
    loaded once now, so a bad path fails at spec load, not after training)."""
    if distance == "lpips":
        if not lpips_weights:
            raise ValueError(
                "distance='lpips' needs lpips_weights: {backbone: <torchvision AlexNet .pth>, "
                "linear: <lpips weights/v0.1/alex.pth>} (never downloaded); or use distance "
                "'mse' or 'ssim'")
        if not isinstance(lpips_weights, dict):
            raise ValueError(f"lpips_weights must be a mapping {{backbone: path, linear: path}}, "
                             f"got {lpips_weights!r}")
        lpips_net(lpips_weights)
    elif distance not in ("mse", "ssim"):
        raise ValueError(f"unknown distance {distance!r}; allowed: mse, ssim, lpips")


@functools.cache
def _lpips_cached(items: tuple[tuple[str, str], ...]):
    from oodlab.detect.diffusion.lpips import LPIPS

    return LPIPS.from_paths(dict(items))


def lpips_net(weights: dict[str, str]):
    """The LPIPS network of these weight files, loaded once per process."""
    return _lpips_cached(tuple(sorted((str(k), str(v)) for k, v in weights.items())))


def similarity(distance: Distance, x: Tensor, recon: Tensor,
               lpips_weights: dict[str, str] | None = None) -> Tensor:
    """Per-image similarity, higher = closer: -MSE, +SSIM or -LPIPS."""
    if distance == "lpips":
        if not lpips_weights:
            raise ValueError("distance='lpips' needs lpips_weights")
        return -lpips_net(lpips_weights).to(x.device)(x, recon)
    return -mse(x, recon) if distance == "mse" else ssim(x, recon)
