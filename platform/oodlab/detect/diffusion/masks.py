"""Lift masks of LMD (Liu et al., ICML 2023; reference code zhenzhel/lift_map_detect,
``mask_utils.py``). Convention: 1 = known (kept) pixel, 0 = inpainted."""

from __future__ import annotations

import torch
from torch import Tensor


def checkerboard(size: int, block: int, complement: bool = False) -> Tensor:
    """[size, size] checkerboard of ``block``-px squares: blocks with (row + col) odd are
    masked (0), as in the reference; ``complement`` masks the even ones instead. A block
    size that does not divide ``size`` leaves partial blocks at the border."""
    if block < 1:
        raise ValueError(f"block_size must be >= 1 px, got {block}")
    idx = torch.arange(size) // block
    odd = (idx[:, None] + idx[None, :]) % 2 == 1
    return (odd if complement else ~odd).float()


def alternating_masks(size: int, block: int, attempts: int) -> Tensor:
    """[attempts, 1, size, size]: attempt r uses the checkerboard (r even) or its complement
    (r odd), the reference ``checkerboard_alt`` (every pixel inpainted in half the attempts)."""
    return torch.stack([checkerboard(size, block, complement=r % 2 == 1)
                        for r in range(attempts)])[:, None]
