"""OOD and ID metrics on top of scikit-learn. ID is the POSITIVE class unless a name says
otherwise. Scores follow the oodlab convention: higher = more in-distribution.

Two FPR@95 conventions are in use in the literature and both are reported:

* ``fpr95`` (ID positive; Hendrycks & Gimpel 2017, Liang et al. 2018, Liu et al. 2020): the
  threshold keeps 95 % of ID test images (TPR of ID = 0.95); the value is the fraction of OOD
  images *accepted* as ID. This is what the served detector does (threshold at 95 % ID TPR).
* ``fpr95_oodpos`` (OOD positive; OpenOOD v1.5, Zhang et al. 2023, and pytorch-ood): the
  threshold flags 95 % of OOD images as OOD (TPR of OOD = 0.95); the value is the fraction
  of ID images wrongly *flagged* as OOD. It equals ``fpr95`` only for symmetric score
  distributions; compare a paper's FPR@95 with the one of its convention.

Both count ties pessimistically (a tie at the threshold is an error), so constant scores give
1.0, never an optimistic 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

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
    from sklearn.metrics import roc_auc_score  # scikit-learn is imported where it is used:
    # about 1.5 s a process, which a serving replica or a CLI that computes no metric skips

    y, s = _labelled(*_pair(id_scores, ood_scores))
    return float(roc_auc_score(y, s))


def aupr_in(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with ID as the positive class."""
    from sklearn.metrics import average_precision_score

    y, s = _labelled(*_pair(id_scores, ood_scores))
    return float(average_precision_score(y, s))


def aupr_out(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with OOD as the positive class (on negated scores)."""
    from sklearn.metrics import average_precision_score

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


def fpr_at_tpr_oodpos(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95
                      ) -> float:
    """OOD-positive convention (OpenOOD v1.5, pytorch-ood): fraction of ID flagged as OOD at
    the threshold that flags ``tpr`` of the OOD images.

    On negated scores (higher = more OOD) it is :func:`fpr_at_tpr` with the roles swapped:
    t = the largest value with at least ``tpr`` of -OOD scores >= t, and an ID image counts as
    flagged when -score >= t (ties are errors, as in :func:`fpr_at_tpr`).
    """
    id_s, ood_s = _pair(id_scores, ood_scores)
    return fpr_at_tpr(-ood_s, -id_s, tpr)


def ood_metrics(id_scores: ArrayLike, ood_scores: ArrayLike) -> dict[str, float]:
    """AUROC, AUPR-in, AUPR-out, FPR@95 (ID positive) and FPR@95 (OOD positive) of one OOD
    set against ID; see the module docstring for the two FPR conventions."""
    id_s, ood_s = _pair(id_scores, ood_scores)
    return {"auroc": auroc(id_s, ood_s), "aupr_in": aupr_in(id_s, ood_s),
            "aupr_out": aupr_out(id_s, ood_s), "fpr95": fpr_at_tpr(id_s, ood_s),
            "fpr95_oodpos": fpr_at_tpr_oodpos(id_s, ood_s)}


def flagged_per_class(id_scores: ArrayLike, labels: ArrayLike, threshold: float) -> np.ndarray:
    """Per ID class, the fraction of ID images carrying that class that are flagged OOD
    (score < ``threshold``); ``labels`` are class indices [N] or multi-hot [N, C]. Read it
    against the class frequency of the training set (e.g. ``fashion_mosaic_balanced``);
    a class with no image gets NaN."""
    s, y = _as_array(id_scores, "id_scores"), _as_array(labels, "labels")
    if y.ndim == 1:
        y = np.eye(int(y.max()) + 1)[y.astype(np.int64)]
    if y.ndim != 2 or len(y) != len(s):
        raise ValueError(f"labels {y.shape} do not match {len(s)} scores")
    flagged = (s < threshold).astype(np.float64)
    counts = y.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, (y * flagged[:, None]).sum(0) / counts, np.nan)


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
    from sklearn.metrics import average_precision_score

    s, t = _as_array(scores, "scores"), _as_array(targets, "targets")
    if s.shape != t.shape or s.ndim != 2:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must both be [N, C]")
    aps = [average_precision_score(t[:, c], s[:, c]) for c in range(s.shape[1])
           if t[:, c].sum() > 0]
    if not aps:
        raise ValueError("no class has a positive target")
    return float(np.mean(aps))
