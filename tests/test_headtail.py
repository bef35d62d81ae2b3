"""Head/tail breakdown on hand-made label matrices."""

from __future__ import annotations

import pytest
import torch

from oodlab.detect.headtail import breakdown, class_flagged, group_masks, head_classes


def test_head_classes_cover_the_fraction():
    # label counts 6, 3, 1 -> class 0 alone covers 0.6 of the labels
    y = torch.tensor([[1, 1, 0]] * 3 + [[1, 0, 0]] * 3 + [[0, 0, 1]])
    assert head_classes(y, 0.5).tolist() == [True, False, False]
    assert head_classes(y, 0.7).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="no positive"):
        head_classes(torch.zeros(2, 3), 0.5)


def test_group_masks_by_hand():
    head = torch.tensor([True, False, False])
    y = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1], [0, 0, 0]])
    g = group_masks(y, head)
    assert g["head"].tolist() == [True, False, True, False, False]
    assert g["tail_only"].tolist() == [False, True, False, True, False]  # empty row: neither


def test_class_flagged_and_tail_minus_head():
    head = torch.tensor([True, False, False])
    y = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1]])
    s = torch.tensor([5.0, 0.5, 0.5, 0.2, 3.0])  # threshold 1: rows 1, 2, 3 flagged
    out = class_flagged(s, y, head, threshold=1.0)
    assert out["class/0/flagged_ood"] == 0.5 and out["class/1/flagged_ood"] == 1.0
    assert out["class/2/flagged_ood"] == 0.5
    assert out["head_classes/flagged_ood"] == 0.5
    assert out["tail_classes/flagged_ood"] == 0.75
    assert out["tail_minus_head/flagged_ood"] == pytest.approx(0.25)
    full = breakdown(s, y, {"ood": torch.tensor([0.1, 0.0])}, head, threshold=1.0)
    assert full["tail_only/count"] == 3 and full["tail_only/flagged_ood"] == pytest.approx(2 / 3)
    assert full["head/ood/auroc"] == 1.0  # head scores 5, 0.5 all above OOD 0.1, 0.0
