"""Ray Train loop vs a plain PyTorch loop: images/s with the same model, data and batch size.

Run:  .venv/bin/python bench/train_overhead.py [--epochs 3] [--out FILE.json]

Both loops train ``supervised`` on built-in MNIST with the same SmallCNN, the same seeded
loader, optimizer and schedule, and the same number of torch threads. Two ratios are
written, both measured in this one run:

* ``steady_ratio``: images/s inside the epoch loop (Ray's own per-epoch figure
  ``train/images_per_s`` against the plain loop's), i.e. the cost of DDP-prepare, the Ray
  data-loader wrapper and the per-step Python of our loop. Target >= 0.9.
* ``wall_ratio``: training images / wall-clock seconds of the whole call, including
  Ray worker start-up, per-epoch validation, reports and checkpoints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from benchlib import fit_rates, header, plain_rates, write_result
from oodlab.cluster.ray_local import init_ray
from oodlab.data.bundle import load_bundle
from oodlab.spec import validate_spec


def bench_spec(workdir: str, epochs: int, threads: int) -> dict:
    return {
        "name": "bench-overhead", "seed": 0, "workdir": workdir,
        "data": {"id": "mnist", "batch_size": 128, "val_ood": ["val_letters"],
                 "test_ood": ["letters"], "oe": []},
        "model": {"arch": "small_cnn", "width": 16},
        "method": {"name": "supervised"},
        "train": {"epochs": epochs, "lr": 0.05},
        "eval": {"scores": ["energy"], "epoch_val_limit": 256},
        "resources": {"num_workers": 1, "cpus_per_worker": threads},
    }


def ray_loop(spec) -> tuple[list[float], float, int]:
    """The oodlab Ray Train loop (1 worker): per-epoch images/s, wall seconds, images."""
    import ray

    init_ray(num_cpus=int(spec.resources.cpus_per_worker) + 1, log_to_driver=False)
    bundle = load_bundle(spec, include_test=False)
    rates, wall = fit_rates(spec, num_classes=bundle.num_classes)
    ray.shutdown()
    n = (len(bundle.id_train) // spec.data.batch_size) * spec.data.batch_size
    return rates, wall, n * spec.train.epochs


def measure(epochs: int, threads: int) -> dict:
    """Both loops with ``threads`` torch threads, one after the other."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = validate_spec(bench_spec(tmp, epochs, threads))
        print(f"plain PyTorch loop, {threads} thread(s), {epochs} epochs ...", flush=True)
        t0 = time.perf_counter()
        plain = plain_rates(spec)
        plain_wall = time.perf_counter() - t0
        print(f"Ray Train loop, 1 worker with {threads} CPU(s), {epochs} epochs ...", flush=True)
        ray_rates, ray_wall, images = ray_loop(spec)
    # the first epoch warms up allocators and threads in both loops: compare the rest
    return {
        "threads": threads, "epochs": epochs, "batch_size": 128,
        "plain_images_per_s": plain, "ray_images_per_s": ray_rates,
        "steady_ratio": statistics.median(ray_rates[1:]) / statistics.median(plain[1:]),
        "wall_ratio": (images / ray_wall) / (images / plain_wall),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads (= Ray CPUs per worker) to measure, each in turn")
    parser.add_argument("--out", default="bench/results/train_overhead.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    head = header("train_overhead", "bench/train_overhead.py", argv)
    runs = [measure(args.epochs, threads) for threads in args.threads]
    result = head | {
        "target_steady_ratio": 0.9,
        "runs": runs,
    }
    out = write_result(args.out, result)
    for r in runs:
        print(f"{r['threads']} thread(s): steady-state Ray/plain images/s {r['steady_ratio']:.3f} "
              f"(target >= 0.9); wall-clock incl. Ray start-up, validation, checkpoints "
              f"{r['wall_ratio']:.3f}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
