"""oodlab.train.epoch: the loop's set-up and epoch without Ray (resume, step count, loss check,
OE stream)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oodlab.data.bundle import load_bundle, train_loader
from oodlab.data.types import ImageDataset
from oodlab.methods import TrainState
from oodlab.spec import validate_spec
from oodlab.train.epoch import checkpoint_payload, endless, prepare, train_epoch
from tests.helpers import tiny_spec


def _toy(n: int) -> ImageDataset:
    images = (torch.rand(n, 4, 4, 1) * 255).to(torch.uint8).numpy()
    return ImageDataset("toy", images, torch.zeros(n, dtype=torch.int64).numpy() - 1)


def test_endless_reshuffles_each_pass_and_never_ends():
    loader, sampler = train_loader(_toy(8), 4, seed=0)
    stream = endless(loader, sampler, seed=0)
    first = [next(stream)[0] for _ in range(2)]
    second = [next(stream)[0] for _ in range(2)]
    assert torch.equal(torch.cat(first).sort(0).values, torch.cat(second).sort(0).values)
    assert not all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert len([next(stream) for _ in range(10)]) == 10


def test_endless_refuses_an_oe_set_smaller_than_one_batch():
    """drop_last with 6 OE images and batches of 8 gives no batch: an error naming the
    field, never a loop that waits for ever."""
    loader, sampler = train_loader(_toy(6), 8, seed=0)
    with pytest.raises(ValueError, match="oe_batch_size"):
        next(endless(loader, sampler, seed=0))


class _Method:
    """Regresses a constant to 1 (or returns NaN), counting its calls."""

    def __init__(self, nan_at: int | None = None) -> None:
        self.calls, self.nan_at = 0, nan_at

    def training_step(self, model, batch, oe_batch, state):
        self.calls += 1
        if self.calls == self.nan_at:
            return model.w.sum() * float("nan")
        return ((model.w - 1.0) ** 2).sum()


def _model() -> nn.Module:
    m = nn.Module()
    m.w = nn.Parameter(torch.zeros(1))
    return m


def test_train_epoch_steps_counts_and_reports_mean_loss():
    model, method, state = _model(), _Method(), TrainState()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    batches = [(torch.zeros(2, 1), torch.zeros(2))] * 5
    loss, ips = train_epoch(model, method, batches, None, opt, sched, state)
    assert state.step == method.calls == 5
    assert 0.0 < loss < 1.0 and ips > 0  # the first step's loss is 1, then it falls
    assert 0.0 < model.w.item() < 1.0  # the optimizer stepped


def test_train_epoch_stops_on_a_non_finite_loss_with_where():
    model, state = _model(), TrainState(epoch=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    batches = [(torch.zeros(2, 1), torch.zeros(2))] * 5
    with pytest.raises(FloatingPointError, match="epoch 3 step 2"):
        train_epoch(model, _Method(nan_at=3), batches, None, opt, sched, state)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_prepare_resumes_exactly_what_a_checkpoint_holds(tmp_path):
    """A run restarted from a payload goes on at the next epoch with the same weights,
    momentum, learning rate and step; a fresh one starts from the seed's initial weights,
    and ``init_state`` (init_from) replaces them."""
    spec = validate_spec(tiny_spec(tmp_path, method={"name": "supervised"},
                                   train={"epochs": 3, "lr": 0.05, "momentum": 0.9}))
    bundle = load_bundle(spec, include_test=False)
    run = prepare(spec, bundle)
    initial = _params(run.model)
    train_epoch(run.model, run.method, run.id_loader, None, run.opt, run.sched, run.state)
    payload = checkpoint_payload(run.model, run.opt, run.sched, run.state)

    again = prepare(spec, bundle, resume=payload)
    assert again.start_epoch == 1 and again.state.step == run.state.step == len(run.id_loader)
    for a, b in zip(_params(again.model), _params(run.model), strict=True):
        assert torch.equal(a, b)
    assert again.sched.get_last_lr() == run.sched.get_last_lr()
    momentum = [s["momentum_buffer"] for s in again.opt.state_dict()["state"].values()]
    assert momentum and all(m.abs().sum() > 0 for m in momentum)

    fresh = prepare(spec, bundle)
    assert fresh.start_epoch == 0 and fresh.state.step == 0
    assert all(torch.equal(a, b) for a, b in zip(_params(fresh.model), initial, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(initial, _params(run.model), strict=True))
    warm = prepare(spec, bundle, init_state=run.method.export(run.model).state_dict())
    for a, b in zip(_params(warm.model), _params(run.model), strict=True):
        assert torch.equal(a, b)


def test_prepare_names_the_field_when_a_rank_gets_no_batch(tmp_path):
    spec = validate_spec(tiny_spec(tmp_path, method={"name": "supervised"},
                                   data={"batch_size": 200}))
    bundle = load_bundle(spec, include_test=False)  # 256 images: one batch of 200...
    assert len(prepare(spec, bundle).id_loader) == 1
    with pytest.raises(ValueError, match=r"data.batch_size=200 x 2 worker"):
        prepare(spec, bundle, rank=0, world=2)  # ...but 128 per rank: none
