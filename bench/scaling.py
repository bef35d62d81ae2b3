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
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import ray

from benchlib import fit_rates, header, write_result
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


def measure(label: str, spec: dict) -> dict:
    """Train ``spec`` on the Ray this process is connected to; steady-state images/s."""
    print(f"{label}: {spec['train']['epochs']} epochs ...", flush=True)
    rates, wall = fit_rates(validate_spec(spec), num_classes=10)
    steady = statistics.median(rates[1:]) if len(rates) > 1 else rates[0]
    nodes = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
    print(f"  {steady:.0f} images/s (per epoch: {', '.join(f'{r:.0f}' for r in rates)}); "
          f"{wall:.0f} s wall; {nodes} node(s)", flush=True)
    return {"label": label, "nodes": nodes, "workers": spec["resources"]["num_workers"],
            "images_per_s": rates, "steady_images_per_s": steady, "wall_s": wall}


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
        runs = one_node(tmp, args.epochs, args.limit)
        if not args.no_two_nodes:
            runs.append(two_nodes(tmp, args.epochs, args.limit))
    base = runs[0]["steady_images_per_s"]
    for r in runs:
        r["efficiency"] = r["steady_images_per_s"] / (r["workers"] * base)
    summary = [{"figure": f"scaling efficiency, {r['label']} vs 1 worker (1 CPU each; "
                          f"{r['steady_images_per_s']:.0f} vs {base:.0f} images/s)",
                "value": f"{r['efficiency']:.2f}",
                "goal": f"≥ {GOAL}" if r["nodes"] == 1 else "–",
                "met": r["efficiency"] >= GOAL if r["nodes"] == 1 else None}
               for r in runs[1:]]
    result = head | {"goal_efficiency_one_node": GOAL, "epochs": args.epochs,
                     "limit": args.limit, "batch_size_per_worker": 128, "runs": runs,
                     "summary": summary}
    out = write_result(args.out, result)
    for r in runs:
        print(f"{r['label']}: {r['steady_images_per_s']:.0f} images/s, "
              f"efficiency {r['efficiency']:.2f}")
    met = runs[1]["efficiency"] >= GOAL
    print(f"1 -> 2 workers on one node: {runs[1]['efficiency']:.2f} "
          f"(goal >= {GOAL}: {'met' if met else 'missed'}); written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
