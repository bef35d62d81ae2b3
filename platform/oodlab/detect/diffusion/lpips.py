"""LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018), LMD's default distance
(Liu et al., ICML 2023; zhenzhel/lift_map_detect, ``detect.py``).

Nothing is downloaded: both weight files are given by path in the score's parameters,

    lpips_weights: {backbone: .../alexnet-owt-7be5be79.pth,   # torchvision's AlexNet
                    linear: .../lpips/weights/v0.1/alex.pth}  # ships inside the lpips wheel

and loaded with ``weights_only=True``. The computation follows the reference package:
inputs in [-1, 1] are shifted and scaled per channel, the five ReLU outputs of AlexNet's
``features`` are unit-normalised over channels, their squared differences weighted per
channel by the 1x1 ``lin`` layers, averaged over space and summed over layers. Grayscale
images are repeated to 3 channels and images under 32 px are resized to 32 px (bilinear),
as LMD does for its 28 px sets; AlexNet's pooling needs at least 32 px.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# where AlexNet's features are tapped (after relu1..relu5) and their widths
_TAPS = (1, 4, 7, 9, 11)
_WIDTHS = (64, 192, 384, 256, 256)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
MIN_SIZE = 32


def _load(path: str | Path, what: str) -> dict[str, Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"lpips_weights.{what}: no file at {str(p)!r} (LPIPS weights are "
                         "never downloaded; give the path of a local copy)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"lpips_weights.{what}: {str(p)!r} is not a torch weights file "
                         f"({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"lpips_weights.{what}: {str(p)!r} holds no state dict")
    return state


class LPIPS(nn.Module):
    """``forward(a, b)`` -> per-image LPIPS distance of [0, 1] images [N, C, H, W]."""

    def __init__(self, backbone_state: dict[str, Tensor], linear_state: dict[str, Tensor]
                 ) -> None:
        super().__init__()
        from torchvision.models import alexnet

        self.features = alexnet(weights=None).features[: _TAPS[-1] + 1]
        own = {k.removeprefix("features."): v for k, v in backbone_state.items()
               if k.startswith("features.")} or dict(backbone_state)
        try:
            self.features.load_state_dict(own)
        except RuntimeError as err:
            raise ValueError(f"lpips_weights.backbone is not torchvision's AlexNet: {err}"
                             ) from err
        lins = []
        for i, width in enumerate(_WIDTHS):
            key = f"lin{i}.model.1.weight"
            w = linear_state.get(key)
            if w is None or tuple(w.shape) != (1, width, 1, 1):
                raise ValueError(f"lpips_weights.linear has no {key} of shape "
                                 f"[1, {width}, 1, 1] (is it lpips' weights/v0.1/alex.pth?)")
            lins.append(w.float())
        self.register_buffer("lin", torch.cat([w.flatten() for w in lins]))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_paths(cls, weights: dict[str, str]) -> LPIPS:
        missing = {"backbone", "linear"} - set(weights)
        if missing:
            raise ValueError(f"lpips_weights needs the keys backbone and linear; missing "
                             f"{sorted(missing)}")
        return cls(_load(weights["backbone"], "backbone"), _load(weights["linear"], "linear"))

    def _taps(self, x: Tensor) -> list[Tensor]:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if min(x.shape[-2:]) < MIN_SIZE:
            x = F.interpolate(x, size=(MIN_SIZE, MIN_SIZE), mode="bilinear",
                              align_corners=False)
        x = ((x * 2 - 1) - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        total = torch.zeros(len(a), device=a.device)
        offsets = torch.tensor((0, *_WIDTHS)).cumsum(0).tolist()
        for i, (fa, fb) in enumerate(zip(self._taps(a), self._taps(b), strict=True)):
            w = self.lin[offsets[i]:offsets[i + 1]].view(1, -1, 1, 1)
            total += ((fa - fb) ** 2 * w).sum(1).mean((1, 2))
        return total
