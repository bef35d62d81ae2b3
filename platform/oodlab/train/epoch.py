"""One training epoch of the one loop, with no Ray in it.

:mod:`oodlab.train.loop` runs it inside Ray Train workers; the benchmarks run it in plain
processes (``bench/benchlib.py``'s ceiling without Ray, ``bench/fmnist_gpu.py`` on a machine
without Ray), so every driver trains with the same step, loss check and metrics::

    for (batch, oe_batch): loss = method.training_step(...); zero_grad; backward; step
    -> (mean loss over every rank's images, images/s over the slowest rank)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from oodlab.data.bundle import set_epoch
from oodlab.methods import Method, TrainState


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper (what gets checkpointed and evaluated)."""
    return model.module if hasattr(model, "module") else model


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
