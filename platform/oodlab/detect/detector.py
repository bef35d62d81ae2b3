"""The detector: a trained model + a fitted post-hoc score + a calibrated threshold.

This is what gets evaluated, logged to MLflow and served. It is saved as plain tensors and
JSON-able values (``torch.save``) and loaded with ``torch.load(weights_only=True)``: no
pickled code ever comes back from disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from oodlab.detect.scores import PostHocScore, score_from_state

FORMAT_VERSION = 1


class Detector:
    """Score images (higher = more in-distribution) and flag OOD below the threshold."""

    def __init__(self, model: nn.Module, score: PostHocScore, *, spec: dict[str, Any],
                 num_classes: int, threshold: float | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.score_fn = score
        self.spec = spec
        self.num_classes = num_classes
        self.threshold = threshold
        self.meta = dict(meta or {})

    @property
    def preprocessing(self) -> dict[str, int]:
        """Input shape the model expects; served clients send images, not tensors."""
        data = self.spec["data"]
        return {"image_size": int(data["image_size"]), "channels": int(data["channels"])}

    def check_input(self, x: Tensor) -> None:
        p = self.preprocessing
        want = (p["channels"], p["image_size"], p["image_size"])
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"expected a batch of shape [N, {want[0]}, {want[1]}, {want[2]}] "
                             f"with values in [0, 1], got {list(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("input contains NaN or infinite values")

    def score(self, x: Tensor, batch_size: int = 512) -> Tensor:
        """Scores of a batch of [0, 1] images, shape [N, C, H, W]."""
        self.check_input(x)
        device = next(self.model.parameters()).device
        chunks = [self.score_fn.score_model(self.model, x[i:i + batch_size].to(device)).cpu()
                  for i in range(0, len(x), batch_size)]
        return torch.cat(chunks)

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(scores, is_ood); ``is_ood`` is score < threshold (all False if uncalibrated)."""
        s = self.score(x)
        if self.threshold is None:
            return s, torch.zeros_like(s, dtype=torch.bool)
        return s, s < self.threshold

    def to(self, device: torch.device | str) -> Detector:
        self.model.to(device)
        return self

    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the detector; tensors and JSON-able values only."""
        return {
            "format_version": FORMAT_VERSION,
            "spec": self.spec,
            "num_classes": self.num_classes,
            "model_state": {k: v.cpu() for k, v in self.model.state_dict().items()},
            "score_name": self.score_fn.name,
            "score_config": self.score_fn.config(),
            "score_state": self.score_fn.state_dict(),
            "threshold": self.threshold,
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash never leaves a half-written detector file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def from_state(cls, state: dict[str, Any], model: nn.Module) -> Detector:
        """Rebuild from :meth:`state` into ``model``, a fresh network of the saved spec (the
        method layer builds it: :func:`oodlab.methods.load_detector_file`)."""
        check_format(state)
        model.load_state_dict(state["model_state"])  # strict: a mismatch is an error
        score = score_from_state(state["score_name"], state["score_config"], state["score_state"])
        return cls(model, score, spec=state["spec"], num_classes=state["num_classes"],
                   threshold=state["threshold"], meta=state["meta"])



def check_format(state: dict[str, Any]) -> None:
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported detector format {state.get('format_version')!r}")


def read_state(path: str | Path) -> dict[str, Any]:
    """A saved detector's state, loaded with ``weights_only=True`` (no pickled code)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    check_format(state)
    return state
