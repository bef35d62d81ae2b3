"""The one training loop, run by Ray Train's TorchTrainer on 1..N workers (CPU or GPU).

Per worker::

    prepare(spec, bundle, resume=<latest checkpoint, if Ray restarted us>)
    for epoch: train_epoch(...)     # oodlab.train.epoch: the same set-up and epoch, no Ray
               method.on_epoch_end(...)
               rank 0: validation metrics; everyone: ray.train.report(metrics, checkpoint)

A checkpoint holds the model, optimizer, scheduler, epoch, method state and RNG states, so
a worker killed mid-run resumes at the next epoch, not at 0 (FailureConfig.max_failures).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from oodlab.cluster.storage import checkpoint_uri, ray_storage
from oodlab.console import progress, time_left
from oodlab.data.bundle import load_bundle, set_epoch
from oodlab.detect.evaluate import validation_metrics
from oodlab.methods import Loaders, Method, TrainState
from oodlab.spec import ExperimentSpec, validate_spec
from oodlab.train.epoch import (
    INIT_METRICS,
    checkpoint_payload,
    endless,
    prepare,
    selection_metrics,
    servable_model,
    train_epoch,
    unwrap,
)

CHECKPOINT_FILE = "state.pt"


def save_checkpoint(path: Path, model: nn.Module, opt, sched, state: TrainState) -> None:
    torch.save(checkpoint_payload(model, opt, sched, state), path / CHECKPOINT_FILE)


def load_checkpoint_payload(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: ``config = {"spec": <ExperimentSpec as JSON dict>}``."""
    spec = validate_spec(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    bundle = load_bundle(spec, include_test=False)
    checkpoint = ray.train.get_checkpoint()
    payload = load_checkpoint_payload(checkpoint) if checkpoint is not None else None
    run = prepare(spec, bundle, rank, world, ray.train.torch.get_device(),
                  init_state=config.get("init_state"), resume=payload)  # init_from: checked
    method, state = run.method, run.state
    if payload is not None and rank == 0:
        progress(f"resumed from checkpoint at epoch {payload['epoch']}")

    model = ray.train.torch.prepare_model(run.model)
    id_loader = ray.train.torch.prepare_data_loader(run.id_loader, add_dist_sampler=False)
    oe_loader, oe_stream = run.oe_loader, None
    if oe_loader is not None:
        oe_loader = ray.train.torch.prepare_data_loader(oe_loader, add_dist_sampler=False)
        oe_stream = endless(oe_loader, run.oe_sampler, spec.seed)
    loaders = Loaders(id_train=id_loader, oe=oe_loader)
    if spec.train.needs_init_metrics and rank == 0 and INIT_METRICS not in state.extra:
        # measured once; checkpoints keep it (state.extra), so a resumed run reuses it
        state.extra[INIT_METRICS] = validation_metrics(unwrap(model), bundle, spec, method,
                                                       state.device)

    started = time.monotonic()  # this attempt's clock, for the epoch line's ETA
    for epoch in range(run.start_epoch, spec.train.epochs):
        state.epoch = epoch
        set_epoch(run.id_sampler, spec.seed, epoch)
        mean_loss, images_per_s = train_epoch(model, method, id_loader, oe_stream, run.opt,
                                              run.sched, state)
        method.on_epoch_end(model, loaders, state)

        metrics = {"epoch": epoch, "run/start_epoch": run.start_epoch,
                   "train/loss": mean_loss, "train/lr": run.sched.get_last_lr()[0],
                   "train/images_per_s": images_per_s,
                   "train/optimizer_steps": state.step}  # per worker, since step 0
        metrics |= method.epoch_metrics(model, state)
        if rank == 0:
            metrics |= validation_metrics(unwrap(model), bundle, spec, method, state.device)
            metrics |= selection_metrics(spec.train, metrics, state.extra.get(INIT_METRICS))
            _log_figures(spec, config.get("run_id"), method, unwrap(model), state)
            id_key = "val/id_map" if "val/id_map" in metrics else "val/id_acc"
            clock = time_left(time.monotonic() - started, epoch + 1 - run.start_epoch,
                              spec.train.epochs - epoch - 1)
            progress(f"epoch {epoch + 1}/{spec.train.epochs} (step {state.step}) "
                     f"loss {metrics['train/loss']:.4f} "
                     f"{id_key} {metrics.get(id_key, float('nan')):.3f} "
                     f"val/auroc {metrics.get('val/auroc', float('nan')):.3f} "
                     f"({metrics['train/images_per_s']:.0f} img/s, {clock})")
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp), model, run.opt, run.sched, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def _log_figures(spec: ExperimentSpec, run_id: str | None, method: Method, model: nn.Module,
                 state: TrainState) -> None:
    """Log the method's figures of this epoch to the run (rank 0); a lost picture never
    ends a training run."""
    figures = method.epoch_figures(model, state)
    if not figures or run_id is None:
        return
    from oodlab.track import tracking  # here: MLflow costs a worker process about 1.3 s to
    # import, and only a method with figures needs it in the worker

    for path, fig in figures.items():
        try:
            tracking.log_figure(spec, run_id, fig, path)
        except Exception as err:  # noqa: BLE001  (tracking store unreachable, full disk...)
            progress(f"could not log {path}: {err}")


def model_from_checkpoint(spec: ExperimentSpec, checkpoint: ray.train.Checkpoint,
                          num_classes: int | None = None) -> nn.Module:
    """The servable (exported, eval-mode, CPU) model stored in a training checkpoint
    (``num_classes``: default the one the checkpoint records, so the caller loads no data)."""
    return _restore(spec, load_checkpoint_payload(checkpoint), num_classes)[0]


def _restore(spec: ExperimentSpec, payload: dict[str, Any], num_classes: int | None
             ) -> tuple[nn.Module, int]:
    num_classes = num_classes if num_classes is not None else int(payload["num_classes"])
    return servable_model(spec, payload["model"], num_classes), num_classes


@dataclass
class TrainOutcome:
    """The trained (unwrapped, CPU) model of the selected epoch (``train.select_metric``,
    else the last) and where that checkpoint lives."""

    model: nn.Module
    num_classes: int
    checkpoint_path: str
    metrics: dict[str, Any]


def storage_path(spec: ExperimentSpec) -> str:
    """Ray Train storage: ``spec.storage`` (local path or s3://...) or ``<workdir>/ray``."""
    return spec.storage or str(spec.workdir_path / "ray")


def fit(spec: ExperimentSpec, *, run_name: str, num_classes: int | None = None,
        callbacks: list | None = None, init_state: dict | None = None,
        run_id: str | None = None) -> TrainOutcome:
    """Train with a TorchTrainer; ``run_name`` must be unique and stable (it is the resume
    key). Workers log the method's figures to the MLflow run ``run_id`` when given."""
    r = spec.resources
    spec = spec.pinned()  # workers run in Ray's directories: same workdir, caches, store
    select = spec.train.score_attribute  # None: the last epoch is the one evaluated
    trainer = ray.train.torch.TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "init_state": init_state,
                           "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu,
            resources_per_worker={"CPU": r.cpus_per_worker} | ({"GPU": 1} if r.use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=run_name, **ray_storage(storage_path(spec)),  # s3: pyarrow fs + endpoint
            # Ray keeps the latest checkpoint (for restarts) and the best on the score
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=select,
                checkpoint_score_order=spec.train.select_mode),
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            callbacks=callbacks or [],
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name!r} finished without a checkpoint")
    chosen = result.checkpoint
    if select is not None:
        chosen = _best_checkpoint(result, select, spec.train.select_mode) or chosen
    model, num_classes = _restore(spec, load_checkpoint_payload(chosen), num_classes)
    return TrainOutcome(model=model, num_classes=num_classes,
                        checkpoint_path=checkpoint_uri(chosen),
                        metrics=dict(result.metrics or {}))


def _best_checkpoint(result: ray.train.Result, attribute: str, mode: str
                     ) -> ray.train.Checkpoint | None:
    """The kept checkpoint best on ``attribute``; None (the caller takes the latest) when no
    kept checkpoint has a finite score, i.e. no epoch kept ``train.select_constraints``."""
    scored = [(c, m.get(attribute)) for c, m in result.best_checkpoints or []]
    scored = [(c, float(v)) for c, v in scored if v is not None and math.isfinite(v)]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda cv: cv[1])[0]
