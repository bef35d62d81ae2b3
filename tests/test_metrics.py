"""OOD and ID metrics against values computed by hand (ID is the positive class)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodlab.detect.evaluate import METRIC_KEYS, group_means
from oodlab.detect.metrics import (
    accuracy,
    aupr_in,
    aupr_out,
    auroc,
    flagged_per_class,
    fpr_at_tpr,
    fpr_at_tpr_oodpos,
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
    assert m["fpr95"] == 1.0 and m["fpr95_oodpos"] == 1.0 and m["auroc"] == 0.5


def test_perfect_separation():
    m = ood_metrics(torch.tensor([5.0, 6.0, 7.0]), torch.tensor([0.0, 1.0]))
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0,
                 "fpr95_oodpos": 0.0}


def test_the_two_fpr95_conventions_by_hand():
    # ID 1..20; OOD: 18 scores at 0 and two at 15 and 16 (overlapping ID's tail)
    id_scores = np.arange(1, 21, dtype=float)
    ood = np.r_[np.zeros(18), 15.0, 16.0]
    # ID positive: t = 2 (95 % of ID >= 2); OOD accepted (>= 2): 15 and 16 -> 2 / 20
    assert fpr_at_tpr(id_scores, ood) == pytest.approx(0.1)
    # OOD positive: flag 95 % of OOD (19 of 20): -OOD sorted desc 0 x18, -15, -16 -> the 19th
    # is -15, so scores <= 15 are flagged; ID flagged: 1..15 -> 15 / 20
    assert fpr_at_tpr_oodpos(id_scores, ood) == pytest.approx(0.75)
    m = ood_metrics(id_scores, ood)
    assert m["fpr95"] == pytest.approx(0.1) and m["fpr95_oodpos"] == pytest.approx(0.75)
    # symmetric roles: swapping ID and OOD and negating swaps the conventions
    assert fpr_at_tpr_oodpos(-ood, -id_scores) == pytest.approx(0.1)


def test_flagged_per_class():
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.7])
    multi_hot = np.array([[1, 0], [1, 0], [1, 1], [0, 1], [0, 1]])
    # flagged (< 0.5): images 0 and 2; class 0 in images 0, 1, 2 -> 2/3; class 1 in 2, 3, 4 -> 1/3
    assert flagged_per_class(scores, multi_hot, 0.5) == pytest.approx([2 / 3, 1 / 3])
    rates = flagged_per_class(scores[:2], np.array([0, 2]), 0.5)  # class 1 has no image
    assert rates[0] == 1.0 and np.isnan(rates[1]) and rates[2] == 0.0


# -------------------------------------------------------------------- near / far / sanity


def _per_set(**auroc_by_set: float) -> dict[str, dict[str, float]]:
    return {n: {k: v for k in METRIC_KEYS} for n, v in auroc_by_set.items()}


def test_group_means_headline_is_near_and_far_only():
    per_set = _per_set(mnist=0.6, letters=0.8, photos=0.9, textures=1.0, gaussian=0.0,
                       rademacher=0.2)
    groups = {"near": ["mnist", "letters"], "far": ["photos", "textures"],
              "sanity": ["gaussian", "rademacher"]}
    out = group_means(per_set, groups)
    assert set(out) == {"near", "far", "sanity", "mean"}
    assert out["near"]["auroc"] == pytest.approx(0.7)
    assert out["far"]["fpr95_oodpos"] == pytest.approx(0.95)
    assert out["sanity"]["auroc"] == pytest.approx(0.1)
    assert out["mean"]["auroc"] == pytest.approx((0.6 + 0.8 + 0.9 + 1.0) / 4)  # per set
    # a group with no set is left out, never logged as NaN or 0
    assert set(group_means(per_set, {"near": ["mnist"], "far": []})) == {"near", "mean"}


def test_group_means_ungrouped_keeps_old_mean_without_sanity_sets():
    per_set = _per_set(letters=0.8, photos=0.9, gaussian=0.0, rademacher=0.1)
    out = group_means(per_set, {"ungrouped": list(per_set)})
    assert out["mean"]["auroc"] == pytest.approx(0.85)
    assert out["sanity"]["auroc"] == pytest.approx(0.05) and "near" not in out
    assert group_means(per_set)["mean"]["auroc"] == pytest.approx(0.85)
    # only sanity sets: the headline is still logged, as their mean
    only = group_means(_per_set(gaussian=0.4, rademacher=0.6))
    assert only["mean"]["auroc"] == pytest.approx(0.5)


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


def test_evaluate_logs_groups_and_a_near_far_headline(tmp_path):
    """evaluate() end to end on a tiny in-memory bundle (no Ray, no data files)."""
    from oodlab.data.bundle import DataBundle
    from oodlab.data.types import ImageDataset
    from oodlab.detect.evaluate import evaluate
    from oodlab.models import SmallCNN
    from oodlab.spec import validate_spec
    from tests.helpers import tiny_spec

    spec = validate_spec(tiny_spec(tmp_path, method={"name": "supervised"}, data={
        "test_ood": [], "val_ood": [], "oe": [], "near_ood": ["letters"],
        "far_ood": ["photos", "blobs"], "sanity_ood": ["gaussian"]},
        eval={"scores": ["msp", "mahalanobis"]}))
    rng = np.random.default_rng(0)

    def images(n, lo, hi, labels=None):
        x = rng.integers(lo, hi, size=(n, 28, 28), dtype=np.uint8)
        y = np.full(n, -1) if labels is None else labels
        return ImageDataset("x", x, y, [] if labels is None else ["a", "b"])

    ids = [images(40, 0, 120, np.arange(40) % 2) for _ in range(3)]
    bundle = DataBundle(*ids, num_classes=2, test_groups=spec.data.test_sets(),
                        test_ood={"letters": images(30, 100, 256), "photos": images(30, 50, 200),
                                  "blobs": images(30, 0, 256), "gaussian": images(30, 0, 60)})
    torch.manual_seed(0)
    report = evaluate(spec, SmallCNN(2, width=4), bundle, supervised=True)
    m = report.metrics
    for score in ("msp", "mahalanobis"):
        for group in ("near", "far", "sanity", "mean"):
            assert {f"test/{score}/{group}/{k}" for k in METRIC_KEYS} <= set(m)
        per = [m[f"test/{score}/{n}/auroc"] for n in ("letters", "photos", "blobs")]
        assert m[f"test/{score}/mean/auroc"] == pytest.approx(np.mean(per))  # not gaussian
        assert m[f"test/{score}/sanity/auroc"] == m[f"test/{score}/gaussian/auroc"]
    assert m["test/auroc"] == m["test/msp/mean/auroc"]
    assert m["test/fpr95_oodpos"] == m["test/msp/mean/fpr95_oodpos"]
    assert "test/msp/ungrouped/auroc" not in m


def test_evaluate_streams_one_ood_set_at_a_time(tmp_path, monkeypatch):
    """Each OOD set is reported through ``on_set`` as soon as it is scored, with the metrics
    that end up in the report, and its outputs are dropped before the next one: while a set
    is reported only the ID validation and test outputs are alive (collecting every set up
    front, as a driver-side evaluation would, fails this)."""
    import gc
    import weakref

    from oodlab.data.bundle import DataBundle
    from oodlab.data.types import ImageDataset
    from oodlab.detect import evaluate as ev
    from oodlab.models import SmallCNN
    from oodlab.spec import validate_spec
    from tests.helpers import tiny_spec

    spec = validate_spec(tiny_spec(tmp_path, method={"name": "supervised"}, data={
        "test_ood": [], "val_ood": ["val_letters"], "oe": [], "near_ood": ["letters"],
        "far_ood": ["photos", "blobs"]}, eval={"scores": ["energy", "knn"],
                                              "score_params": {"knn": {"k": 3}}}))
    rng = np.random.default_rng(1)

    def images(n, lo, hi, labels=None):
        x = rng.integers(lo, hi, size=(n, 28, 28), dtype=np.uint8)
        y = np.full(n, -1) if labels is None else labels
        return ImageDataset("x", x, y, [] if labels is None else ["a", "b"])

    bundle = DataBundle(*[images(40, 0, 120, np.arange(40) % 2) for _ in range(3)],
                        num_classes=2, test_groups=spec.data.test_sets(),
                        val_ood={"val_letters": images(20, 90, 256)},
                        test_ood={n: images(30, lo, 256) for n, lo in
                                  (("letters", 100), ("photos", 50), ("blobs", 0))})
    refs: list[weakref.ref] = []
    collect = ev.collect_outputs

    def tracked(*args, **kwargs):
        out = collect(*args, **kwargs)
        refs.append(weakref.ref(out))
        return out

    monkeypatch.setattr(ev, "collect_outputs", tracked)
    calls = []

    def on_set(key, per_score):
        gc.collect()
        calls.append((key, per_score, sum(r() is not None for r in refs)))

    torch.manual_seed(0)
    report = ev.evaluate(spec, SmallCNN(2, width=4), bundle, supervised=True, on_set=on_set)
    assert [c[0] for c in calls] == ["test:letters", "test:photos", "test:blobs",
                                     "val:val_letters"]
    assert all(n_live == 2 for *_, n_live in calls), [c[2] for c in calls]
    for key, per_score, _ in calls[:3]:
        name = key.split(":")[1]
        for score, m in per_score.items():
            assert m == {k: report.metrics[f"test/{score}/{name}/{k}"] for k in METRIC_KEYS}
    assert set(calls[3][1]) == {"energy", "knn"}
