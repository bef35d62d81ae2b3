"""Post-hoc scores against values computed by hand (higher = more ID)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from oodlab.scores import (
    SCORES,
    build_score,
    energy,
    joint_energy,
    max_logit,
    max_sigmoid,
    msp,
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
    # softmax([1, 0]) max = e / (e + 1)
    assert odin.score_model(model, x).item() == pytest.approx(E / (E + 1), abs=1e-6)


def test_odin_perturbation_raises_the_max_softmax():
    model, x = _Linear(), torch.tensor([[2.0, 0.0]])
    odin = build_score("odin", temperature=1.0, epsilon=0.5)
    # gradient of -log softmax_0 pushes x0 up and x1 down: x~ = (2.5, -0.5) -> softmax max
    expected = 1 / (1 + math.exp(-3.0))
    assert odin.score_model(model, x).item() == pytest.approx(expected, abs=1e-6)
    assert all(p.grad is None for p in model.parameters())  # no grads left on the model


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
