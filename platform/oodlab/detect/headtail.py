"""Head/tail breakdown of multi-label OOD detection (EDGE's imbalance analysis).

Head classes are the most frequent classes (by ID-train label counts) that together cover
``head_fraction`` of all labels; every other class is tail. ID test images are grouped as
``all``, ``head`` (at least one head class) and ``tail_only`` (labels only from tail classes),
and each group is compared with each OOD set (as EDGE's reference code does, Sun et al.
AAAI 2025, Yuchen-Sunflower/EDGE ``lib.py::get_id_auc``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from oodlab.detect.metrics import auroc, fpr_at_tpr

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


def breakdown(id_scores: Tensor, id_labels: Tensor, ood_scores: dict[str, Tensor],
              head: Tensor, threshold: float) -> dict[str, float]:
    """AUROC and FPR@95 of each ID group against each OOD set (and their mean), plus the
    fraction of tail-only ID images flagged OOD at the served threshold."""
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
    return out
