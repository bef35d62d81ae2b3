"""Serving under a bounded load on loopback: the service against its HTTP floor and its model.

Run:  .venv/bin/python bench/serve_load.py [--requests 400] [--concurrency 32]
      [--images-per-request 1 8 32] [--ingress proxy haproxy [direct optimized]]
      [--pin-replica-core N] [--replica-gpus N] [--body json|npy] [--keep-heap-mb 64]
      [--out bench/results/serve_load.json]

Four things are measured in one run, each for every request shape (images per request),
with the same fixed number of requests sent by ``--concurrency`` concurrent clients (JSON
with base64 PNGs; ``--body npy``: the same pixels as one ``.npy`` batch a request),
throughput beside p50/p99 latency:

* the HTTP floor: an echo deployment (1 replica, ``--replica-cpus`` CPUs) that parses the
  same body and answers a result list of the same length without decoding or scoring:
  the cost of the front end, the replica and the JSON alone;
* the service: ``oodlab serve``'s own deploy path (1 replica, ``--replica-cpus`` CPUs)
  serving a registered detector, batched (``max_batch_size`` = ``--max-batch-size``), then
  reconfigured in place to ``max_batch_size=1`` (unbatched);
* the raw forward: ``Detector.score`` on ``--max-batch-size`` images (and on 1) in this
  process with as many torch threads as the replica has, once at the start and again just
  before each batched service measurement (Ray up, the replica idle): the service is divided
  by the forward measured beside it, since on a shared VM the forward alone moves by half
  from minute to minute;
* the replica alone: the service's replica class driven in this process through ASGI, batched
  and unbatched, with no proxy, socket or Ray call (:func:`replica_alone`): where the
  service's batched/unbatched ratio is lost, in the replica or around it.

Where the replica's CPU goes is measured beside each service and replica-alone figure: its
batch stage's CPU milliseconds per image decoding and in the forward pass (the replica's
``stats`` counters: the forward as served, beside the raw one), and, for the service, the
replica process's whole CPU per image (``/proc``), whose rest is its event loop (HTTP,
JSON, batching) and Ray's threads. The batch stage's minor page faults a batch are counted
beside it, and the raw forward's too: ``--keep-heap-mb`` (default the replica's,
``AppArgs.keep_heap_mb``; 0 = glibc's defaults) sets the heap of the replica and of this
process alike (:mod:`oodlab.cluster.heap`), so the raw forward runs under the allocator the
replica has.

Goals, reported and not asserted: at 1 image per request the batched service reaches
>= 0.8x the floor's requests/s; at 8 images per request >= 0.7x the raw forward's images/s
and >= 3x the unbatched service. The compute ceiling of batched/unbatched (raw forward at
the batch size / at batch 1) is written beside them.

``--ingress`` lists the front ends to measure (default ``proxy haproxy``), each in a Ray
started for it, the same front for the floor and the service: ``proxy`` is Serve's HTTP
proxy actor in front of the replica; ``optimized`` starts Ray with
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (Ray >= 2.56: user code on the replica's main event loop,
gRPC between proxy and replica, buffered request logs, a frozen garbage collector) and still
sends the load through the proxy; ``direct`` does the same and sends the load to the port
the ingress replica itself listens on (Serve's *direct ingress*); ``haproxy`` also sets
``RAY_SERVE_ENABLE_HA_PROXY=1``, so Serve runs HAProxy (bundled with ``ray[serve]``) on the
HTTP port in place of its Python proxy, forwarding to the replicas' own ports: what
``oodlab serve --ingress haproxy`` runs.

``--pin-replica-core N`` (Linux) holds each replica (the echo's and the service's) to core N
and this process, Ray and the front end to the other cores: Ray's ``num_cpus`` only schedules,
so an unpinned 1-CPU replica's threads spread over every core of a small machine. The raw
forward before each figure then runs on core N too (:func:`on_core`), where the replica runs.
``--replica-gpus`` gives the service's replica a GPU (with the raw forward and the replica
alone on CUDA); ``bench/serve_gpu.sh`` runs that on an accelerator machine.

By default the detector is the quickstart architecture (small_cnn, width 16, energy score),
registered untrained in a temporary MLflow store: throughput does not depend on weight
values. ``--model models:/<name>@<alias> --tracking-uri URI`` measures a registered one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, TypeVar
from unittest import mock

import numpy as np
import torch
from fastapi import Body, FastAPI
from PIL import Image

from benchlib import cpu_seconds, header, stat_fields, write_result
from oodlab.cluster.heap import keep_freed_heap, minor_faults
from oodlab.cluster.ray_local import init_ray
from oodlab.serve.config import BATCH_STAGES, KEEP_HEAP_MB
from oodlab.serve.payload import JSON, NPY, NPY_MAGIC, from_npy

T = TypeVar("T")
BENCH_SPEC = {
    "name": "bench-serve", "seed": 0,
    "data": {"id": "mnist", "val_ood": [], "test_ood": ["letters"], "oe": []},
    "model": {"arch": "small_cnn", "width": 16},
    "method": {"name": "supervised"},
    "eval": {"scores": ["energy"]},
    "tracking": {"experiment": "bench-serve", "model_name": "bench-serve-detector"},
}


def register_untrained(workdir: str, arch: str, width: int) -> tuple[str, str]:
    """Register an untrained detector of the given architecture; (model ref, tracking URI)."""
    from oodlab.detect.detector import Detector
    from oodlab.detect.scores import build_score
    from oodlab.methods import build_method
    from oodlab.spec import validate_spec
    from oodlab.track import tracking

    raw = BENCH_SPEC | {"workdir": workdir, "model": {"arch": arch, "width": width}}
    spec = validate_spec(raw)
    torch.manual_seed(0)
    model = build_method(spec).build(10)
    detector = Detector(model, build_score("energy"), spec=spec.model_dump(mode="json"),
                        num_classes=10, threshold=0.0, meta={"method": "supervised"})
    run_id = tracking.start_run(spec, tags={"oodlab.kind": "bench"})
    tracking.log_detector(spec, run_id, detector)
    tracking.end_run(spec, run_id, ok=True)
    uri = tracking.tracking_uri(spec)
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_registered_model_alias(spec.tracking.model_name, "champion", "1")
    return f"models:/{spec.tracking.model_name}@champion", uri


def sample_images(n: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """``n`` random uint8 images of the model's own shape ``[C, S, S]``: ``[n, C, S, S]``."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def sample_pngs(n: int, shape: tuple[int, int, int], seed: int = 0) -> list[bytes]:
    """``n`` random images of the model's own shape as PNG bytes (decoding is part of it)."""
    out = []
    for arr in sample_images(n, shape, seed):
        img = Image.fromarray(arr[0] if shape[0] == 1 else arr.transpose(1, 2, 0))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


BODIES = ("json", "npy")


def request_bodies(shape: tuple[int, int, int], per_request: int, n: int, body: str,
                   pool: int = 64) -> list[bytes]:
    """``n`` request bodies of ``per_request`` images each, drawn in turn from ``pool``
    random images: ``json``, base64 PNGs in ``{"images": [...]}`` (what most clients send);
    ``npy``, the uint8 pixels as one ``[k, C, S, S]`` ``.npy`` batch (``application/x-npy``)."""
    if body == "json":
        b64 = [base64.b64encode(png).decode() for png in sample_pngs(pool, shape)]
        return [json.dumps({"images": [b64[(i * per_request + j) % pool]
                                       for j in range(per_request)]}).encode()
                for i in range(n)]
    images = sample_images(pool, shape)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        np.save(buf, images[[(i * per_request + j) % pool for j in range(per_request)]])
        out.append(buf.getvalue())
    return out


def content_type(body: bytes) -> str:
    return NPY if body.startswith(NPY_MAGIC) else JSON


def body_images(body: bytes) -> int:
    """Images in one of :func:`request_bodies`'s bodies, read as the service reads them."""
    return len(from_npy(body)) if body.startswith(NPY_MAGIC) else len(json.loads(body)["images"])


def raw_forward(detector, shape: tuple[int, int, int], batch: int, threads: int,
                seconds: float = 3.0) -> dict[str, float]:
    """``detector.score`` on fixed batches, in process, ``threads`` torch threads: images/s,
    and the calling thread's minor page faults a batch. The batch starts on the CPU, as a
    decoded request's does; on a GPU detector the time includes the copy there and the
    scores' copy back (which waits for the GPU)."""
    torch.set_num_threads(threads)
    x = torch.rand(batch, *shape)
    for _ in range(5):
        detector.score(x)
    n, faults, t0 = 0, minor_faults(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        detector.score(x)
        n += 1
    return {"images_per_s": n * batch / (time.perf_counter() - t0),
            "minor_faults_per_batch": (minor_faults() - faults) / n}


def raw_throughput(detector, shape: tuple[int, int, int], batch: int, threads: int,
                   seconds: float = 3.0) -> float:
    """Images/s of :func:`raw_forward`."""
    return raw_forward(detector, shape, batch, threads, seconds)["images_per_s"]


async def drive(post, bodies: list[bytes], concurrency: int, warmup: int = 20) -> dict:
    """Send every body once through ``post`` (a coroutine: body -> HTTP status) from
    ``concurrency`` workers, after ``warmup`` bodies sent one by one; throughput and latency."""
    for body in bodies[:warmup]:
        if (status := await post(body)) != 200:
            raise RuntimeError(f"warm-up request answered {status}")
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    failures = 0

    async def worker() -> None:
        nonlocal failures
        while not queue.empty():
            body = queue.get_nowait()
            t = time.perf_counter()
            failures += await post(body) != 200
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    images = sum(body_images(b) for b in bodies)
    lat = np.asarray(latencies) * 1000
    return {"requests": len(bodies), "images": images, "failures": failures,
            "seconds": wall, "requests_per_s": len(bodies) / wall, "images_per_s": images / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


async def load(url: str, bodies: list[bytes], concurrency: int, path: str = "/v1/score"
               ) -> dict:
    """POST every body (JSON or ``.npy``) once with ``concurrency`` workers on keep-alive
    connections. aiohttp, not httpx: the client shares the CPUs with the server, so it should
    be the cheapest one available."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        async def post(body: bytes) -> int:
            async with client.post(url + path, data=body,
                                   headers={"Content-Type": content_type(body)}) as r:
                await r.read()
                return r.status

        return await drive(post, bodies, concurrency)


def replica_alone(ref: str, version: str, uri: str, shapes: dict[int, list[bytes]],
                  concurrency: int, max_batch_size: int, batch_wait_s: float, cpus: int,
                  device: str = "cpu", stage: str = "auto",
                  keep_heap_mb: int = KEEP_HEAP_MB) -> dict[int, dict]:
    """The service's replica class (:class:`oodlab.serve.app.Scorer`, its FastAPI app,
    ``@serve.batch`` queue and batch stage) driven in this process through ASGI
    (httpx's ``ASGITransport``): no Serve proxy, no sockets, no Ray actor call, only the
    client in the same process. Batched and unbatched images/s per request shape: what
    batching gives a replica when the proxy and the load client do not take its core.

    Outside a Serve replica two Serve lookups are stubbed (:func:`outside_serve`)."""
    import httpx

    from oodlab.serve import app
    from oodlab.serve.config import ModelConfig

    async def run() -> dict[int, dict]:
        scorer = app.Scorer({"device": device, "batch_stage": stage,
                             "keep_heap_mb": keep_heap_mb})
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app.build_api(scorer)),
                                   base_url="http://replica", timeout=120)
        async def post(body: bytes) -> int:
            return (await client.post("/v1/score", content=body,
                                      headers={"content-type": content_type(body)})).status_code

        out: dict[int, dict] = {}
        async with client:
            for k, bodies in shapes.items():
                out[k] = {}
                for mode, size in (("batched", max_batch_size), ("unbatched", 1)):
                    await scorer.reconfigure(ModelConfig(
                        model=ref, version=version, tracking_uri=uri, max_batch_size=size,
                        batch_wait_timeout_s=batch_wait_s).model_dump())
                    before = dict(scorer.stats)
                    out[k][mode] = await drive(post, bodies, concurrency)
                    out[k][mode] |= batch_stage(before, scorer.stats)
                out[k]["batched_vs_unbatched"] = (out[k]["batched"]["images_per_s"]
                                                  / out[k]["unbatched"]["images_per_s"])
        return out

    with outside_serve(cpus):
        return asyncio.run(run())


@contextlib.contextmanager
def outside_serve(cpus: int) -> Iterator[None]:
    """The replica class run outside a Serve replica, where three Serve lookups have no
    answer: its CPU count is ``cpus``, ``@serve.batch`` skips its ``max_ongoing_requests``
    warning, and ``GET /v1/model`` names the replica "outside Serve"."""
    from ray.serve import batching

    from oodlab.serve import app

    warn = "_warn_if_max_batch_size_exceeds_max_ongoing_requests"
    context = SimpleNamespace(replica_tag="outside Serve")
    with mock.patch.object(app, "replica_cpus", return_value=cpus), \
            mock.patch.object(batching._BatchQueue, warn), \
            mock.patch.object(app.serve, "get_replica_context", return_value=context):
        yield


def batch_stage(before: dict, after: dict) -> dict:
    """Between two ``stats`` of a replica (``GET /v1/model``): its mean batch in images, the
    fraction of its batches run on the event loop, its batch stage's CPU milliseconds per
    image decoding and in the forward pass, and its minor page faults a batch."""
    images = max(after["images"] - before["images"], 1)
    batches = max(after["batches"] - before["batches"], 1)
    return {"mean_batch": images / batches,
            "batches_on_loop": (after.get("batches_on_loop", 0)
                                - before.get("batches_on_loop", 0)) / batches,
            "decode_cpu_ms_per_image":
                1000 * (after["decode_cpu_s"] - before["decode_cpu_s"]) / images,
            "forward_cpu_ms_per_image":
                1000 * (after["forward_cpu_s"] - before["forward_cpu_s"]) / images,
            "minor_faults_per_batch": (after.get("minor_faults", 0)
                                       - before.get("minor_faults", 0)) / batches}


def load_registered(ref: str, uri: str) -> tuple[str, Any]:
    """(the version ``ref`` resolves to, its detector) from the registry at ``uri``."""
    from oodlab.serve.config import split_ref
    from oodlab.serve.registry import resolve
    from oodlab.track.tracking import load_detector

    version = resolve(ref, uri).version
    return version, load_detector(f"models:/{split_ref(ref)[0]}/{version}", uri)


ECHO_ROUTE = "/echo"
INGRESS_MODES = ("proxy", "optimized", "direct", "haproxy")


def direct_url(app_name: str, host: str = "127.0.0.1") -> str:
    """The URL at which ``app_name``'s ingress replica answers by itself (direct ingress):
    its own HTTP port, from the Serve controller's target groups (what HAProxy reads)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    for group in ray.get(controller.get_target_groups.remote(app_name)):
        if group.app_name == app_name and group.targets and group.protocol == "HTTP":
            ports = {t.port for t in group.targets}
            if len(ports) != 1:
                raise RuntimeError(f"{app_name}: expected one replica port, got {ports}")
            return f"http://{host}:{ports.pop()}{group.route_prefix.rstrip('/')}"
    raise RuntimeError(f"{app_name}: no direct-ingress target (is "
                       "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 set for the Ray instance?)")


def echo_api() -> FastAPI:
    """The echo floor's app: it parses the body (FastAPI's JSON parsing; an ``.npy`` batch,
    which FastAPI hands over as bytes, as the service reads it) and answers as many results,
    scoring nothing. Its routes take the body as a builtin type: a Serve replica unpickles
    them without this module's globals, so their annotations must be builtins."""
    api = FastAPI()

    @api.post("/v1/score")
    async def score(body: object = Body(...)) -> dict:  # noqa: B008
        from oodlab.serve.payload import from_npy  # as run and measured inside a Serve replica

        n = len(body["images"]) if isinstance(body, dict) else len(from_npy(body))
        return {"model": {"name": "echo", "version": "0", "alias": None}, "threshold": 0.0,
                "results": [{"index": i, "score": 0.0, "is_ood": False} for i in range(n)]}

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return api


def echo_floor(port: int, cpus: int, shapes: dict[int, list[bytes]], concurrency: int,
               direct: bool = False, pin_core: int | None = None) -> dict[int, dict]:
    """The HTTP floor per request shape: an echo deployment with the service's CPUs that
    parses the body and answers as many results, scoring nothing."""
    from ray import serve

    @serve.deployment(name="Echo", ray_actor_options={"num_cpus": cpus},
                      max_ongoing_requests=256)
    @serve.ingress(echo_api())
    class Echo:
        pass

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Echo.bind(), name="echo", route_prefix=ECHO_ROUTE)
    if pin_core is not None:
        pin_replicas(pin_core)
    try:
        url = direct_url("echo") if direct else f"http://127.0.0.1:{port}{ECHO_ROUTE}"
        return {k: asyncio.run(load(url, bodies, concurrency))
                for k, bodies in shapes.items()}
    finally:
        serve.shutdown()  # the service is deployed afresh, through oodlab's REST path
        wait_port_free(port)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc: Ray's raylet, GCS, workers, HAProxy
    are all children of the driver that started Ray)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(stat_fields(f.read())[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        out.append(p := todo.pop())
        todo += children.get(p, [])
    return out


def _pin(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` on ``cores`` (threads it starts later inherit that)."""
    with contextlib.suppress(OSError):  # a process or thread that ended meanwhile
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cores)


def on_core(core: int | None, fn: Callable[[], T]) -> T:
    """``fn()`` with the calling thread held to ``core`` (``None``: left as it is), then its
    affinity restored: the raw forward measured on the pinned replica's own core, while the
    replica waits between figures, not on the core Ray, the front end and the client share."""
    if core is None:
        return fn()
    before = os.sched_getaffinity(0)  # 0: the calling thread (Linux)
    os.sched_setaffinity(0, {core})
    try:
        return fn()
    finally:
        os.sched_setaffinity(0, before)


def replica_pids(app: str = "") -> set[int]:
    """The processes of Serve's live replicas (of application ``app``, or of every one)."""
    from ray.util.state import list_actors

    prefix = f"ServeReplica:{app}:" if app else "ServeReplica:"
    return {a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if a.class_name.startswith(prefix) and a.pid}


def processes_cpu(pids: set[int]) -> float:
    """User + system CPU seconds of ``pids`` so far, all threads (Linux ``/proc``)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            total += cpu_seconds(stat_fields(f.read()))
    return total


def pin_replicas(core: int) -> None:
    """Serve's replicas on ``core`` alone; this process and every other process of its Ray
    (proxy or HAProxy, controller, raylet, GCS, the load client) on the other cores: a
    replica with a core of its own, on a machine too small to give it a node."""
    replicas = replica_pids()
    others = set(range(os.cpu_count() or 1)) - {core}
    pids = _descendants(os.getpid())
    for pid in pids:
        _pin(pid, {core} if pid in replicas else others)
    pinned = sorted(replicas & set(pids))
    print(f"replica process(es) {pinned} on core {core}, {len(pids) - len(pinned)} other "
          f"processes on {sorted(others)}", flush=True)
    if not pinned:
        raise RuntimeError("no Serve replica found below this process to pin")


def wait_port_free(port: int, timeout_s: float = 30.0) -> None:
    """Until nothing answers on ``port`` (an HAProxy being stopped can hold it a moment)."""
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.2)


def cpu_text(result: dict) -> str:
    """:func:`batch_stage`'s CPU per image (and the replica's rest, if measured), as printed."""
    rest = (f" + {result['other_cpu_ms_per_image']:.3f} ms else in the replica"
            if "other_cpu_ms_per_image" in result else "")
    return (f"CPU an image: batch stage {result['decode_cpu_ms_per_image']:.3f} ms decoding "
            f"+ {result['forward_cpu_ms_per_image']:.3f} ms forward{rest}; "
            f"{result.get('minor_faults_per_batch', 0):.0f} page faults a batch")


def model_stats(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/v1/model", timeout=60).json()


def measure_replica(url: str, bodies: list[bytes], concurrency: int, pid: int) -> dict:
    """The load result of ``bodies`` sent to a one-replica service (or a bare replica) at
    ``url``, the replica's batch stage (:func:`batch_stage`) and that replica's whole CPU
    (process ``pid``) per image, warm-up requests included: the rest of it, beside decoding
    and the forward, is the event loop's HTTP, JSON and batching and any other thread (Ray's,
    in a Serve replica)."""
    before, cpu0, t0 = model_stats(url)["stats"], processes_cpu({pid}), time.perf_counter()
    out = asyncio.run(load(url, bodies, concurrency))
    cpu, wall = processes_cpu({pid}) - cpu0, time.perf_counter() - t0
    after = model_stats(url)["stats"]
    out |= batch_stage(before, after)
    out["replica_cpu_ms_per_image"] = 1000 * cpu / max(after["images"] - before["images"], 1)
    out["replica_cores_busy"] = cpu / wall
    out["other_cpu_ms_per_image"] = (out["replica_cpu_ms_per_image"]
                                     - out["decode_cpu_ms_per_image"]
                                     - out["forward_cpu_ms_per_image"])
    return out


def set_ingress_env(ingress: str) -> None:
    """Serve's settings for ``ingress``, in this process's environment, before Ray starts."""
    from oodlab.serve.config import HAPROXY_INGRESS_ENV
    from oodlab.serve.deploy import use_haproxy_ingress

    for key in HAPROXY_INGRESS_ENV:
        os.environ.pop(key, None)
    if ingress != "proxy":
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if ingress == "haproxy":
        use_haproxy_ingress()  # what `oodlab serve --ingress haproxy` sets


def device(args: argparse.Namespace) -> str:
    """Where the replica (and the raw forward) runs: ``cuda`` with ``--replica-gpus``."""
    return "cuda" if args.replica_gpus > 0 else "cpu"


def service_options(args: argparse.Namespace, ref: str, version: str, uri: str, port: int):
    """What ``oodlab serve`` would be given for the measured service: one replica with
    ``--replica-cpus`` CPUs and ``--replica-gpus`` GPUs, on the device they imply."""
    from oodlab.serve.config import AppArgs, DeploymentOptions, ModelConfig, ServeOptions

    return ServeOptions(
        app_name="bench", port=port,
        model=ModelConfig(model=ref, version=version, tracking_uri=uri,
                          max_batch_size=args.max_batch_size,
                          batch_wait_timeout_s=args.batch_wait_ms / 1000),
        args=AppArgs(device=device(args), batch_stage=args.batch_stage,
                     keep_heap_mb=args.keep_heap_mb),
        deployment=DeploymentOptions(num_cpus=args.replica_cpus, num_gpus=args.replica_gpus,
                                     max_ongoing_requests=256))


def measure_ingress(ingress: str, args: argparse.Namespace, ref: str, version: str, uri: str,
                    shapes: dict[int, list[bytes]], alone: dict[int, dict],
                    raw_now: Callable[[], dict]) -> tuple[list[dict], int]:
    """Floor and service (batched, unbatched) per request shape behind one front end, in a
    Ray started for it, each batched measurement right after a raw forward (``raw_now``:
    :func:`raw_forward`'s result);
    (one row per shape, the replica's torch threads)."""
    import ray
    from ray import serve

    from oodlab.serve.deploy import deploy

    set_ingress_env(ingress)
    init_ray(num_cpus=args.replica_cpus + 2, num_gpus=math.ceil(args.replica_gpus),
             log_to_driver=False)
    port = int(os.environ.get("BENCH_PORT", "8765"))
    rows = []
    try:
        floors = echo_floor(port, args.replica_cpus, shapes, args.concurrency,
                            direct=ingress == "direct", pin_core=args.pin_replica_core)
        for k, f in floors.items():
            print(f"[{ingress}] HTTP floor (echo), {k} image(s)/request: "
                  f"{f['requests_per_s']:.0f} requests/s, p50 {f['p50_ms']:.1f} ms, "
                  f"p99 {f['p99_ms']:.1f} ms", flush=True)
        opts = service_options(args, ref, version, uri, port)
        dep = deploy(opts)
        if args.pin_replica_core is not None:
            pin_replicas(args.pin_replica_core)
        (pid,) = replica_pids(opts.app_name)  # one replica: its stats are the service's
        url = direct_url(opts.app_name) if ingress == "direct" else dep.url
        info = model_stats(url)
        if info["device"] != device(args):  # a GPU label on a CPU replica would mislead
            raise RuntimeError(f"the replica scores on {info['device']}, not {device(args)}")
        threads, stage = info["torch_threads"], info["batch_stage"]["setting"]
        for k, bodies in shapes.items():
            row: dict = {"ingress": ingress, "images_per_request": k, "body": args.body,
                         "batch_stage": stage,
                         "concurrency": args.concurrency, "echo": floors[k],
                         "replica_alone": alone[k]}
            for mode, size in (("batched", args.max_batch_size), ("unbatched", 1)):
                opts.model.max_batch_size = size
                deploy(opts)  # user_config only: the replica reconfigures in place
                if mode == "batched":
                    now = raw_now()
                    row["raw_images_per_s"] = now["images_per_s"]
                    row["raw_minor_faults_per_batch"] = now["minor_faults_per_batch"]
                row[mode] = measure_replica(url, bodies, args.concurrency, pid)
                raw_text = (f"; raw forward just before: {row['raw_images_per_s']:.0f} "
                            f"images/s, {1000 / row['raw_images_per_s']:.3f} ms an image, "
                            f"{row['raw_minor_faults_per_batch']:.0f} page faults a batch"
                            if mode == "batched" else "")
                print(f"[{ingress}] {k} image(s)/request, {mode:>9}: "
                      f"{row[mode]['requests_per_s']:.0f} requests/s, "
                      f"{row[mode]['images_per_s']:.0f} images/s, "
                      f"p50 {row[mode]['p50_ms']:.1f} ms, p99 {row[mode]['p99_ms']:.1f} ms, "
                      f"mean batch {row[mode]['mean_batch']:.1f}, {cpu_text(row[mode])}"
                      f"{raw_text}", flush=True)
            assert row["batched"]["failures"] == row["unbatched"]["failures"] == 0, row
            assert floors[k]["failures"] == 0, floors[k]
            row["batched_vs_floor"] = row["batched"]["requests_per_s"] / floors[k]["requests_per_s"]
            row["batched_vs_raw"] = row["batched"]["images_per_s"] / row["raw_images_per_s"]
            row["batched_vs_unbatched"] = (row["batched"]["images_per_s"]
                                           / row["unbatched"]["images_per_s"])
            rows.append(row)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows, threads


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    """The measured replica's own settings, shared with ``bench/replica_http.py``: batching,
    where its batch stage runs, and its heap (which the benchmark's process takes too, for
    the raw forward)."""
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--batch-stage", choices=BATCH_STAGES, default="auto",
                        help="the replica's AppArgs.batch_stage (default auto: on its event "
                             "loop for a CPU replica with one CPU while batches take at most "
                             "50 ms, else in a thread; thread: always in a thread; loop: "
                             "always on the loop)")
    parser.add_argument("--keep-heap-mb", type=int, default=KEEP_HEAP_MB,
                        help="the replica's AppArgs.keep_heap_mb, also set in this process "
                             f"for the raw forward (default {KEEP_HEAP_MB}; 0: glibc's "
                             "defaults in both)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="registered model to serve (default: an untrained "
                                        "quickstart-architecture detector)")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--images-per-request", type=int, nargs="+", default=[1, 8, 32])
    add_replica_args(parser)
    parser.add_argument("--replica-cpus", type=int, default=1)
    parser.add_argument("--replica-gpus", type=float, default=0.0,
                        help="GPUs of the service's replica (> 0: the replica, the replica "
                             "alone and the raw forward run on CUDA; the echo floor has none)")
    parser.add_argument("--pin-replica-core", type=int, metavar="CORE",
                        help="Linux: the replica (and the echo's) alone on this core, the "
                             "front end, Ray and the load client on the others (a replica "
                             "with a core of its own on a small machine); the raw forward "
                             "before each figure runs on this core too")
    parser.add_argument("--ingress", choices=INGRESS_MODES, nargs="+",
                        default=["proxy", "haproxy"],
                        help="front ends to measure, each in a Ray of its own (default proxy "
                             "haproxy): Serve's proxy; the proxy with "
                             "RAY_SERVE_THROUGHPUT_OPTIMIZED=1; the replica's own port "
                             "(direct ingress); HAProxy in front of the replicas' own ports")
    parser.add_argument("--body", choices=BODIES, default="json",
                        help="request body (default json): base64 PNGs in JSON, which the "
                             "replica decodes; or npy, the same pixels as one uint8 .npy "
                             "batch (application/x-npy), which it does not")
    parser.add_argument("--out", default="bench/results/serve_load.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    head = header("serve_load", "bench/serve_load.py", argv)  # load average before we start
    heap_set = keep_freed_heap(args.keep_heap_mb)  # the raw forward's heap as the replica's

    with tempfile.TemporaryDirectory() as tmp:
        ref, uri = ((args.model, args.tracking_uri) if args.model
                    else register_untrained(tmp, args.arch, args.width))
        version, detector = load_registered(ref, uri)
        detector = detector.to(device(args))
        p = detector.preprocessing
        shape = (p["channels"], p["image_size"], p["image_size"])
        raw = raw_throughput(detector, shape, args.max_batch_size, args.replica_cpus)
        raw_single = raw_throughput(detector, shape, 1, args.replica_cpus)
        print(f"raw forward on {device(args)}, {args.replica_cpus} thread(s): {raw:.0f} "
              f"images/s at batch {args.max_batch_size}, {raw_single:.0f} at batch 1",
              flush=True)

        shapes = {k: request_bodies(shape, k, args.requests, args.body)
                  for k in args.images_per_request}
        alone = replica_alone(ref, version, uri, shapes, args.concurrency, args.max_batch_size,
                              args.batch_wait_ms / 1000, args.replica_cpus, device(args),
                              args.batch_stage, args.keep_heap_mb)
        for k, a in alone.items():
            print(f"replica alone (in process, ASGI), {k} image(s)/request: batched "
                  f"{a['batched']['images_per_s']:.0f} images/s (mean batch "
                  f"{a['batched']['mean_batch']:.1f}, {cpu_text(a['batched'])}), unbatched "
                  f"{a['unbatched']['images_per_s']:.0f}: "
                  f"{a['batched_vs_unbatched']:.2f}x", flush=True)

        scenarios: list[dict] = []
        threads = None
        for ingress in args.ingress:
            rows, threads = measure_ingress(
                ingress, args, ref, version, uri, shapes, alone,
                lambda: on_core(args.pin_replica_core, lambda: raw_forward(
                    detector, shape, args.max_batch_size, args.replica_cpus, seconds=2.0)))
            scenarios += rows

    result = head | {
        "model": {"ref": ref, "version": version, "preprocessing": p,
                  "arch": detector.spec["model"]["arch"], "width": detector.spec["model"]["width"],
                  "trained": bool(args.model)},
        "ingress": args.ingress,  # front ends measured, in order (rows name theirs)
        "body": args.body,
        "replica": {"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus,
                    "pinned_core": args.pin_replica_core,
                    "device": device(args), "gpu": (torch.cuda.get_device_name()
                                                    if device(args) == "cuda" else None),
                    "torch_threads": threads, "batch_stage": args.batch_stage,
                    "keep_heap_mb": args.keep_heap_mb, "heap_set": heap_set,
                    "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms},
        # at the start; each scenario has its own, measured just before its batched figure
        "raw_images_per_s": {"batch": args.max_batch_size, "batched": raw, "batch_1": raw_single},
        # pure compute bound on batched/unbatched: forward at max_batch_size vs at batch 1
        "compute_ceiling_batched_vs_unbatched": raw / raw_single,
        # (figure, images per request, goal): the goals this benchmark reports
        "goals": [["batched_vs_floor", 1, 0.8], ["batched_vs_raw", 8, 0.7],
                  ["batched_vs_unbatched", 8, 3.0]],
        "scenarios": scenarios,
    }
    out = write_result(args.out, result)
    for row in scenarios:
        print(f"[{row['ingress']}] {row['images_per_request']} image(s)/request: batched/floor "
              f"{row['batched_vs_floor']:.2f}, batched/raw {row['batched_vs_raw']:.2f}, "
              f"batched/unbatched {row['batched_vs_unbatched']:.2f}")
    print("goals: batched/floor >= 0.8 at 1 image/request; batched/raw >= 0.7 and "
          "batched/unbatched >= 3 at 8 images/request")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
