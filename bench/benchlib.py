"""What every benchmark writes: a header naming the run and the host, and one JSON file."""

from __future__ import annotations

import json
import os
import platform as stdlib_platform
import sys
import time
from pathlib import Path
from typing import Any

import torch


def header(name: str, script: str, argv: list[str] | None) -> dict[str, Any]:
    """Benchmark name, date, host, the exact command and the load average at start (the
    machine may be shared: quote ratios from one run, never a lone absolute time)."""
    return {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d"),
        "host": f"{stdlib_platform.machine()}, {os.cpu_count()} CPUs, torch "
                f"{torch.__version__}, python {sys.version.split()[0]}",
        "command": " ".join([f"python {script}", *(sys.argv[1:] if argv is None else argv)]),
        "load_average_at_start": list(os.getloadavg()),
    }


def stat_fields(stat: str) -> list[str]:
    """The fields of a ``/proc/<pid>/stat`` line after the command name (which may hold
    spaces and parentheses): ``[0]`` state, ``[1]`` parent pid, ``[11]``/``[12]`` user/system
    CPU time in clock ticks."""
    return stat.rsplit(")", 1)[1].split()


def cpu_seconds(fields: list[str]) -> float:
    """User + system CPU time from :func:`stat_fields`."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_result(path: str | Path, result: dict[str, Any]) -> Path:
    """Write ``result`` as indented JSON (parents created) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def fit_rates(spec: Any, num_classes: int | None = None) -> tuple[list[float], float]:
    """Train ``spec`` with oodlab's Ray Train loop on the Ray this process is connected to.

    Returns the per-epoch ``train/images_per_s`` (all ranks' images over the slowest rank's
    epoch time) and the wall-clock seconds of the whole call (worker start-up included).
    """
    import ray

    from oodlab.train.loop import fit

    log = Path(spec.workdir_path) / f"rates-{time.time_ns()}.jsonl"

    class Collect(ray.train.UserCallback):
        """Runs in the Train controller process: hand the figures back through a file."""

        def after_report(self, run_context, metrics, checkpoint):
            with open(log, "a") as f:
                f.write(json.dumps(metrics[0]["train/images_per_s"]) + "\n")

    t0 = time.perf_counter()
    fit(spec, run_name=f"bench-{time.time_ns()}", num_classes=num_classes,
        callbacks=[Collect()])
    wall = time.perf_counter() - t0
    return [float(line) for line in log.read_text().split()], wall


def plain_rates(spec: Any, rank: int = 0, world: int = 1) -> list[float]:
    """oodlab's training without Ray: the loop's set-up and epoch
    (:func:`oodlab.train.epoch.prepare` and ``train_epoch``; no validation, checkpoints or
    reports), images/s per epoch.

    With ``world`` > 1 the caller has initialised the process group: the model is wrapped in
    DDP, each rank reads its shard, and images/s is every rank's images over the slowest rank's
    epoch (the ranks start each epoch's clock together).
    """
    from torch.nn.parallel import DistributedDataParallel

    from oodlab.data.bundle import load_bundle, set_epoch
    from oodlab.train.epoch import endless, prepare, train_epoch

    torch.set_num_threads(int(spec.resources.cpus_per_worker))
    run = prepare(spec, load_bundle(spec, include_test=False), rank, world)
    model = DistributedDataParallel(run.model) if world > 1 else run.model
    oe = (endless(run.oe_loader, run.oe_sampler, spec.seed) if run.oe_loader is not None
          else None)
    rates = []
    for epoch in range(spec.train.epochs):
        run.state.epoch = epoch
        set_epoch(run.id_sampler, spec.seed, epoch)
        rates.append(train_epoch(model, run.method, run.id_loader, oe, run.opt, run.sched,
                                 run.state)[1])
    return rates
