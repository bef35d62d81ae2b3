"""Data-parallel scaling of the Ray Train loop: images/s with 1 and 2 workers, on 1 and 2 nodes.

Run:  .venv/bin/python bench/scaling.py [--epochs 4] [--limit 12000] [--out FILE.json]

One spec (supervised SmallCNN on Fashion-MNIST, ``data.limit`` training images, batch 128 per
worker, 1 CPU per worker) is trained three times, one after the other:

* ``1 node, 1 worker``  - a local Ray with 2 CPUs;
* ``1 node, 2 workers`` - the same Ray, DDP over gloo between two processes;
* ``2 nodes, 2 workers`` - a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``,
  the harness of Ray's own multi-node tests: a head and a second raylet with 1 CPU each), so
  each worker lands on its own node and every gradient all-reduce crosses nodes.

Throughput is the loop's own ``train/images_per_s`` (every rank's images over the slowest
rank's epoch time), median over the epochs after the first. Scaling efficiency =
``images/s(2 workers) / (2 x images/s(1 worker))``; goal >= 0.8 on one node. The two nodes
share this machine's cores, memory bus and loopback network, so the 2-node row measures the
cost of crossing raylets and object stores, not of a real network.

Two checks say where a missed goal comes from:

* **the ceiling without Ray**: the same data, model, batch, training step and optimizer in 1
  and 2 plain processes (``torch.multiprocessing`` + DDP over gloo, 1 thread each). What two
  processes reach here with nothing else running bounds what Ray Train can reach;
* **who used the CPUs**: during each Ray run, CPU-seconds per wall-second of every process on
  the machine, grouped as Train workers, the Train controller and its helper actors, Ray's
  daemons (GCS, raylet, dashboard, agents, idle workers), this driver and everything else
  (read from ``/proc``, start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch.distributed as dist
import torch.multiprocessing as mp

from benchlib import cpu_seconds, fit_rates, header, plain_rates, stat_fields, write_result
from oodlab.cluster.ray_local import free_port, init_ray
from oodlab.spec import validate_spec

GOAL = 0.8


def bench_spec(workdir: str, epochs: int, limit: int, workers: int) -> dict:
    return {
        "name": "bench-scaling", "seed": 0, "workdir": workdir,
        "data": {"id": "fashion_mnist", "limit": limit, "batch_size": 128,
                 "val_ood": ["val_letters"], "test_ood": ["letters"], "oe": []},
        "model": {"arch": "small_cnn", "width": 32},
        "method": {"name": "supervised"},
        "train": {"epochs": epochs, "lr": 0.05},
        "eval": {"scores": ["energy"], "epoch_val_limit": 256},
        "resources": {"num_workers": workers, "cpus_per_worker": 1},
    }


ROLES = {"Train workers": ("RayTrainWorker",),
         "Train controller and helpers": ("TrainController", "PlacementGroupCleaner",
                                          "PreemptionWatcher", "SynchronizationActor"),
         "Ray daemons": ("raylet", "gcs_server", "dashboard", "agent", "log_monitor",
                         "monitor.py", "ray::IDLE", "default_worker")}


class CpuByRole:
    """CPU-seconds per wall-second of every process on this machine, grouped by role, while
    the ``with`` block runs. ``/proc`` is sampled every 0.5 s, so processes that start and
    end inside the block (Ray's workers) are counted up to their last sample."""

    def __init__(self) -> None:
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()

    def _role(self, pid: int, cmdline: str) -> str:
        if pid == os.getpid():
            return "this driver"
        return next((role for role, keys in ROLES.items() if any(k in cmdline for k in keys)),
                    "everything else")

    def _sample(self, start: bool = False) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # the process ended between listing and reading
                continue
            cpu = cpu_seconds(stat_fields(stat))
            pid = int(entry.name)
            if start:
                self.first[pid] = cpu
            if not cmd and pid in self.last:  # exited, not yet reaped: its command line is
                self.last[pid] = (self.last[pid][0], cpu)  # gone, its CPU time is not
            else:
                self.last[pid] = (self._role(pid, cmd or stat), cpu)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self._sample()

    def __enter__(self) -> CpuByRole:
        self._sample(start=True)
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()
        wall = time.perf_counter() - self.t0
        used: dict[str, float] = {}
        for pid, (role, cpu) in self.last.items():
            used[role] = used.get(role, 0.0) + cpu - self.first.get(pid, 0.0)
        self.cores = {role: round(sec / wall, 2) for role, sec in sorted(used.items())}


def measure(label: str, spec: dict) -> dict:
    """Train ``spec`` on the Ray this process is connected to; steady-state images/s."""
    print(f"{label}: {spec['train']['epochs']} epochs ...", flush=True)
    with CpuByRole() as cpu:
        rates, wall = fit_rates(validate_spec(spec), num_classes=10)
    steady = statistics.median(rates[1:]) if len(rates) > 1 else rates[0]
    nodes = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
    print(f"  {steady:.0f} images/s (per epoch: {', '.join(f'{r:.0f}' for r in rates)}); "
          f"{wall:.0f} s wall; {nodes} node(s); cores used: {cpu.cores}", flush=True)
    return {"label": label, "nodes": nodes, "workers": spec["resources"]["num_workers"],
            "images_per_s": rates, "steady_images_per_s": steady, "wall_s": wall,
            "cores_used": cpu.cores}


def _plain_process(rank: int, world: int, port: int, spec_raw: dict, out: str) -> None:
    """One process of the no-Ray ceiling (:func:`benchlib.plain_rates`)."""
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    rates = plain_rates(validate_spec(spec_raw), rank, world)
    if rank == 0:
        Path(out).write_text(json.dumps(rates))
    if world > 1:
        dist.destroy_process_group()


def plain(workdir: str, epochs: int, limit: int, workers: int) -> dict:
    """The ceiling: ``workers`` plain processes, no Ray running."""
    label = f"no Ray, {workers} process(es)"
    print(f"{label}: {epochs} epochs ...", flush=True)
    out = str(Path(workdir) / f"plain-{workers}.json")
    mp.spawn(_plain_process, args=(workers, free_port(), bench_spec(workdir, epochs, limit,
                                                                    workers), out),
             nprocs=workers)
    rates = json.loads(Path(out).read_text())
    steady = statistics.median(rates[1:]) if len(rates) > 1 else rates[0]
    print(f"  {steady:.0f} images/s (per epoch: {', '.join(f'{r:.0f}' for r in rates)})",
          flush=True)
    return {"label": label, "nodes": 1, "workers": workers, "images_per_s": rates,
            "steady_images_per_s": steady}


def one_node(workdir: str, epochs: int, limit: int) -> list[dict]:
    init_ray(num_cpus=2, log_to_driver=False)
    try:
        return [measure(f"1 node, {w} worker(s)", bench_spec(workdir, epochs, limit, w))
                for w in (1, 2)]
    finally:
        ray.shutdown()


def two_nodes(workdir: str, epochs: int, limit: int) -> dict:
    """A head and one more raylet, 1 CPU each, with the head's dashboard pinned (see
    :mod:`oodlab.cluster.ray_local` for why Ray Train needs the pin beside another Ray)."""
    from ray.cluster_utils import Cluster

    port = free_port()
    api = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    os.environ.update(api)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": port, "env_vars": api})
    cluster.add_node(num_cpus=1, env_vars=api)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": api | {"RAY_USAGE_STATS_ENABLED": "0"}})
        return measure("2 nodes, 2 workers", bench_spec(workdir, epochs, limit, 2))
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (first is warm-up)")
    parser.add_argument("--limit", type=int, default=12_000,
                        help="Fashion-MNIST training images per epoch (all workers together)")
    parser.add_argument("--no-two-nodes", action="store_true", help="skip the 2-node run")
    parser.add_argument("--out", default="bench/results/scaling.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    head = header("scaling", "bench/scaling.py", argv)
    with tempfile.TemporaryDirectory() as tmp:
        ceiling = [plain(tmp, args.epochs, args.limit, w) for w in (1, 2)]
        runs = one_node(tmp, args.epochs, args.limit)
        if not args.no_two_nodes:
            runs.append(two_nodes(tmp, args.epochs, args.limit))
    for group in (ceiling, runs):
        base = group[0]["steady_images_per_s"]
        for r in group:
            r["efficiency"] = r["steady_images_per_s"] / (r["workers"] * base)
    base, roof = runs[0]["steady_images_per_s"], ceiling[0]["steady_images_per_s"]
    summary = [{"figure": f"scaling efficiency, {r['label']} vs 1 worker (1 CPU each; "
                          f"{r['steady_images_per_s']:.0f} vs {base:.0f} images/s)",
                "value": f"{r['efficiency']:.2f}",
                "goal": f"≥ {GOAL}" if r["nodes"] == 1 else "–",
                "met": r["efficiency"] >= GOAL if r["nodes"] == 1 else None}
               for r in runs[1:]]
    summary.append({"figure": f"scaling efficiency without Ray (the ceiling), 2 vs 1 plain "
                              f"process ({ceiling[1]['steady_images_per_s']:.0f} vs "
                              f"{roof:.0f} images/s)",
                    "value": f"{ceiling[1]['efficiency']:.2f}", "goal": "–", "met": None})
    result = head | {"goal_efficiency_one_node": GOAL, "epochs": args.epochs,
                     "limit": args.limit, "batch_size_per_worker": 128, "runs": runs,
                     "ceiling": ceiling, "summary": summary}
    out = write_result(args.out, result)
    for r in ceiling + runs:
        print(f"{r['label']}: {r['steady_images_per_s']:.0f} images/s, "
              f"efficiency {r['efficiency']:.2f}" +
              (f", cores used {r['cores_used']}" if "cores_used" in r else ""))
    met = runs[1]["efficiency"] >= GOAL
    print(f"1 -> 2 workers on one node: {runs[1]['efficiency']:.2f} "
          f"(goal >= {GOAL}: {'met' if met else 'missed'}; without Ray "
          f"{ceiling[1]['efficiency']:.2f}); written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
