"""The replica over HTTP without Ray: its cost per image, on a core of its own.

Run:  .venv/bin/python bench/replica_http.py [--images-per-request 1 8] [--requests 2000]
      [--core 1] [--keep-heap-mb 64] [--out bench/results/replica_http.json]
      [--body json npy --repeats 3]          # request bodies compared, alternated, in one run
      [--models small_cnn:16 small_cnn:64 resnet18:64 --seconds 8]   # a model-cost sweep
      [--plot-from RUN.json ... --figure F.png]                      # several sweeps in one

The service's replica class (:class:`oodlab.serve.app.Scorer`: its FastAPI app, its
``@serve.batch`` queue, its decode-and-forward thread) runs under uvicorn in a child process
held to ``--core`` (Linux), with one torch thread; the load client (``serve_load.load``:
aiohttp, keep-alive, 32 concurrent clients) runs in this process on the other cores. No Ray,
no proxy, no HAProxy: what the replica itself costs per image, separated from the front end
and from a load client in its own process (``serve_load.py``'s *replica alone* shares its
event loop with the client). Before and after each request shape, this process measures the
raw forward on the replica's core with one thread, and the shape's images/s is divided by
their mean. The replica's CPU time per image comes from ``/proc``, and its split from the
replica's own counters (``GET /v1/model``'s ``stats``): its batch stage decoding, the same
stage in the forward pass (the forward as served, beside the raw one), and the rest (the
event loop's HTTP, JSON and batching, and any other thread), with the stage's minor page
faults a batch. ``--keep-heap-mb`` sets the replica's ``AppArgs.keep_heap_mb`` and this
process's heap alike, so the raw forward runs under the replica's allocator settings
(:mod:`oodlab.cluster.heap`). First, an echo app (FastAPI
under uvicorn, parsing the body and scoring nothing) on the same core gives the HTTP
floor of each request shape, and each shape's requests/s is also divided by it.

``--body`` names the request bodies to send (``serve_load.request_bodies``): ``json``, base64
PNGs in JSON (the default), and ``npy``, the same pixels as one ``.npy`` batch, which the
replica reads without decoding. With several, each request shape is measured with each body
in turn, ``--repeats`` times over: pairs measured minutes apart on the same replica.

To compare two versions of the replica's code on the same machine, run this script from a
worktree of each, back to back, more than once (the machine is noisy)::

    git worktree add /tmp/base <commit>
    (cd /tmp/base && PYTHONPATH=platform /work/main/.venv/bin/python bench/replica_http.py ...)

By default the detector is the quickstart architecture (SmallCNN, width 16, energy score),
registered untrained in a temporary MLflow store, as in ``serve_load.py``. With several
``--models`` the run also writes a figure beside ``--out`` (``.png``): images/s ÷ raw against
the raw forward's cost per image, with the curve ``f / (f + o)`` that a fixed serving cost of
``o`` ms per image (decoding, HTTP, batching, beside a forward of ``f`` ms) predicts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import header, write_result
from oodlab.cluster.heap import keep_freed_heap
from serve_load import (
    BODIES,
    add_replica_args,
    cpu_text,
    echo_api,
    load,
    load_registered,
    measure_replica,
    outside_serve,
    raw_throughput,
    register_untrained,
    request_bodies,
    wait_port_free,
)


def serve(port: int, ref: str, version: str, uri: str, max_batch_size: int,
          batch_wait_ms: float, batch_stage: str, keep_heap_mb: int) -> None:
    """The child: one replica under uvicorn on ``port`` (this process already on its core)."""
    import uvicorn

    from oodlab.serve import app
    from oodlab.serve.config import ModelConfig

    with outside_serve(1):
        scorer = app.Scorer({"device": "cpu", "batch_stage": batch_stage,
                             "keep_heap_mb": keep_heap_mb})
        api = app.build_api(scorer)
        config = ModelConfig(model=ref, version=version, tracking_uri=uri,
                             max_batch_size=max_batch_size,
                             batch_wait_timeout_s=batch_wait_ms / 1000).model_dump()

        async def load_model() -> None:
            await scorer.reconfigure(config)

        api.router.on_startup.append(load_model)
        uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def echo(port: int) -> None:
    """The child's echo: ``serve_load.py``'s echo floor app under uvicorn, without Serve."""
    import uvicorn

    uvicorn.run(echo_api(), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)


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
    parser.add_argument("--models", nargs="+", default=["small_cnn:16"], metavar="ARCH:WIDTH",
                        help="untrained detectors to serve in turn (default small_cnn:16, the "
                             "quickstart's); several, e.g. small_cnn:16 small_cnn:64 "
                             "resnet18:64, show the serving cost per image against the "
                             "model's own, and plot it")
    parser.add_argument("--images-per-request", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests per shape (at most)")
    parser.add_argument("--seconds", type=float,
                        help="fewer requests for a slow model: about this many seconds of raw "
                             "forward per shape (at least 100 requests)")
    parser.add_argument("--body", nargs="+", choices=BODIES, default=["json"],
                        help="request bodies, each measured in turn (default json): base64 "
                             "PNGs in JSON; npy, the same pixels as one .npy batch")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every shape and body this many times, alternating")
    parser.add_argument("--concurrency", type=int, default=32)
    add_replica_args(parser)
    parser.add_argument("--core", type=int, default=1,
                        help="the replica's core (this process takes the others)")
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--out", default="bench/results/replica_http.json")
    parser.add_argument("--plot-from", nargs="+", metavar="JSON",
                        help="only draw the figure of earlier runs' rows (all in one) to "
                             "--figure; measures nothing")
    parser.add_argument("--figure", help="the figure's path (default: --out's, as .png)")
    parser.add_argument("--serve", nargs=4, metavar=("PORT", "REF", "VERSION", "URI"),
                        help=argparse.SUPPRESS)  # the child's own entry
    parser.add_argument("--echo", type=int, metavar="PORT", help=argparse.SUPPRESS)  # and its echo
    args = parser.parse_args(argv)
    if args.plot_from and not args.figure:
        parser.error("--plot-from needs --figure")
    for m in args.models:
        arch, _, width = m.partition(":")
        if not width.isdigit():
            parser.error(f"--models {m!r}: expected ARCH:WIDTH, e.g. small_cnn:16")
    return args


def start_child(child_args: list[str], args: argparse.Namespace) -> subprocess.Popen:
    """This script as a child held to ``args.core``, one torch/OpenMP thread."""
    wait_port_free(args.port)
    return subprocess.Popen([sys.executable, __file__, *child_args],
                            env=os.environ | {"OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: os.sched_setaffinity(0, {args.core}))


def echo_key(k: int, body: str) -> str:
    """The echo floor's key for ``k`` images per request in ``body`` bodies ("8", "8 npy")."""
    return str(k) if body == "json" else f"{k} {body}"


def measure_echo(args: argparse.Namespace) -> dict[str, dict]:
    """The HTTP floor on the replica's core, per request shape and body (:func:`echo_key`):
    the echo app's load result."""
    proc = start_child(["--echo", str(args.port)], args)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_ready(url, proc)
        out = {}
        for k in args.images_per_request:
            for body in args.body:
                bodies = request_bodies((1, 28, 28), k, args.requests, body)
                f = out[echo_key(k, body)] = asyncio.run(load(url, bodies, args.concurrency))
                print(f"echo, {k} image(s)/request, {body}: {f['requests_per_s']:.0f} "
                      f"requests/s (p50 {f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms)",
                      flush=True)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def measure_model(args: argparse.Namespace, arch: str, width: int, cores: set[int],
                  floor: dict[str, dict]) -> list[dict]:
    """Every request shape against one untrained ``arch`` detector served on ``args.core``."""
    with tempfile.TemporaryDirectory() as tmp:
        ref, uri = register_untrained(tmp, arch, width)
        version, detector = load_registered(ref, uri)
        prep = detector.preprocessing
        shape = (prep["channels"], prep["image_size"], prep["image_size"])

        def raw() -> float:  # on the replica's core, one thread, the replica idle
            os.sched_setaffinity(0, {args.core})
            try:
                return raw_throughput(detector, shape, args.max_batch_size, 1, seconds=2.0)
            finally:
                os.sched_setaffinity(0, cores - {args.core})

        url = f"http://127.0.0.1:{args.port}"
        child = ["--serve", str(args.port), ref, version, uri,
                 "--max-batch-size", str(args.max_batch_size),
                 "--batch-wait-ms", str(args.batch_wait_ms),
                 "--batch-stage", args.batch_stage, "--keep-heap-mb", str(args.keep_heap_mb)]
        proc = start_child(child, args)
        rows = []
        try:
            wait_ready(url, proc)
            runs = [(r, k, body) for r in range(args.repeats) for k in args.images_per_request
                    for body in args.body]
            for repeat, k, body in runs:
                before = raw()
                n = args.requests if args.seconds is None else max(
                    100, min(args.requests, int(args.seconds * before / k)))
                bodies = request_bodies(shape, k, n, body)
                result = measure_replica(url, bodies, args.concurrency, proc.pid)
                after = raw()
                assert result["failures"] == 0, result
                mean_raw = (before + after) / 2
                cpu_ms = result["replica_cpu_ms_per_image"]
                row = {"arch": arch, "width": width, "images_per_request": k, "body": body,
                       "repeat": repeat, "raw_before": before, "raw_after": after, **result,
                       "forward_ms_per_image": 1000 / mean_raw,
                       "beyond_forward_ms_per_image": cpu_ms - 1000 / mean_raw,
                       "vs_raw": result["images_per_s"] / mean_raw,
                       "vs_echo": (result["requests_per_s"]
                                   / floor[echo_key(k, body)]["requests_per_s"])}
                rows.append(row)
                print(f"{arch}:{width}, {k} image(s)/request, {body}: "
                      f"{result['images_per_s']:.0f} "
                      f"images/s (p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} "
                      f"ms), {cpu_ms:.3f} ms replica CPU per image, of which "
                      f"{row['beyond_forward_ms_per_image']:.3f} beyond the raw forward; "
                      f"{cpu_text(row)}; "
                      f"replica core {100 * row['replica_cores_busy']:.0f} % busy; raw "
                      f"forward {before:.0f} before, {after:.0f} after: "
                      f"{row['vs_raw']:.2f}x raw, {row['vs_echo']:.2f}x the echo's "
                      "requests/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return rows


def body_text(row: dict) -> str:
    """How a row's requests were sent, where not the default JSON (and its repeat)."""
    return (f", {row['body']} bodies" if row.get("body", "json") != "json" else "") + (
        f", repeat {row['repeat'] + 1}" if row.get("repeat") else "")


def plot(rows: list[dict], path: Path) -> None:
    """÷ raw against the raw forward's cost per image, one series per request shape, with the
    curve f / (f + o) of a fixed serving cost o per image (the shape's median)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    xs = np.geomspace(min(r["forward_ms_per_image"] for r in rows) / 1.5,
                      max(r["forward_ms_per_image"] for r in rows) * 1.5, 100)
    for k, body in sorted({(r["images_per_request"], r.get("body", "json")) for r in rows}):
        mine = [r for r in rows if (r["images_per_request"], r.get("body", "json")) == (k, body)]
        o = float(np.median([r["beyond_forward_ms_per_image"] for r in mine]))
        dots = ax.plot([r["forward_ms_per_image"] for r in mine], [r["vs_raw"] for r in mine],
                       "o", label=f"{k} image(s)/request" + (f", {body}" if body != "json" else ""))
        ax.plot(xs, xs / (xs + o), "--", color=dots[0].get_color(), lw=1,
                label=f"f / (f + {o:.2f} ms)")
        named = set()
        for r in mine:
            if (name := f"{r['arch']}:{r['width']}") in named:
                continue  # one label per model when several runs are plotted
            named.add(name)
            ax.annotate(name, (r["forward_ms_per_image"], r["vs_raw"]),
                        fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.axhline(0.7, color="grey", lw=0.8, ls=":", label="goal at 8 images/request: 0.7")
    ax.set_xscale("log")
    ax.set_ylim(0, max(1.05, max(r["vs_raw"] for r in rows) + 0.05))
    ax.set_xlabel("raw forward f, ms of one core per image (batch 32, one thread)")
    ax.set_ylabel("replica images/s ÷ raw forward")
    ax.set_title("One replica on one core, over HTTP: serving cost against model cost",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), *args.serve[1:], args.max_batch_size, args.batch_wait_ms,
              args.batch_stage, args.keep_heap_mb)
        return 0
    if args.echo:
        echo(args.echo)
        return 0
    if args.plot_from:
        rows = [r for f in args.plot_from for r in json.loads(Path(f).read_text())["rows"]]
        plot(rows, Path(args.figure))
        print(f"figure {args.figure}: {len(rows)} rows of {len(args.plot_from)} run(s)")
        return 0
    cores = set(range(os.cpu_count() or 1))
    if args.core not in cores or len(cores) < 2:
        raise SystemExit(f"--core {args.core}: needs a core of {sorted(cores)} and another "
                         "for the load client")
    head = header("replica_http", "bench/replica_http.py", argv)
    heap_set = keep_freed_heap(args.keep_heap_mb)  # the raw forward's heap as the replica's
    models = [(m.partition(":")[0], int(m.partition(":")[2])) for m in args.models]
    floor = measure_echo(args)
    rows = [row for arch, width in models
            for row in measure_model(args, arch, width, cores, floor)]
    figure = None
    if len(models) > 1:
        figure = Path(args.figure or Path(args.out).with_suffix(".png"))
        figure.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, figure)
    out = write_result(args.out, head | {
        "replica": {"core": args.core, "torch_threads": 1, "batch_stage": args.batch_stage,
                    "keep_heap_mb": args.keep_heap_mb, "heap_set": heap_set,
                    "max_batch_size": args.max_batch_size,
                    "batch_wait_ms": args.batch_wait_ms, "concurrency": args.concurrency},
        "bodies": args.body, "repeats": args.repeats,
        "models": [{"arch": a, "width": w, "trained": False} for a, w in models],
        "echo": floor,
        "figure": str(figure) if figure else None,
        "summary": [{"figure": f"replica over HTTP without Ray, own core, {r['arch']}:"
                               f"{r['width']}{body_text(r)} ({r['forward_ms_per_image']:.2f} "
                               "ms a forward "
                               f"per image): images/s ÷ raw forward on that core, "
                               f"{r['images_per_request']} image(s)/request (p50 "
                               f"{r['p50_ms']:.0f} / p99 {r['p99_ms']:.0f} ms)",
                     "value": f"{r['vs_raw']:.2f}"} for r in rows]
        + [{"figure": f"replica over HTTP without Ray, own core, {r['arch']}:{r['width']}"
                      f"{body_text(r)}: requests/s ÷ an echo app's on that core, "
                      "1 image/request",
            "value": f"{r['vs_echo']:.2f}"} for r in rows if r["images_per_request"] == 1],
        "rows": rows})
    print(f"written to {out}" + (f"; figure {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
