"""OOD and ID metrics on top of scikit-learn. ID is the POSITIVE class throughout.

Scores follow the oodlab convention: higher = more in-distribution.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

ArrayLike = np.ndarray | torch.Tensor | list


def _as_array(x: ArrayLike, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = arr.astype(np.float64)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _pair(id_scores: ArrayLike, ood_scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    id_s, ood_s = _as_array(id_scores, "id_scores"), _as_array(ood_scores, "ood_scores")
    if id_s.ndim != 1 or ood_s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got {id_s.shape} and {ood_s.shape}")
    return id_s, ood_s


def _labelled(id_s: np.ndarray, ood_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))], np.r_[id_s, ood_s]


def auroc(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Area under the ROC curve with ID positive (ties count one half)."""
    y, s = _labelled(*_pair(id_scores, ood_scores))
    return float(roc_auc_score(y, s))


def aupr_in(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with ID as the positive class."""
    y, s = _labelled(*_pair(id_scores, ood_scores))
    return float(average_precision_score(y, s))


def aupr_out(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with OOD as the positive class (on negated scores)."""
    y, s = _labelled(*_pair(id_scores, ood_scores))
    return float(average_precision_score(1 - y, -s))


def threshold_at_tpr(id_scores: ArrayLike, tpr: float = 0.95) -> float:
    """The largest t with at least ``tpr`` of ID scores >= t.

    Sorted descending, it is the ID score at index ceil(tpr * n) - 1; this is the threshold
    the served detector uses (calibrated on ID validation data).
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    id_s = np.sort(_as_array(id_scores, "id_scores"))[::-1]
    return float(id_s[math.ceil(tpr * len(id_s)) - 1])


def fpr_at_tpr(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> float:
    """Fraction of OOD accepted (score >= t) at t = :func:`threshold_at_tpr`.

    Tie rule: an OOD score equal to the threshold counts as accepted (a false positive),
    so constant scores give FPR 1.0, never an optimistic 0.
    """
    id_s, ood_s = _pair(id_scores, ood_scores)
    return float(np.mean(ood_s >= threshold_at_tpr(id_s, tpr)))


def ood_metrics(id_scores: ArrayLike, ood_scores: ArrayLike) -> dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR@95TPR of one OOD set against ID."""
    id_s, ood_s = _pair(id_scores, ood_scores)
    return {"auroc": auroc(id_s, ood_s), "aupr_in": aupr_in(id_s, ood_s),
            "aupr_out": aupr_out(id_s, ood_s), "fpr95": fpr_at_tpr(id_s, ood_s)}


def accuracy(logits_or_preds: ArrayLike, labels: ArrayLike) -> float:
    """Top-1 accuracy from logits [N, C] or predicted labels [N]."""
    out = _as_array(logits_or_preds, "logits")
    y = _as_array(labels, "labels")
    preds = out.argmax(1) if out.ndim == 2 else out
    if preds.shape != y.shape:
        raise ValueError(f"predictions {preds.shape} and labels {y.shape} differ in shape")
    return float(np.mean(preds == y))


def mean_average_precision(scores: ArrayLike, targets: ArrayLike) -> float:
    """Multi-label mAP: mean over classes of average precision (EDGE's validate.py metric).

    Classes with no positive target are skipped (their AP is undefined).
    """
    s, t = _as_array(scores, "scores"), _as_array(targets, "targets")
    if s.shape != t.shape or s.ndim != 2:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must both be [N, C]")
    aps = [average_precision_score(t[:, c], s[:, c]) for c in range(s.shape[1])
           if t[:, c].sum() > 0]
    if not aps:
        raise ValueError("no class has a positive target")
    return float(np.mean(aps))
