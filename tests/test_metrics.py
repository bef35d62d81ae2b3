"""OOD and ID metrics against values computed by hand (ID is the positive class)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodlab.metrics import (
    accuracy,
    aupr_in,
    aupr_out,
    auroc,
    fpr_at_tpr,
    mean_average_precision,
    ood_metrics,
    threshold_at_tpr,
)


def test_auroc_by_hand_with_a_tie():
    # pairs (id > ood): 3>1, 3>2, 2=2 (1/2), 2>1 -> 3.5 / 4
    assert auroc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.875)
    assert auroc([1.0, 1.0], [1.0, 1.0]) == pytest.approx(0.5)
    assert auroc([0.0], [1.0]) == 0.0


def test_aupr_in_and_out_by_hand():
    # ranking (desc): id 3 (P), ood 2.5 (N), id 2 (P), ood 1 (N)
    # AP with ID positive: precisions at the positives 1/1 and 2/3 -> (1 + 2/3) / 2
    assert aupr_in([3.0, 2.0], [2.5, 1.0]) == pytest.approx((1 + 2 / 3) / 2)
    # OOD positive on -scores: order -1 (P), -2 (N), -2.5 (P), -3 (N) -> (1 + 2/3) / 2
    assert aupr_out([3.0, 2.0], [2.5, 1.0]) == pytest.approx((1 + 2 / 3) / 2)


def test_threshold_and_fpr95_with_known_index():
    id_scores = np.arange(1, 21, dtype=float)  # 20 ID scores 1..20
    # ceil(0.95 * 20) - 1 = 18 -> 19th largest = 2
    assert threshold_at_tpr(id_scores, 0.95) == 2.0
    ood = np.array([0.5, 1.5, 2.0, 10.0])  # 2.0 (tie, counted) and 10 accepted
    assert fpr_at_tpr(id_scores, ood) == pytest.approx(0.5)
    assert threshold_at_tpr([5.0, 1.0, 3.0], 0.5) == 3.0  # ceil(1.5) - 1 = 1


def test_constant_scores_are_not_optimistic():
    m = ood_metrics(np.ones(10), np.ones(10))
    assert m["fpr95"] == 1.0 and m["auroc"] == 0.5


def test_perfect_separation():
    m = ood_metrics(torch.tensor([5.0, 6.0, 7.0]), torch.tensor([0.0, 1.0]))
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}


def test_accuracy_from_logits_or_labels():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert accuracy(np.array([1, 1]), np.array([1, 0])) == 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        accuracy(np.array([1, 1, 1]), np.array([1, 0]))


def test_map_by_hand_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.2], [0.6, 0.4, 0.1]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    # class 0: order 0.9 (P), 0.6, 0.2 -> AP 1; class 1: 0.8 (P), 0.4 (P), 0.1 -> AP 1
    # class 2 has no positive: skipped
    assert mean_average_precision(scores, targets) == pytest.approx(1.0)
    # class 1 with a wrong top: 0.8 (P) ... make class 0's positive rank second
    scores[2, 0] = 0.95  # class 0 order: 0.95 (N), 0.9 (P) -> AP 1/2
    assert mean_average_precision(scores, targets) == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.parametrize(
    ("id_scores", "ood_scores", "match"),
    [([], [1.0], "empty"), ([1.0, float("nan")], [1.0], "NaN"), ([[1.0]], [1.0], "1-D"),
     ([1.0], [float("inf")], "infinite")],
)
def test_bad_inputs_are_clear_errors(id_scores, ood_scores, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(id_scores, ood_scores)
