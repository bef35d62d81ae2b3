"""A small ε-prediction U-Net (Ho et al. 2020 layout) and the diffusion model around it.

As in LMD (Liu et al., ICML 2023), which uses the DDPM U-Net of Song et al.'s
``score_sde_pytorch`` (``model.name='ddpm'``): time-conditional, with GroupNorm, swish,
dropout and self-attention at one
resolution; here the widths/depth are spec fields and the default is small enough for
28-32 px on a CPU. :class:`DiffusionModel` carries the noise schedule as buffers, so a saved
detector (state dict only) knows the schedule it was trained with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _groups(ch: int) -> int:
    """The largest of 32, 16, 8, 4, 2, 1 groups that divides ``ch``."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if ch % g == 0)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer timesteps (Transformer / DDPM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GN-swish-conv, + time projection, GN-swish-dropout-conv, residual (1x1 if widths differ)."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3,
                                                                              padding=1)
        self.temb = nn.Linear(t_dim, c_out)
        self.norm2, self.drop = nn.GroupNorm(_groups(c_out), c_out), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the spatial positions, residual."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm, self.qkv, self.out = nn.GroupNorm(_groups(ch), ch), nn.Conv2d(ch, 3 * ch, 1), \
            nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2))
        return x + self.out(a.transpose(1, 2).reshape(b, c, h, w))


def check_depth(image_size: int, channel_mult: Sequence[int]) -> None:
    """Each level but the last halves the image: it must stay an integer size."""
    levels = len(channel_mult)
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"data.image_size={image_size} must be divisible by "
                         f"2^(len(method.channel_mult) - 1) = {2 ** (levels - 1)}")


class UNet(nn.Module):
    """ε(x_t, t): ``len(channel_mult)`` resolution levels, ``num_res_blocks`` per level,
    attention at the resolutions (in px) listed in ``attention_resolutions``."""

    def __init__(self, *, in_channels: int, image_size: int, channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                 attention_resolutions: Sequence[int] = (7,), dropout: float = 0.1) -> None:
        super().__init__()
        check_depth(image_size, channel_mult)
        levels = len(channel_mult)
        t_dim = 4 * channels
        self.channels = channels
        self.temb = nn.Sequential(nn.Linear(channels, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down, skips, ch, res = nn.ModuleList(), [channels], channels, image_size
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(self._block(ch, channels * mult, t_dim, dropout,
                                             res in attention_resolutions))
                ch = channels * mult
                skips.append(ch)
            if i < levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, t_dim, dropout), Attention(ch),
                                  ResBlock(ch, ch, t_dim, dropout)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(self._block(ch + skips.pop(), channels * mult, t_dim, dropout,
                                           res in attention_resolutions))
                ch = channels * mult
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
                res *= 2
        self.head = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(),
                                  nn.Conv2d(ch, in_channels, 3, padding=1))

    @staticmethod
    def _block(c_in: int, c_out: int, t_dim: int, dropout: float, attn: bool) -> nn.ModuleList:
        return nn.ModuleList([ResBlock(c_in, c_out, t_dim, dropout)]
                             + ([Attention(c_out)] if attn else []))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.temb(timestep_embedding(t, self.channels))
        hs = [self.stem(x)]
        for layer in self.down:
            hs.append(self._run(layer, hs[-1], temb))
        h = hs[-1]
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = self._run(layer, torch.cat([h, hs.pop()], 1), temb)
            else:
                h = layer(h)
        return self.head(h)

    @staticmethod
    def _run(layer: nn.Module, h: Tensor, temb: Tensor) -> Tensor:
        if not isinstance(layer, nn.ModuleList):
            return layer(h)  # downsampling conv
        h = layer[0](h, temb)
        return layer[1](h) if len(layer) > 1 else h


class DiffusionModel(nn.Module):
    """The U-Net plus its noise schedule (``alphas_cumprod`` as a buffer).

    ``model(x_t, t)`` predicts ε for images in [-1, 1]. It has no logits: calling it with
    images only is an error that names the scores that do work (``lmd``, ``diffusion_recon``).
    """

    def __init__(self, unet: UNet, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone())

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        if t is None:
            raise TypeError("a diffusion model has no logits/features: score it with "
                            "eval.scores [lmd, diffusion_recon], not logit/feature scores")
        return self.unet(x, t)
