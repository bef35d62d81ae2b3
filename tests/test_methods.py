"""Losses of the skeleton methods against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from oodlab.methods import TrainState, build_method
from oodlab.methods.base import forward_id_and_oe
from oodlab.methods.outlier_exposure import energy_margin_loss, free_energy, uniform_ce
from oodlab.spec import validate_spec
from tests.helpers import tiny_spec

LN2 = math.log(2.0)


def test_uniform_ce_by_hand():
    # [[0, 0]]: -(0 - log 2) = log 2; [[1, 0]]: -(0.5 - log(e + 1)) = 0.813262
    assert uniform_ce(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(LN2)
    assert uniform_ce(torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.8132617, abs=1e-6)
    both = uniform_ce(torch.tensor([[0.0, 0.0], [1.0, 0.0]])).item()
    assert both == pytest.approx((LN2 + 0.8132617) / 2, abs=1e-6)


def test_free_energy_sign():
    # E = -logsumexp: [[0, 0]] -> -log 2; a confident ID logit gives LOWER energy
    assert free_energy(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(-LN2)
    assert free_energy(torch.tensor([[10.0, 0.0]])).item() < free_energy(torch.zeros(1, 2)).item()


def test_energy_margin_loss_by_hand():
    # E_in = E_out = -ln2; m_in = -1: relu(-ln2 + 1)^2 = (1 - ln2)^2 = 0.094158
    # m_out = 0: relu(0 + ln2)^2 = ln2^2 = 0.480453; total 0.574611
    z = torch.zeros(1, 2)
    got = energy_margin_loss(z, z, m_in=-1.0, m_out=0.0).item()
    assert got == pytest.approx(0.574611, abs=1e-5)
    # both sides satisfied -> zero loss
    assert energy_margin_loss(torch.tensor([[30.0, 0.0]]), torch.tensor([[-30.0, -30.0]]),
                              m_in=-25.0, m_out=-7.0).item() == 0.0


class _CountingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls, self.batch_sizes = 0, []
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        self.calls += 1
        self.batch_sizes.append(len(x))
        f = x.flatten(1)
        return self.fc(f), f


def test_one_forward_pass_over_id_and_oe():
    net = _CountingNet()
    x, x_oe = torch.randn(5, 4), torch.randn(3, 4)
    lid, loe = forward_id_and_oe(net, x, x_oe)
    assert net.calls == 1 and net.batch_sizes == [8]
    assert lid.shape == (5, 3) and loe.shape == (3, 3)
    assert torch.allclose(lid, net.fc(x)) and torch.allclose(loe, net.fc(x_oe))


def _method(tmp_path, **method):
    return build_method(validate_spec(tiny_spec(tmp_path, method=method)))


def test_energy_oe_step_is_ce_plus_weighted_margin(tmp_path):
    method = _method(tmp_path, name="energy_oe", m_in=-1.0, m_out=0.0, weight=0.1)
    net = _CountingNet()
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.zero_()
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    loss = method.training_step(net, (x, y), (torch.randn(2, 4), -torch.ones(2)), TrainState())
    # all logits 0 over 3 classes: CE = ln3; E = -ln3 for both halves
    # margin = relu(-ln3 + 1)^2 + relu(0 + ln3)^2 = 0 + ln3^2
    ln3 = math.log(3.0)
    assert loss.item() == pytest.approx(ln3 + 0.1 * ln3**2, abs=1e-6)


def test_oe_step_and_missing_oe_error(tmp_path):
    method = _method(tmp_path, name="oe", weight=0.5)
    net = _CountingNet()
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.zero_()
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    loss = method.training_step(net, (x, y), (torch.randn(3, 4), -torch.ones(3)), TrainState())
    # uniform logits: CE = ln3, uniform CE on OE = -(0 - ln3) = ln3
    assert loss.item() == pytest.approx(1.5 * math.log(3.0), abs=1e-6)
    with pytest.raises(ValueError, match="needs OE data"):
        method.training_step(net, (x, y), None, TrainState())


def test_supervised_step_is_cross_entropy(tmp_path):
    method = _method(tmp_path, name="supervised")
    net = _CountingNet()
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    expected = nn.functional.cross_entropy(net(x)[0], y)
    assert method.training_step(net, (x, y), None, TrainState()).item() == pytest.approx(
        expected.item())


def test_oe_methods_log_their_terms_and_the_hinges_active_fractions(tmp_path):
    method = _method(tmp_path, name="energy_oe", m_in=-1.0, m_out=0.0, weight=0.1)
    assert {"train/in_active", "train/out_active", "train/oe_term"} <= type(
        method).reported_metrics(method.spec)
    net = _CountingNet()
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.zero_()
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    for _ in range(3):
        method.training_step(net, (x, y), (torch.randn(2, 4), -torch.ones(2)), TrainState())
    ln3 = math.log(3.0)
    got = method.epoch_metrics(net, TrainState())
    # E = -ln3 everywhere: ID is below m_in = -1 (inactive); OE is below m_out = 0 (active)
    assert got["train/in_active"] == 0.0 and got["train/out_active"] == 1.0
    assert got["train/oe_term"] == pytest.approx(0.1 * ln3**2, abs=1e-6)
    assert got["train/ce_id"] == pytest.approx(ln3, abs=1e-6)
    assert got["train/e_oe"] == pytest.approx(-ln3, abs=1e-6)
    assert got["train/msp_oe"] == pytest.approx(1 / 3, abs=1e-6)
    assert method.epoch_metrics(net, TrainState()) == {}  # reset after the epoch


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        f = self.body(x)
        return self.fc(f), f


def _train_stat(tmp_path, params: dict, stats: tuple[str, ...]) -> float:
    """The sum of ``stats`` after 100 SGD steps of a seeded MLP on separable ID (x0 = +3)
    and OE (x0 = -3)."""
    torch.manual_seed(0)
    x = torch.randn(64, 4) + torch.tensor([3.0, 0, 0, 0])
    y = (x[:, 1] > 0).long() + (x[:, 2] > 0).long()
    x_oe = torch.randn(64, 4) - torch.tensor([3.0, 0, 0, 0])
    method, net = _method(tmp_path, **params), _MLP()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        method.training_step(net, (x, y), (x_oe, -torch.ones(64)), TrainState()).backward()
        opt.step()
    method.epoch_metrics(net, TrainState())
    loss = method.training_step(net, (x, y), (x_oe, -torch.ones(64)), TrainState())
    assert torch.isfinite(loss), params  # a diverged run has no active fraction to read
    got = method.epoch_metrics(net, TrainState())
    return sum(got[k] for k in stats)


@pytest.mark.parametrize(("params", "stats", "gain"), [
    ({"name": "energy_oe", "m_in": -4.0, "m_out": -0.5},
     ("train/in_active", "train/out_active"), 0.3),
    ({"name": "oe"}, ("train/msp_oe",), 0.1)])
def test_the_oe_term_acts(tmp_path, params, stats, gain):
    """Behaviour: the OE term must move its own diagnostics (the two hinges' active
    fractions; OE max softmax toward 1/3) below where plain CE (weight 0) leaves them. A
    detached or sign-flipped term does not."""
    with_term = _train_stat(tmp_path, {**params, "weight": 1.0}, stats)
    ce_only = _train_stat(tmp_path, {**params, "weight": 0.0}, stats)
    assert with_term < ce_only - gain, (with_term, ce_only)
