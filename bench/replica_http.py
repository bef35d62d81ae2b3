"""The replica over HTTP without Ray: its cost per image, on a core of its own.

Run:  .venv/bin/python bench/replica_http.py [--images-per-request 1 8] [--requests 2000]
      [--core 1] [--out bench/results/replica_http.json]

The service's replica class (:class:`oodlab.serve.app.Scorer`: its FastAPI app, its
``@serve.batch`` queue, its decode-and-forward thread) runs under uvicorn in a child process
held to ``--core`` (Linux), with one torch thread; the load client (``serve_load.load``:
aiohttp, keep-alive, 32 concurrent clients) runs in this process on the other cores. No Ray,
no proxy, no HAProxy: what the replica itself costs per image, separated from the front end
and from a load client in its own process (``serve_load.py``'s *replica alone* shares its
event loop with the client). Before and after each request shape, this process measures the
raw forward on the replica's core with one thread, and the shape's images/s is divided by
their mean. The replica's CPU time per image comes from ``/proc``.

To compare two versions of the replica's code on the same machine, run this script from a
worktree of each, back to back, more than once (the machine is noisy)::

    git worktree add /tmp/base <commit>
    (cd /tmp/base && PYTHONPATH=platform /work/main/.venv/bin/python bench/replica_http.py ...)

By default the detector is the quickstart architecture (SmallCNN, width 16, energy score),
registered untrained in a temporary MLflow store, as in ``serve_load.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_seconds, header, stat_fields, write_result
from serve_load import (
    load,
    load_registered,
    outside_serve,
    raw_throughput,
    register_untrained,
    sample_pngs,
)


def serve(port: int, ref: str, version: str, uri: str, max_batch_size: int,
          batch_wait_ms: float) -> None:
    """The child: one replica under uvicorn on ``port`` (this process already on its core)."""
    import uvicorn

    from oodlab.serve import app
    from oodlab.serve.config import ModelConfig

    with outside_serve(1):
        scorer = app.Scorer({"device": "cpu"})
        api = app.build_api(scorer)
        config = ModelConfig(model=ref, version=version, tracking_uri=uri,
                             max_batch_size=max_batch_size,
                             batch_wait_timeout_s=batch_wait_ms / 1000).model_dump()

        async def load_model() -> None:
            await scorer.reconfigure(config)

        api.router.on_startup.append(load_model)
        uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def replica_cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (Linux)."""
    return cpu_seconds(stat_fields(Path(f"/proc/{pid}/stat").read_text()))


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the replica exited with {proc.returncode} before it answered")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the replica did not answer {url}/healthz in {timeout_s:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images-per-request", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=2000, help="requests per shape")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--core", type=int, default=1,
                        help="the replica's core (this process takes the others)")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--out", default="bench/results/replica_http.json")
    parser.add_argument("--serve", nargs=4, metavar=("PORT", "REF", "VERSION", "URI"),
                        help=argparse.SUPPRESS)  # the child's own entry
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), *args.serve[1:], args.max_batch_size, args.batch_wait_ms)
        return 0
    cores = set(range(os.cpu_count() or 1))
    if args.core not in cores or len(cores) < 2:
        raise SystemExit(f"--core {args.core}: needs a core of {sorted(cores)} and another "
                         "for the load client")
    head = header("replica_http", "bench/replica_http.py", argv)
    with tempfile.TemporaryDirectory() as tmp:
        ref, uri = register_untrained(tmp, "small_cnn", 16)
        version, detector = load_registered(ref, uri)
        shape = (1, 28, 28)

        def raw() -> float:  # on the replica's core, one thread, the replica idle
            os.sched_setaffinity(0, {args.core})
            try:
                return raw_throughput(detector, shape, args.max_batch_size, 1, seconds=2.0)
            finally:
                os.sched_setaffinity(0, cores - {args.core})

        b64 = [base64.b64encode(png).decode() for png in sample_pngs(64, shape)]
        url = f"http://127.0.0.1:{args.port}"
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        child = [sys.executable, __file__, "--serve", str(args.port), ref, version, uri,
                 "--max-batch-size", str(args.max_batch_size),
                 "--batch-wait-ms", str(args.batch_wait_ms)]
        proc = subprocess.Popen(child, env=env, preexec_fn=lambda: os.sched_setaffinity(
            0, {args.core}))
        rows = []
        try:
            wait_ready(url, proc)
            for k in args.images_per_request:
                bodies = [json.dumps({"images": [b64[(i * k + j) % len(b64)]
                                                 for j in range(k)]}).encode()
                          for i in range(args.requests)]
                before = raw()
                cpu0, t0 = replica_cpu_seconds(proc.pid), time.perf_counter()
                result = asyncio.run(load(url, bodies, args.concurrency))
                # CPU over the whole call, warm-up requests (serve_load.drive's 20) included
                cpu, wall = replica_cpu_seconds(proc.pid) - cpu0, time.perf_counter() - t0
                images = result["images"] + k * min(20, len(bodies))
                after = raw()
                assert result["failures"] == 0, result
                mean_raw = (before + after) / 2
                row = {"images_per_request": k, "raw_before": before, "raw_after": after,
                       **result, "replica_cpu_ms_per_image": 1000 * cpu / images,
                       "replica_cores_busy": cpu / wall,
                       "vs_raw": result["images_per_s"] / mean_raw}
                rows.append(row)
                print(f"{k} image(s)/request: {result['images_per_s']:.0f} images/s "
                      f"(p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms), "
                      f"{row['replica_cpu_ms_per_image']:.3f} ms replica CPU per image, "
                      f"replica core {100 * row['replica_cores_busy']:.0f} % busy; raw "
                      f"forward {before:.0f} before, {after:.0f} after: "
                      f"{row['vs_raw']:.2f}x raw", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    out = write_result(args.out, head | {
        "replica": {"core": args.core, "torch_threads": 1, "max_batch_size": args.max_batch_size,
                    "batch_wait_ms": args.batch_wait_ms, "concurrency": args.concurrency},
        "model": {"arch": "small_cnn", "width": 16, "trained": False},
        "summary": [{"figure": f"replica over HTTP without Ray, own core: images/s ÷ raw "
                               f"forward on that core, {r['images_per_request']} image(s)/"
                               f"request (p50 {r['p50_ms']:.0f} / p99 {r['p99_ms']:.0f} ms)",
                     "value": f"{r['vs_raw']:.2f}"} for r in rows],
        "rows": rows})
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
