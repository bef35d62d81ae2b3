"""EDGE and its multi-label baselines: losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from oodlab.detect.scores import joint_energy
from oodlab.methods.base import TrainState
from oodlab.methods.multilabel import (
    BCE,
    Edge,
    confidence_loss,
    gap_loss,
    gap_margin,
    joint_energy_margin_loss,
    tail_scores,
)


def logit_for(s: float) -> float:
    """The logit whose softplus is s: log(e^s - 1)."""
    return math.log(math.expm1(s))


def col(*scores: float) -> torch.Tensor:
    """One-class logits with the given JointEnergy scores."""
    return torch.tensor([[logit_for(s)] for s in scores])


def test_joint_energy_of_constructed_logits():
    assert joint_energy(col(3.0, 1.0)).tolist() == pytest.approx([3.0, 1.0], abs=1e-5)


def test_confidence_loss_by_hand():
    # softplus of OE logits 2 and 0.5 (one class) -> mean 1.25
    assert confidence_loss(col(2.0, 0.5)).item() == pytest.approx(1.25, abs=1e-5)
    # all-zero logits: softplus(0) = ln 2 per entry
    assert confidence_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(2))


def test_tail_picks_the_k_lowest():
    s = torch.tensor([3.0, 1.0, 2.0, 0.5, 4.0])
    assert sorted(tail_scores(s, 2).tolist()) == [0.5, 1.0]
    assert sorted(tail_scores(s, 10).tolist()) == sorted(s.tolist())  # k clipped


def test_gap_loss_three_id_samples_known_tail_and_margin():
    # ID scores 3, 1, 2 -> tail (k=2) = {1, 2}; OE scores 2, 0.5; m = 0.5
    # pairs: relu(2-1+.5)=1.5, relu(2-2+.5)=.5, relu(.5-1+.5)=0, relu(.5-2+.5)=0 -> 2.0 / 4
    got = gap_loss(col(3.0, 1.0, 2.0), col(2.0, 0.5), k=2, margin=0.5)
    assert got.item() == pytest.approx(0.5, abs=1e-5)
    # gradients flow to both sides: raise tail ID scores, lower OE scores
    lid, loe = col(3.0, 1.0, 2.0).requires_grad_(), col(2.0, 0.5).requires_grad_()
    gap_loss(lid, loe, k=2, margin=0.5).backward()
    assert lid.grad[0, 0] == 0 and lid.grad[1, 0] < 0 and lid.grad[2, 0] < 0
    assert loe.grad[0, 0] > 0 and loe.grad[1, 0] == 0


def test_joint_energy_margin_loss_by_hand():
    # S_in = 1 -> E_in = -1; m_in = -3: relu(-1 + 3)^2 = 4
    # S_out = 2 -> E_out = -2; m_out = -1: relu(-1 + 2)^2 = 1
    got = joint_energy_margin_loss(col(1.0), col(2.0), m_in=-3.0, m_out=-1.0)
    assert got.item() == pytest.approx(5.0, abs=1e-4)


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x, x


def _edge(**params) -> Edge:
    from oodlab.spec import validate_spec
    from tests.helpers import tiny_spec

    spec = validate_spec(tiny_spec("/tmp/oodlab-unused", method={"name": "edge", **params}))
    return Edge(spec)


def test_edge_total_and_gap_start_epoch():
    method = _edge(alpha=1.0, beta=0.1, k=2, margin=0.5, margin_rel=0.0, gap_start_epoch=3)
    x, y = col(3.0, 1.0, 2.0), torch.ones(3, 1)
    oe = (col(2.0, 0.5), -torch.ones(2))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y).item()
    before = method.training_step(_Identity(), (x, y), oe, TrainState(epoch=2)).item()
    after = method.training_step(_Identity(), (x, y), oe, TrainState(epoch=3)).item()
    assert before == pytest.approx(bce + 1.25, abs=1e-5)  # L_gap off before epoch 3
    assert after == pytest.approx(bce + 1.25 + 0.1 * 0.5, abs=1e-5)


def test_bce_rejects_single_labels():
    from oodlab.spec import validate_spec
    from tests.helpers import tiny_spec

    method = BCE(validate_spec(tiny_spec("/tmp/oodlab-unused", method={"name": "bce"})))
    with pytest.raises(ValueError, match="multi-hot labels"):
        method.training_step(_Identity(), (torch.zeros(2, 3), torch.tensor([0, 1])), None,
                             TrainState())


def cols(*rows: tuple[float, ...]) -> torch.Tensor:
    """Multi-class logits whose per-class softplus are the given values."""
    return torch.tensor([[logit_for(v) for v in row] for row in rows])


def test_gap_loss_sums_over_classes():
    # three classes: S = sum of softplus -> ID S = 3.0, 1.5; OE S = 2.0 (k = 1: tail S = 1.5)
    # sum: relu(2.0 - 1.5 + 0) = 0.5; a mean over classes (S/3) would give relu(.667-.5) = .167
    lid = cols((1.0, 1.0, 1.0), (0.5, 0.5, 0.5))
    loe = cols((1.0, 0.5, 0.5))
    assert gap_loss(lid, loe, k=1, margin=0.0).item() == pytest.approx(0.5, abs=1e-5)
    assert confidence_loss(loe).item() == pytest.approx(2.0 / 3, abs=1e-5)  # mean over classes


def test_gap_margin_in_units_of_an_undecided_image():
    assert gap_margin(10, 0.0, 0.5) == pytest.approx(5 * math.log(2))
    assert gap_margin(8, 1.0, 0.0) == 1.0


def test_edge_records_the_gap_per_epoch():
    method = _edge(alpha=1.0, beta=1.0, k=1, margin=0.0, margin_rel=0.0)
    x, y = cols((1.0, 1.0, 1.0), (0.5, 0.5, 0.5)), torch.ones(2, 3)
    oe = (cols((1.0, 0.5, 0.5)), -torch.ones(1))
    state = TrainState(epoch=0)
    method.training_step(_Identity(), (x, y), oe, state)
    m = method.epoch_metrics(_Identity(), state)
    assert m["train/s_tail"] == pytest.approx(1.5, abs=1e-5)
    assert m["train/s_oe"] == pytest.approx(2.0, abs=1e-5)
    assert m["train/gap_active"] == 1.0 and m["train/l_gap"] == pytest.approx(0.5, abs=1e-5)
    assert "plots/energy_gap.png" in method.epoch_figures(_Identity(), state)
    assert method.epoch_metrics(_Identity(), state) == {}  # reset after each epoch


class _Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 2))

    def forward(self, x):
        out = self.net(x)
        return out, out


def _toy_tail_vs_oe(method) -> tuple[float, float, float]:
    """Two classes in 2-D: 200 head points, 10 tail points, 200 OE points near the tail.
    Returns (P[S(tail) > S(OE)], mean S(tail), mean S(OE)) after 300 full-batch SGD steps."""
    g = torch.Generator().manual_seed(0)
    head = torch.randn(200, 2, generator=g) * 0.3 + torch.tensor([2.0, 0.0])
    tail = torch.randn(10, 2, generator=g) * 0.3 + torch.tensor([0.0, 1.0])
    oe = torch.randn(200, 2, generator=g) * 0.3 + torch.tensor([0.0, 0.3])
    x, y = torch.cat([head, tail]), torch.zeros(210, 2)
    y[:200, 0], y[200:, 1] = 1, 1
    torch.manual_seed(0)
    model = _Pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(300):
        loss = method.training_step(model, (x, y), (oe, -torch.ones(200)), TrainState())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        st, so = joint_energy(model(tail)[0]), joint_energy(model(oe)[0])
    return float((st[:, None] > so[None]).float().mean()), float(st.mean()), float(so.mean())


def test_gap_lifts_tail_above_oe_where_bce_oe_leaves_them_overlapping():
    from oodlab.methods.multilabel import BCEOE
    from oodlab.spec import validate_spec
    from tests.helpers import tiny_spec

    bce_oe = BCEOE(validate_spec(tiny_spec("/tmp/oodlab-unused",
                                           method={"name": "bce_oe", "alpha": 1.0})))
    order, _, _ = _toy_tail_vs_oe(bce_oe)
    assert order < 0.7  # tail and OE scores overlap (measured 0.55)
    edge = _edge(alpha=1.0, beta=1.0, k=10, margin=0.0, margin_rel=0.5)
    order, s_tail, s_oe = _toy_tail_vs_oe(edge)
    assert order > 0.85 and s_tail > s_oe + 0.5  # measured 0.91, 0.93 vs 0.19
