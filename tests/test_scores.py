"""Post-hoc scores against values computed by hand (higher = more ID)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from oodlab.detect.metrics import auroc, fpr_at_tpr
from oodlab.detect.outputs import Outputs, fit_score
from oodlab.detect.scores import (
    SCORES,
    build_score,
    energy,
    joint_energy,
    max_logit,
    max_sigmoid,
    msp,
    msp_logodds,
    score_from_state,
)

E = math.e


def test_msp_is_one_softmax():
    # [[2, 0]] -> e^2 / (e^2 + 1) = 0.880797; a double softmax would give 0.679
    assert msp(torch.tensor([[2.0, 0.0]])).item() == pytest.approx(0.880797, abs=1e-6)
    assert msp(torch.tensor([[0.0, 0.0, 0.0]])).item() == pytest.approx(1 / 3)


def test_logit_scores_by_hand():
    z = torch.tensor([[0.0, 0.0], [3.0, -1.0]])
    assert max_logit(z).tolist() == [0.0, 3.0]
    assert energy(z)[0].item() == pytest.approx(math.log(2))
    # T = 2: 2 * log(e^1.5 + e^-0.5) = 3.253856
    assert energy(z, temperature=2.0)[1].item() == pytest.approx(3.253856, abs=1e-5)
    # softplus(0) + softplus(log(e - 1)) = log 2 + log e = log 2 + 1
    je = joint_energy(torch.tensor([[0.0, math.log(E - 1)]])).item()
    assert je == pytest.approx(math.log(2) + 1, abs=1e-6)
    assert max_sigmoid(torch.tensor([[0.0, -2.0]])).item() == pytest.approx(0.5)


def test_joint_energy_is_stable_for_large_logits():
    # log(1 + exp(100)) overflows in float32; softplus gives 100 exactly
    assert joint_energy(torch.tensor([[100.0, -100.0]])).item() == pytest.approx(100.0)


def test_knn_kth_neighbour_distance():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = torch.tensor([[2.0, 0.0]])  # normalised to (1, 0): distances 0, sqrt 2, 2
    knn1, knn2 = build_score("knn", k=1), build_score("knn", k=2)
    for s in (knn1, knn2):
        s.fit(bank, torch.zeros(3, 2), None)
    assert knn1.score(None, q).item() == pytest.approx(0.0, abs=1e-6)
    assert knn2.score(None, q).item() == pytest.approx(-math.sqrt(2), abs=1e-6)
    big = build_score("knn", k=50)  # k larger than the bank is clipped to its size
    big.fit(bank, torch.zeros(3, 2), None)
    assert big.score(None, q).item() == pytest.approx(-2.0, abs=1e-6)


def test_mahalanobis_two_classes_by_hand():
    f = torch.tensor([[-2.0, -1.0], [0.0, 1.0], [2.0, -1.0], [4.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    s = build_score("mahalanobis")
    s.fit(f, torch.zeros(4, 2), labels)
    # means (-1, 0), (3, 0); centred rows (-1,-1), (1,1), (-1,-1), (1,1): cov = [[1,1],[1,1]]
    assert torch.allclose(s.means, torch.tensor([[-1.0, 0.0], [3.0, 0.0]]))
    # pinv([[1,1],[1,1]]) = [[.25,.25],[.25,.25]]; query (1, 0): d0 = (2,0) -> 1, d1 = (-2,0) -> 1
    assert s.score(None, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(-1.0, abs=1e-5)
    # query (3, 0) sits on class 1's mean -> 0
    assert s.score(None, torch.tensor([[3.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="needs class labels"):
        s.fit(f, torch.zeros(4, 2), None)


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))

    def forward(self, x):
        return self.fc(x), x


def test_odin_with_zero_epsilon_is_tempered_msp():
    model, x = _Linear(), torch.tensor([[2.0, 0.0]])
    odin = build_score("odin", temperature=2.0, epsilon=0.0)
    # softmax([1, 0]) max p = e / (e + 1): its log-odds log(p / (1 - p)) = 1
    assert odin.score_model(model, x).item() == pytest.approx(1.0, abs=1e-9)
    assert torch.sigmoid(odin.score_model(model, x)).item() == pytest.approx(E / (E + 1))


def test_odin_perturbation_raises_the_max_softmax():
    model, x = _Linear(), torch.tensor([[2.0, 0.0]])
    odin = build_score("odin", temperature=1.0, epsilon=0.5)
    # gradient of -log softmax_0 pushes x0 up and x1 down: x~ = (2.5, -0.5) -> softmax max
    # 1 / (1 + e^-3), whose log-odds is the gap 3
    assert odin.score_model(model, x).item() == pytest.approx(3.0, abs=1e-6)
    assert all(p.grad is None for p in model.parameters())  # no grads left on the model


# ----------------------------------------------------------- exactness at large logit gaps


def test_msp_logodds_is_the_log_odds_of_msp():
    z = torch.randn(200, 10) * 3
    p = msp(z.double())
    assert torch.allclose(msp_logodds(z), torch.log(p / (1 - p)), atol=1e-9)
    # [[2, 0, 0]]: p = e^2 / (e^2 + 2) -> log-odds 2 - log 2
    assert msp_logodds(torch.tensor([[2.0, 0.0, 0.0]])).item() == pytest.approx(2 - math.log(2))
    assert msp_logodds(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(0.0)  # p = 1/2


def _separable_logits(n: int, gap_lo: float, gap_hi: float, seed: int) -> torch.Tensor:
    """Ten-class logits whose top class leads the others by a gap in [gap_lo, gap_hi]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 10, generator=g) * 2
    top = torch.randint(10, (n,), generator=g)
    gap = gap_lo + (gap_hi - gap_lo) * torch.rand(n, generator=g)
    base[torch.arange(n), top] = base.max(1).values + gap
    return base


@pytest.mark.parametrize(("id_gap", "ood_gap"), [((40, 60), (30, 35)), ((200, 300), (60, 150))])
def test_msp_and_odin_separate_confident_id_and_ood(id_gap, ood_gap):
    id_logits = _separable_logits(500, *id_gap, seed=0)
    ood_logits = _separable_logits(500, *ood_gap, seed=1)
    # the plain probability saturates: everything is exactly 1.0 in float32, AUROC 0.5
    assert (msp(id_logits) == 1).all() and (msp(ood_logits) == 1).all()
    assert auroc(msp(id_logits), msp(ood_logits)) == 0.5
    for name, params in (("msp", {}), ("odin", {}), ("odin", {"temperature": 1.0})):
        s = build_score(name, **params)  # odin's default T = 1000
        id_s, ood_s = s.score(id_logits, None), s.score(ood_logits, None)
        assert torch.isfinite(id_s).all() and torch.isfinite(ood_s).all()
        assert id_s.min() > ood_s.max(), name  # strictly, no tie anywhere
        assert auroc(id_s, ood_s) == 1.0 and fpr_at_tpr(id_s, ood_s) == 0.0, name


def test_msp_keeps_order_within_confident_images():
    z = torch.tensor([[30.0, 0.0, 0.0], [31.0, 0.0, 0.0], [45.0, 0.0, 0.0], [45.0, 1.0, 0.0]])
    s = build_score("msp").score(z, None)
    assert s[0] < s[1] < s[2] and s[3] < s[2]
    assert s[0].item() == pytest.approx(30 - math.log(2), abs=1e-9)


# ------------------------------------------------------------------------------- label guard


def test_needs_labels_is_declared():
    assert SCORES["mahalanobis"].needs_labels
    assert not any(SCORES[n].needs_labels for n in ("msp", "energy", "knn", "odin",
                                                     "cluster_mahalanobis"))


def test_fit_score_passes_labels_only_for_supervised_models():
    outs = Outputs(logits=torch.zeros(4, 2), features=torch.tensor(
        [[-2.0, -1.0], [0.0, 1.0], [2.0, -1.0], [4.0, 1.0]]), labels=torch.tensor([0, 0, 1, 1]))
    seen = []

    class Spy(SCORES["knn"]):
        def fit(self, features, logits, labels):
            seen.append(labels)
            super().fit(features, logits, labels)

    SCORES.register(Spy, name="spy_knn")
    try:
        fit_score("spy_knn", {}, outs, supervised=False)
        fit_score("spy_knn", {}, outs, supervised=True)
    finally:
        SCORES.unregister("spy_knn")
    assert seen[0] is None and torch.equal(seen[1], outs.labels)
    fitted = fit_score("mahalanobis", {}, outs, supervised=True)
    assert fitted.means.shape == (2, 2)
    with pytest.raises(ValueError, match="trained without them"):
        fit_score("mahalanobis", {}, outs, supervised=False)


def test_registry_and_state_round_trip():
    assert {"msp", "max_logit", "energy", "joint_energy", "max_sigmoid", "odin", "knn",
            "mahalanobis"} <= set(SCORES)
    with pytest.raises(ValueError, match="allowed:"):
        build_score("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        build_score("knn", kk=3)
    s = build_score("knn", k=1)
    s.fit(torch.eye(3), torch.zeros(3, 2), None)
    again = score_from_state("knn", s.config(), s.state_dict())
    q = torch.randn(4, 3)
    assert torch.equal(s.score(None, q), again.score(None, q))
