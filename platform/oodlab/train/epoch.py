"""What one rank trains and one training epoch of the one loop, with no Ray in it.

:mod:`oodlab.train.loop` runs them inside Ray Train workers; the benchmarks run them in plain
processes (``bench/benchlib.py``'s ceiling without Ray, ``bench/fmnist_gpu.py`` on a machine
without Ray), so every driver trains the same model, data order, optimizer and step::

    prepare(spec, bundle)  -> Trainee: method, model, loaders, optimizer, schedule, state
                              (a checkpoint payload resumes all of them)
    train_epoch(...)       -> for (batch, oe_batch): loss = method.training_step(...);
                              zero_grad; backward; step
                           -> (mean loss over every rank's images, images/s over the
                              slowest rank)
    selection_metrics(...) -> select/score, select/feasible: the epoch's checkpoint score
                              under train.select_constraints
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from oodlab.data.bundle import DataBundle, set_epoch, train_loader
from oodlab.methods import Loaders, Method, TrainState, build_method
from oodlab.spec import SELECT_SCORE, ExperimentSpec, TrainSpec
from oodlab.train.optim import make_optimizer, make_scheduler

INIT_METRICS = "select/init"  # state.extra key: the init model's validation metrics


def selection_metrics(train: TrainSpec, metrics: dict[str, float],
                      init: dict[str, float] | None = None) -> dict[str, float]:
    """The epoch's checkpoint score under ``train.select_constraints`` (empty without them):
    ``select/score`` is ``select_metric`` when the epoch keeps every constraint and the worst
    value (-inf for max, +inf for min) when it does not, so Ray Train's checkpoint scoring keeps
    the best feasible epoch; ``select/feasible`` is 1 or 0. ``init``: the init model's
    validation metrics, for constraints ``relative_to: init``."""
    if not train.select_constraints or train.select_metric is None:
        return {}
    feasible = all(c.bounds(init or {}).violation(metrics.get(c.metric)) == 0
                   for c in train.select_constraints)
    worst = -math.inf if train.select_mode == "max" else math.inf
    value = metrics.get(train.select_metric)
    score = float(value) if feasible and value is not None else worst
    out = {SELECT_SCORE: score, "select/feasible": float(feasible)}
    for c in train.select_constraints:
        if c.relative_to == "init":
            out[f"select/init/{c.metric}"] = float(init[c.metric])
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper (what gets checkpointed and evaluated)."""
    return model.module if hasattr(model, "module") else model


@dataclass
class Trainee:
    """Everything one rank trains with, built by :func:`prepare`."""

    method: Method
    model: nn.Module  # method.wrap(backbone), on the device; the caller adds DDP
    state: TrainState
    id_loader: DataLoader
    id_sampler: Any
    oe_loader: DataLoader | None
    oe_sampler: Any
    opt: torch.optim.Optimizer
    sched: Any
    start_epoch: int = 0  # > 0 when resumed from a checkpoint payload

    @property
    def loaders(self) -> Loaders:
        return Loaders(id_train=self.id_loader, oe=self.oe_loader)


def servable_model(spec: ExperimentSpec, weights: dict[str, Any], num_classes: int
                   ) -> nn.Module:
    """The exported, eval-mode model of ``weights`` (a state dict of the wrapped model, as
    :func:`checkpoint_payload` stores it under ``model``)."""
    method = build_method(spec)
    model = method.wrap(method.build(num_classes))
    model.load_state_dict(weights)
    return method.export(model).eval()


def checkpoint_payload(model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                       state: TrainState) -> dict[str, Any]:
    """What a checkpoint holds: model, optimizer, schedule, epoch, step, method state and the
    RNG, so :func:`prepare` resumes at the next epoch; ``num_classes`` lets a driver rebuild
    the model without loading data."""
    return {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "epoch": state.epoch, "step": state.step,
            "extra": state.extra, "torch_rng": torch.get_rng_state(),
            "num_classes": state.num_classes}


def prepare(spec: ExperimentSpec, bundle: DataBundle, rank: int = 0, world: int = 1,
            device: torch.device | str = "cpu", init_state: dict | None = None,
            resume: dict[str, Any] | None = None) -> Trainee:
    """Build what rank ``rank`` of ``world`` trains on ``bundle``.

    The model starts from ``spec.seed`` (the same on every rank), or from ``init_state``
    (``init_from``); the loaders' order is a function of (seed, epoch, rank). The method sets
    itself up on the plain backbone (``on_fit_start``), then wraps it; the optimizer covers
    the trainable parameters, the schedule ``train.epochs`` x steps per epoch. ``resume``
    (a :func:`checkpoint_payload`) restores method state and step before ``on_fit_start``,
    and model, optimizer, schedule and RNG after, so training goes on at its next epoch.
    """
    device = torch.device(device)
    torch.manual_seed(spec.seed)
    method = build_method(spec)
    model = method.build(bundle.num_classes)
    state = TrainState(num_classes=bundle.num_classes, rank=rank, world_size=world,
                       device=device)
    workers = spec.resources.loader_workers
    id_loader, id_sampler = train_loader(bundle.id_train, spec.data.batch_size, spec.seed,
                                         rank, world, workers=workers)
    if len(id_loader) == 0:
        raise ValueError(f"data.batch_size={spec.data.batch_size} x {world} worker(s) exceeds "
                         f"the {len(bundle.id_train)} ID training images; lower it or add data")
    oe_loader, oe_sampler = None, None
    if method.uses_oe:
        if bundle.oe is None:
            raise ValueError(f"method {spec.method.name!r} needs OE data: set data.oe")
        oe_loader, oe_sampler = train_loader(bundle.oe, spec.data.oe_batch_size, spec.seed + 1,
                                             rank, world, workers=workers)
    if resume is not None:
        state.extra, state.step = resume["extra"], resume["step"]
    elif init_state is not None:
        model.load_state_dict(init_state)
    method.on_fit_start(model, Loaders(id_train=id_loader, oe=oe_loader), state)
    model = method.wrap(model).to(device)
    opt = make_optimizer(spec.train, [p for p in model.parameters() if p.requires_grad])
    sched = make_scheduler(spec.train, opt, spec.train.epochs * len(id_loader))
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        start_epoch = resume["epoch"] + 1
    return Trainee(method, model, state, id_loader, id_sampler, oe_loader, oe_sampler, opt,
                   sched, start_epoch)


def endless(batches: Iterable, sampler: Any, seed: int) -> Iterator:
    """Endless OE stream: OE never truncates the ID epoch (unlike zip(ID, OE) in EDGE); each
    pass over the OE set is reshuffled as a function of (``seed`` + 1, pass). A pass that
    gives no batch (an OE set smaller than one batch, with drop_last) is an error, not an
    endless wait."""
    epoch = 0
    while True:
        set_epoch(sampler, seed + 1, epoch)
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("data.oe_batch_size is larger than the OE sets (not one full OE "
                             "batch per pass); lower data.oe_batch_size or add OE data")
        epoch += 1


def distributed() -> bool:
    """A process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def epoch_stats(loss_sum: float, seen: int, elapsed: float, device: torch.device | str = "cpu"
                ) -> tuple[float, float]:
    """(mean training loss, images/s) of one epoch over every rank.

    Loss sums and image counts are all-reduced with SUM, so the loss is the mean over all
    images the ranks saw (not rank 0's shard); the epoch takes as long as its slowest rank
    (elapsed all-reduced with MAX), so throughput = all images / slowest rank's time, never
    rank 0's count times the world size. Without a process group these are the local values.
    """
    sums = torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=device)
    slowest = torch.tensor([elapsed], dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    total_loss, images = sums.tolist()
    return total_loss / max(images, 1.0), images / max(slowest.item(), 1e-9)


def train_epoch(model: nn.Module, method: Method, batches: Iterable, oe: Iterator | None,
                opt: torch.optim.Optimizer, sched: Any, state: TrainState
                ) -> tuple[float, float]:
    """Train one epoch over ``batches`` (ID ``(x, y)`` on the model's device; ``oe``: the
    endless OE stream or None), stepping ``sched`` per optimizer step and counting
    ``state.step``; returns :func:`epoch_stats`. A non-finite loss stops training with the
    epoch and step where it happened.

    With several ranks, every rank starts the epoch's clock together (one all-reduce of a
    zero, a barrier on gloo and NCCL alike), so rank 0's validation is not training time.
    """
    model.train()
    if distributed():
        dist.all_reduce(torch.zeros(1, device=state.device))
    t0, total, seen = time.perf_counter(), 0.0, 0
    for batch in batches:
        oe_batch = next(oe) if oe is not None else None
        loss = method.training_step(model, batch, oe_batch, state)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {state.epoch} "
                                     f"step {state.step}; lower train.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        state.step += 1
        total += loss.item() * len(batch[0])
        seen += len(batch[0])
    return epoch_stats(total, seen, time.perf_counter() - t0, state.device)
