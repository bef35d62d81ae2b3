"""Head/tail breakdown of multi-label OOD detection (EDGE's imbalance analysis).

Head classes are the most frequent classes (by ID-train label counts) that together cover
``head_fraction`` of all labels; every other class is tail. ID test images are grouped as
``all``, ``head`` (at least one head class) and ``tail_only`` (labels only from tail classes),
and each group is compared with each OOD set (as EDGE's reference code does, Sun et al.
AAAI 2025, Yuchen-Sunflower/EDGE ``lib.py::get_id_auc``).

Per class: the fraction of ID test images carrying class c that the served threshold flags
OOD (:func:`oodlab.detect.metrics.flagged_per_class`), and its mean over head and over tail
classes. On a class-balanced test set of fixed cardinality (``fashion_mosaic_lt``) this is the
curve EDGE's claim is about: with a long-tailed training set, images of rare classes get low
JointEnergy and are flagged more often; the tail - head difference summarises it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from oodlab.detect.metrics import auroc, flagged_per_class, fpr_at_tpr

GROUPS = ("all", "head", "tail_only")


def head_classes(train_labels: Tensor, fraction: float) -> Tensor:
    """Boolean mask [C] of head classes: most frequent first until ``fraction`` is covered."""
    counts = train_labels.float().sum(0)
    if counts.sum() <= 0:
        raise ValueError("no positive labels in the ID training set")
    order = torch.argsort(counts, descending=True, stable=True)
    covered = torch.cumsum(counts[order], 0) / counts.sum()
    n_head = int(torch.searchsorted(covered, torch.tensor(fraction - 1e-9)).item()) + 1
    mask = torch.zeros(len(counts), dtype=torch.bool)
    mask[order[:n_head]] = True
    return mask


def group_masks(labels: Tensor, head: Tensor) -> dict[str, Tensor]:
    """Row masks of the ID images in each group."""
    has_label = labels.sum(1) > 0
    has_head = (labels[:, head] > 0).any(1)
    return {"all": torch.ones(len(labels), dtype=torch.bool), "head": has_head,
            "tail_only": has_label & ~has_head}


def class_flagged(id_scores: Tensor, id_labels: Tensor, head: Tensor, threshold: float
                  ) -> dict[str, float]:
    """``class/<c>/flagged_ood`` per class with images, the mean over head classes and over
    tail classes (``head_classes/``, ``tail_classes/``) and ``tail_minus_head/flagged_ood``.
    A class without test images is left out of both means; a missing side is left out."""
    rates = flagged_per_class(id_scores, id_labels, threshold)
    out = {f"class/{c}/flagged_ood": float(r) for c, r in enumerate(rates) if np.isfinite(r)}
    head_np = head.numpy()
    sides = {"head_classes": rates[head_np], "tail_classes": rates[~head_np]}
    for side, r in sides.items():
        if np.isfinite(r).any():
            out[f"{side}/flagged_ood"] = float(np.nanmean(r))
    if "head_classes/flagged_ood" in out and "tail_classes/flagged_ood" in out:
        out["tail_minus_head/flagged_ood"] = (out["tail_classes/flagged_ood"]
                                              - out["head_classes/flagged_ood"])
    return out


def breakdown(id_scores: Tensor, id_labels: Tensor, ood_scores: dict[str, Tensor],
              head: Tensor, threshold: float) -> dict[str, float]:
    """AUROC and FPR@95 of each ID group against each OOD set (and their mean), plus the
    fraction of tail-only ID images flagged OOD at the served threshold and the per-class
    flagged rates of :func:`class_flagged`."""
    out: dict[str, float] = {}
    for group, mask in group_masks(id_labels, head).items():
        out[f"{group}/count"] = float(mask.sum())
        if mask.sum() == 0:
            continue  # shown as missing, never as zero
        ids = id_scores[mask]
        per = {n: (auroc(ids, s), fpr_at_tpr(ids, s)) for n, s in ood_scores.items()}
        for n, (a, f) in per.items():
            out[f"{group}/{n}/auroc"], out[f"{group}/{n}/fpr95"] = a, f
        out[f"{group}/mean/auroc"] = float(np.mean([a for a, _ in per.values()]))
        out[f"{group}/mean/fpr95"] = float(np.mean([f for _, f in per.values()]))
    tail = group_masks(id_labels, head)["tail_only"]
    if tail.any():
        out["tail_only/flagged_ood"] = float((id_scores[tail] < threshold).float().mean())
    out.update(class_flagged(id_scores, id_labels, head, threshold))
    return out
