"""A model's outputs over a whole set, and post-hoc scores fitted on or applied to them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from oodlab.detect.scores import PostHocScore, build_score


@dataclass
class Outputs:
    """Model outputs over a whole loader, on the CPU, and the model's last linear layer
    ``(weight, bias)`` when it has one (``logits = W f + b``; ReAct, ASH and ViM re-apply it)."""

    logits: Tensor
    features: Tensor
    labels: Tensor
    head: tuple[Tensor, Tensor] | None = None


def linear_head(model: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(weight, bias) of the classifier's last layer ``model.fc`` (every oodlab classifier
    maps features to logits with it), copied to the CPU; None when there is none."""
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        return None
    bias = fc.bias if fc.bias is not None else torch.zeros(fc.out_features)
    return fc.weight.detach().float().cpu().clone(), bias.detach().float().cpu().clone()


@torch.no_grad()
def collect_outputs(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
                    ) -> Outputs:
    """Run the model in eval mode over a loader; restore its train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    logits, feats, labels = [], [], []
    for x, y in loader:
        out, f = model(x.to(device))
        logits.append(out.float().cpu())
        feats.append(f.float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    if not logits:
        raise ValueError("cannot collect outputs from an empty loader")
    return Outputs(torch.cat(logits), torch.cat(feats), torch.cat(labels), linear_head(model))


def fit_score(name: str, params: dict[str, Any], train: Outputs | None, *,
              supervised: bool) -> PostHocScore:
    """Build a post-hoc score by name and fit it on ID-train outputs (no-op if unfitted).

    ``supervised``: the model was trained with ID class labels. Only then are the labels of
    ``train`` handed to ``fit``; a score that ``needs_labels`` (Mahalanobis, Lee et al. 2018)
    cannot be fitted for a model trained without them, and the error says so."""
    score = build_score(name, **params)
    if score.needs_labels and not supervised:
        raise ValueError(f"score {name!r} needs ID class labels, but the model was trained "
                         "without them (unsupervised); use a label-free score (eval.scores)")
    if score.needs_fit:
        if train is None:
            raise ValueError(f"score {name!r} must be fitted on ID-train outputs")
        labels = None
        if supervised and train.labels.ndim == 1 and (train.labels >= 0).all():
            labels = train.labels
        set_head(score, train.head)
        score.fit(train.features, train.logits, labels)
    return score


def set_head(score: PostHocScore, head: tuple[Tensor, Tensor] | None) -> None:
    """Hand the model's last linear layer to a score that re-applies it (ReAct, ASH, ViM)."""
    if not score.needs_head:
        return
    if head is None:
        raise ValueError(f"score {score.name!r} needs the model's last linear layer "
                         "(model.fc: logits = W f + b); this model has none")
    score.set_head(*head)  # type: ignore[attr-defined]


def score_loader(model: nn.Module, score: PostHocScore, loader: DataLoader, outputs: Outputs | None,
                 device: torch.device | str = "cpu") -> Tensor:
    """Scores for a whole set: from cached outputs when the score allows, else via the model."""
    if outputs is not None and not score.needs_model:
        return score.score(outputs.logits, outputs.features)
    model.eval()
    return score.score_loader(model, loader, device)
