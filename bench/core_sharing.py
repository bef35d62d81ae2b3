"""The replica's batch stage on a core it shares with its event loop's kind of work.

Run:  .venv/bin/python bench/core_sharing.py [--core 1] [--batch 27] [--repeats 3]
      [--out bench/results/core_sharing.json]

A replica on one CPU runs its event loop (HTTP, JSON, batching) and its batch thread
(:func:`oodlab.serve.app.decode_and_forward`: decoding, then the forward pass) on the same
core. Served, the forward costs that thread more CPU per image than the raw forward
(``bench/replica_http.py``, ``bench/serve_load.py``). This script asks whether sharing the
core alone does it, with no HTTP and no Ray: in one process held to ``--core``, the batch
stage scores batches of ``--batch`` PNGs in a thread, first alone, then beside a thread that
validates 8-image JSON bodies as the replica's event loop does
(:func:`oodlab.serve.payload.from_json`), without pause; and third, ``between``, with that
JSON work on the stage's own thread between batches (as much CPU after each batch as the
batch took, about the share the rival thread gets), which is what a replica does with its
batch stage on the event loop (``AppArgs.batch_stage = "loop"``). The batch stage's CPU per
image (decoding, forward: the replica's own ``stats`` counters) is compared between the
three, and with ``Detector.score`` on one fixed batch, alone (the raw forward). The three
alternate ``--repeats`` times (the machine is noisy).

By default the detector is the quickstart architecture (SmallCNN, width 16), untrained.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import torch

from benchlib import header, write_result
from serve_load import load_registered, register_untrained, sample_pngs

MODES = ("alone", "shared", "between")


def batch_stage_cpu(items: list, batches: int, mode: str, body: bytes) -> dict[str, float]:
    """CPU ms per image of the batch stage in a thread: ``alone``, ``shared`` (beside a
    JSON-validating thread) or ``between`` (validating JSON itself between batches, for as
    much CPU as each batch took); the wall time per image, and the bodies validated (by the
    rival thread, or on the stage's thread between batches), and the stage's page faults a
    batch."""
    from oodlab.serve.app import decode_and_forward
    from oodlab.serve.payload import from_json

    stop = threading.Event()

    bodies = [0]

    def event_loop_work() -> None:
        while not stop.is_set():
            from_json(body)
            bodies[0] += 1

    rival = threading.Thread(target=event_loop_work) if mode == "shared" else None
    stats = {"decode_cpu_s": 0.0, "forward_cpu_s": 0.0, "minor_faults": 0}
    wall: list[float] = []

    def stage() -> None:
        decode_and_forward(items, 10**7)  # warm-up, not counted
        t0 = time.perf_counter()
        for _ in range(batches):
            start = time.thread_time()
            decode_and_forward(items, 10**7, stats)
            if mode == "between":  # the event loop's turn, on this thread
                end = 2 * time.thread_time() - start
                while time.thread_time() < end:
                    from_json(body)
                    bodies[0] += 1
        wall.append(time.perf_counter() - t0)

    if rival:
        rival.start()
    worker = threading.Thread(target=stage)
    worker.start()
    worker.join()
    stop.set()
    if rival:
        rival.join()
    images = batches * len(items)
    return {"decode_cpu_ms_per_image": 1000 * stats["decode_cpu_s"] / images,
            "forward_cpu_ms_per_image": 1000 * stats["forward_cpu_s"] / images,
            "wall_ms_per_image": 1000 * wall[0] / images, "bodies_validated": bodies[0],
            "minor_faults_per_batch": stats["minor_faults"] / batches}


def raw_cpu(detector, batch: int, batches: int) -> float:
    """CPU ms per image of ``Detector.score`` on one fixed batch (this thread)."""
    x = torch.rand(batch, 1, 28, 28)
    detector.score(x)
    t0 = time.thread_time()
    for _ in range(batches):
        detector.score(x)
    return 1000 * (time.thread_time() - t0) / (batches * batch)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--core", type=int, default=1, help="the one core for everything")
    parser.add_argument("--batch", type=int, default=27,
                        help="images per batch (27: near the service's mean batch)")
    parser.add_argument("--batches", type=int, default=150, help="batches per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--out", default="bench/results/core_sharing.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = os.sched_getaffinity(0)
    if args.core not in cores:
        raise SystemExit(f"--core {args.core}: not one of this process's cores {sorted(cores)}")
    head = header("core_sharing", "bench/core_sharing.py", argv)
    os.sched_setaffinity(0, {args.core})  # this thread; the threads it starts inherit it
    torch.set_num_threads(1)
    from oodlab.serve.payload import RawImage

    with tempfile.TemporaryDirectory() as tmp:
        ref, uri = register_untrained(tmp, "small_cnn", args.width)
        _, detector = load_registered(ref, uri)
    loaded = SimpleNamespace(detector=detector)
    pngs = sample_pngs(64, (1, 28, 28))
    items = [(loaded, RawImage(f"images[{i}]", data=pngs[i % 64])) for i in range(args.batch)]
    body = json.dumps({"images": [base64.b64encode(p).decode() for p in pngs[:8]]}).encode()
    rows = []
    for r in range(args.repeats):
        row = {"repeat": r, "raw_cpu_ms_per_image": raw_cpu(detector, args.batch, args.batches),
               **{mode: batch_stage_cpu(items, args.batches, mode, body) for mode in MODES}}
        for mode in ("shared", "between"):
            row[f"forward_{mode}_vs_alone"] = (row[mode]["forward_cpu_ms_per_image"]
                                               / row["alone"]["forward_cpu_ms_per_image"])
        rows.append(row)
        print(f"repeat {r}: raw forward {row['raw_cpu_ms_per_image']:.3f} ms CPU an image; "
              f"batch stage alone: decoding {row['alone']['decode_cpu_ms_per_image']:.3f} + "
              f"forward {row['alone']['forward_cpu_ms_per_image']:.3f}; sharing its core: "
              f"decoding {row['shared']['decode_cpu_ms_per_image']:.3f} + forward "
              f"{row['shared']['forward_cpu_ms_per_image']:.3f} "
              f"({row['forward_shared_vs_alone']:.2f}x alone); taking turns on its thread: "
              f"forward {row['between']['forward_cpu_ms_per_image']:.3f} "
              f"({row['forward_between_vs_alone']:.2f}x alone)", flush=True)

    def median(key: str) -> str:
        values = sorted(r[key] for r in rows)
        return f"{values[len(values) // 2]:.2f}"

    out = write_result(args.out, head | {
        "core": args.core, "batch": args.batch, "batches": args.batches,
        "model": {"arch": "small_cnn", "width": args.width, "trained": False},
        "summary": [{"figure": "batch stage's forward CPU per image, sharing its core with "
                               "JSON validation ÷ alone (median of repeats)",
                     "value": median("forward_shared_vs_alone")},
                    {"figure": "the same with JSON validation between batches on the "
                               "stage's thread ÷ alone (median of repeats)",
                     "value": median("forward_between_vs_alone")}],
        "rows": rows})
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
