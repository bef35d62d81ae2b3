"""The optimizer and the per-step learning-rate schedule of a spec's ``train`` section.

Kept apart from :mod:`oodlab.train.loop` (which needs Ray) so a plain PyTorch loop, such as
``bench/lmd_gpu.py`` on a machine with PyTorch alone, builds exactly the same ones.
"""

from __future__ import annotations

import torch

from oodlab.spec import TrainSpec


def make_optimizer(cfg: TrainSpec, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
                           and cfg.momentum > 0, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainSpec, opt: torch.optim.Optimizer, total_steps: int
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule, stepped once per optimizer step: cosine annealing to 0 over the
    whole run (Loshchilov & Hutter 2017, SGDR Eq. 5 without restarts: after k of T steps
    lr = 0.5·lr_0·(1 + cos(πk/T))), or constant."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
