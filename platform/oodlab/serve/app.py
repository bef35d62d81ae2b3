"""The Ray Serve application: a FastAPI ingress in front of the champion detector.

Endpoints: ``POST /v1/score``, ``GET /v1/model``, ``GET /healthz`` (never needs a token),
``GET /docs`` and ``GET /openapi.json``. Each replica builds its FastAPI app after its
constructor (Serve's late-bound ingress, ``__serve_build_asgi_app__``, see
``ray.serve.ingress``), so the replica's own settings become plain FastAPI features: the
token one router-level security dependency, the body limit the route's ``max_body_size``.

Images of all concurrent requests are decoded and scored in dynamic batches (``@serve.batch``
with a ``batch_size_fn``: one batch element per request, or per slice of at most
``max_batch_size`` images of one, and a batch's size counted in images). The batch stage
decodes its images and runs the forward pass in one go, so a request costs the event loop
one batch entry and no decoding of its own; torch uses as many threads as the replica has
CPUs. Where the stage runs is :func:`batch_in_thread`'s choice: in a thread beside the event
loop when the two can overlap (a GPU replica, or more than one CPU), else on the event loop
between batches, as long as a batch there takes at most ``LOOP_BATCH_LIMIT_S``. The stage's
CPU seconds of decoding and of the forward pass, its minor page faults, and the batches run on
the loop, are counted in ``GET /v1/model``'s ``stats``. The replica keeps freed memory in its
heap (``AppArgs.keep_heap_mb``, :mod:`oodlab.cluster.heap`), so a batch's activations reuse
the last one's pages instead of faulting in new ones. Each replica reports its images
in flight to Serve's autoscaler (``record_autoscaling_stats``, see
:mod:`oodlab.serve.autoscale`). The model lives in the deployment's ``user_config``
(:class:`~oodlab.serve.config.ModelConfig`): ``reconfigure`` loads the new version off the
event loop and swaps it in whole, so requests keep being served by the old version until the
new one is ready, and a request is always scored by the model it was decoded for.

Serve config entry point: ``import_path: oodlab.serve.app:build_app`` with ``args`` =
:class:`~oodlab.serve.config.AppArgs`.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route signatures.

import asyncio
import time
from collections import defaultdict
from typing import Any

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.serve import Application

from oodlab import __version__
from oodlab.cluster.heap import keep_freed_heap, minor_faults
from oodlab.serve import registry
from oodlab.serve.auth import BearerToken, load_token
from oodlab.serve.autoscale import METRIC
from oodlab.serve.config import DEPLOYMENT_NAME, AppArgs, ModelConfig
from oodlab.serve.images import InputError, Preprocessing, array_image, decode_image
from oodlab.serve.payload import NPY, RawImage, ScoreRequest, read_images
from oodlab.serve.registry import LoadedModel

DESCRIPTION = (
    "Scores images with the registered detector (higher score = more in-distribution; "
    "`is_ood` = score < the threshold calibrated at 95% TPR on ID validation data). With a "
    "token configured, every endpoint but /healthz needs `Authorization: Bearer <token>`.")
SCORE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": ScoreRequest.model_json_schema()},
    "multipart/form-data": {"schema": {
        "type": "object", "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    NPY: {"schema": {"type": "string", "format": "binary", "description":
                     "numpy.save of a [N, C, S, S] (or [N, S, S]) batch: uint8 pixels or "
                     "floats in [0, 1]"}},
}}}
ERRORS = {s: {"description": d} for s, d in {
    400: "malformed body (JSON syntax, multipart framing, .npy file)",
    401: "missing or wrong token",
    413: "body, image or image count over the limit", 415: "unsupported content type",
    422: "an image that cannot be used (named in the message)",
    503: "no model loaded"}.items()}


class ModelId(BaseModel):
    name: str
    version: str
    alias: str | None = None


class ImageScore(BaseModel):
    index: int = Field(description="position of the image in the request")
    score: float = Field(description="higher = more in-distribution")
    is_ood: bool = Field(description="score < threshold")


class ScoreResponse(BaseModel):
    model: ModelId
    threshold: float | None
    results: list[ImageScore]


def to_tensor(raw: RawImage, prep: Preprocessing, max_pixels: int) -> torch.Tensor:
    """Decode one client image into the model's input (CPU work, in the batch stage)."""
    return (decode_image(raw.data, raw.label, prep, max_pixels) if raw.data is not None
            else array_image(raw.array, raw.label, prep))


def forward(items: list[tuple[LoadedModel, torch.Tensor]]) -> list[tuple[float, bool]]:
    """Score one batch; items decoded for different model versions go to their own model."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (loaded, _) in enumerate(items):
        groups[id(loaded)].append(i)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(items)
    for idx in groups.values():
        detector = items[idx[0]][0].detector
        scores, is_ood = detector.predict(torch.stack([items[i][1] for i in idx]))
        for i, s, o in zip(idx, scores.tolist(), is_ood.tolist(), strict=True):
            out[i] = (float(s), bool(o))
    return out


Outcome = tuple[float, bool] | InputError
Chunk = tuple[LoadedModel, list[RawImage]]  # one batch element: a request's images, or a slice


def images_in(chunks: list[Chunk]) -> int:
    """A batch's size for ``@serve.batch``: its images, not its elements."""
    return sum(len(raws) for _, raws in chunks)


def decode_and_forward(items: list[tuple[LoadedModel, RawImage]], max_pixels: int,
                       stats: dict[str, Any] | None = None) -> list[Outcome]:
    """The batch stage: decode every image with its model's preprocessing, then score the
    decoded ones in one :func:`forward`. An image that cannot be decoded gets its
    :class:`InputError` in place of a score, so only its own request fails. With ``stats``,
    the CPU seconds this thread spent decoding and in the forward pass are added to its
    ``decode_cpu_s`` and ``forward_cpu_s`` (``time.thread_time``: this thread only), and the
    thread's minor page faults meanwhile to its ``minor_faults``."""
    start, faults = time.thread_time(), minor_faults()
    out: list[Outcome] = [(0.0, False)] * len(items)
    good: list[int] = []
    decoded: list[tuple[LoadedModel, torch.Tensor]] = []
    for i, (loaded, raw) in enumerate(items):
        try:
            x = to_tensor(raw, Preprocessing(**loaded.detector.preprocessing), max_pixels)
        except InputError as err:
            out[i] = err
            continue
        good.append(i)
        decoded.append((loaded, x))
    decoded_at = time.thread_time()
    for i, result in zip(good, forward(decoded) if decoded else [], strict=True):
        out[i] = result
    if stats is not None:
        stats["decode_cpu_s"] += decoded_at - start
        stats["forward_cpu_s"] += time.thread_time() - decoded_at
        stats["minor_faults"] += minor_faults() - faults
    return out


# A batch on the event loop holds every request of the replica, arriving or answered, until it
# ends; one that took longer sends the next batch to a thread (asyncio itself calls a callback
# slow at 0.1 s). Measured: quickstart batches (about 10 ms) gain on the loop, ResNet-18
# batches (about 200 ms) raised the p99 latency five-fold there (docs/benchmarks.md).
LOOP_BATCH_LIMIT_S = 0.05


def batch_in_thread(stage: str, device: str, cpus: int, last_batch_s: float = 0.0) -> bool:
    """Whether the next batch runs in a thread beside the event loop (``AppArgs.batch_stage``).

    ``auto``: in a thread where the thread can overlap with the event loop, i.e. the forward
    runs on a GPU or the replica has a second CPU. A CPU replica with one CPU runs the stage
    on the event loop between batches: on one core a thread cannot overlap with the loop, only
    interleave with it, each evicting the other's data from the caches
    (``bench/core_sharing.py``). But only while batches are short: after a batch that took
    more than ``LOOP_BATCH_LIMIT_S`` (``last_batch_s``, wall time), the next one goes to a
    thread, so a slow model does not hold the replica's requests.
    """
    if stage != "auto":
        return stage == "thread"
    return device != "cpu" or cpus > 1 or last_batch_s > LOOP_BATCH_LIMIT_S


def replica_cpus() -> int:
    """Whole CPUs Ray gave this replica (at least 1): the torch thread count."""
    import ray

    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))


class Scorer:
    """One replica: the loaded detector, its batching queue and its auth token."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs.model_validate(args)
        self.token = load_token(self.args.token_file, self.args.require_token)
        self.device = registry.pick_device(self.args.device)
        self.cpus = replica_cpus()
        torch.set_num_threads(self.cpus)  # not the node's core count
        self.heap_kept = keep_freed_heap(self.args.keep_heap_mb)  # process-wide, for good
        self.last_batch_s = 0.0  # wall time of the last batch stage, for batch_in_thread
        self.config: ModelConfig | None = None
        self.current: LoadedModel | None = None
        self.stats: dict[str, Any] = {"requests": 0, "images": 0, "batches": 0,
                                      "largest_batch": 0, "decode_cpu_s": 0.0,
                                      "forward_cpu_s": 0.0, "minor_faults": 0,
                                      "batches_on_loop": 0}
        self.images_in_flight = 0  # decoding, queued for a batch or in a forward pass
        self._reload_lock = asyncio.Lock()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a new user_config: batching at once, a different model once it is loaded."""
        try:
            cfg = ModelConfig.model_validate(user_config)
        except ValidationError as err:
            raise ValueError(f"user_config: {err}") from None
        self._score_batch.set_max_batch_size(cfg.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        async with self._reload_lock:
            old = self.config
            same = (old is not None and cfg.version is not None and old.version == cfg.version
                    and (old.model, old.tracking_uri) == (cfg.model, cfg.tracking_uri))
            if not same:
                # load off the event loop: requests keep flowing to the current model
                self.current = await asyncio.to_thread(registry.load, cfg, self.device)
            self.config = cfg

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-metrics hook, read by :class:`oodlab.serve.autoscale.ImagesInFlight`."""
        return {METRIC: float(self.images_in_flight)}

    def in_thread(self) -> bool:
        """Whether the next batch goes to a thread (:func:`batch_in_thread`)."""
        return batch_in_thread(self.args.batch_stage, self.device, self.cpus, self.last_batch_s)

    def check_health(self) -> None:
        if self.current is None:
            raise RuntimeError("no model loaded: the deployment needs a user_config with "
                               "'model' (see oodlab serve build)")

    def loaded(self) -> LoadedModel:
        if self.current is None:
            raise HTTPException(503, "no model loaded yet")
        return self.current

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=images_in)
    async def _score_batch(self, chunks: list[Chunk]) -> list[list[Outcome]]:
        items = [(loaded, raw) for loaded, raws in chunks for raw in raws]
        start = time.perf_counter()
        if self.in_thread():
            outs = await asyncio.to_thread(decode_and_forward, items, self.args.max_pixels,
                                           self.stats)
        else:  # one core: the loop would only wait for the thread (batch_in_thread)
            outs = decode_and_forward(items, self.args.max_pixels, self.stats)
            self.stats["batches_on_loop"] += 1
        self.last_batch_s = time.perf_counter() - start
        out = iter(outs)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        return [[next(out) for _ in raws] for _, raws in chunks]

    async def _score_images(self, loaded: LoadedModel, raws: list[RawImage]) -> list[Outcome]:
        """One request's images through the batch queue, in slices that fit one batch.

        Serve fails a queued element larger than ``max_batch_size``; that happens only when a
        reconfigure lowered it after the request was sliced, and the request is sliced again.
        """
        while True:  # the getter Serve puts on a batch method for user code (ray.serve.batching)
            size = self._score_batch._get_max_batch_size()
            slices = [raws[i:i + size] for i in range(0, len(raws), size)]
            try:
                parts = await asyncio.gather(*(self._score_batch((loaded, s)) for s in slices))
            except RuntimeError:
                if size <= self._score_batch._get_max_batch_size():
                    raise  # not a slice that no longer fits
                continue
            return [o for part in parts for o in part]

    async def score(self, request: Request) -> ScoreResponse:
        """Read, decode and score every image of one request with one model version."""
        loaded = self.loaded()
        raws: list[RawImage] = []
        try:
            raws = await read_images(request, self.args.max_images)
            self.images_in_flight += len(raws)
            outs = await self._score_images(loaded, raws)
            if bad := next((o for o in outs if isinstance(o, InputError)), None):
                raise bad  # the first image that could not be decoded, in request order
        except InputError as err:
            raise HTTPException(err.status, str(err)) from None
        finally:
            self.images_in_flight -= len(raws)
        self.stats["requests"] += 1
        self.stats["images"] += len(outs)
        ref = loaded.ref
        return ScoreResponse(
            model=ModelId(name=ref.name, version=ref.version, alias=ref.alias),
            threshold=loaded.detector.threshold,
            results=[ImageScore(index=i, score=s, is_ood=o) for i, (s, o) in enumerate(outs)])

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/model`` answers."""
        loaded = self.loaded()
        assert self.config is not None
        return registry.describe(loaded) | {
            "ref": self.config.model,
            "batching": {"max_batch_size": self.config.max_batch_size,
                         "batch_wait_timeout_s": self.config.batch_wait_timeout_s},
            "limits": {"max_images": self.args.max_images,
                       "max_body_bytes": self.args.max_body_bytes,
                       "max_pixels": self.args.max_pixels},
            "auth": self.token is not None,
            "replica": serve.get_replica_context().replica_tag,
            "torch_threads": torch.get_num_threads(),
            "batch_stage": {"setting": self.args.batch_stage,
                            "next_batch": "thread" if self.in_thread() else "loop"},
            "heap": {"keep_mb": self.args.keep_heap_mb, "set": self.heap_kept},
            "stats": dict(self.stats) | {"images_in_flight": self.images_in_flight},
        }


def build_api(scorer: Scorer) -> FastAPI:
    """The HTTP API of one replica; every route but /healthz needs the replica's token."""
    api = FastAPI(title="oodlab OOD detector", version=__version__, description=DESCRIPTION,
                  docs_url=None, redoc_url=None, openapi_url=None)
    secured = APIRouter(dependencies=[Depends(BearerToken(scorer.token))],
                        responses={401: ERRORS[401]})

    @api.get("/healthz", summary="liveness (no token needed)")
    async def healthz() -> dict[str, str]:
        scorer.loaded()
        return {"status": "ok"}

    @secured.get("/v1/model", summary="the served model")
    async def model_info() -> dict[str, Any]:
        return scorer.info()

    @secured.post("/v1/score", summary="score images", response_model=ScoreResponse,
                  openapi_extra=SCORE_BODY, responses=ERRORS,
                  max_body_size=scorer.args.max_body_bytes)
    async def score(request: Request) -> ScoreResponse:
        return await scorer.score(request)

    @secured.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(api.openapi())

    @secured.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=api.title)

    api.include_router(secured)
    return api


OODScorer = serve.deployment(
    name=DEPLOYMENT_NAME, health_check_period_s=10, health_check_timeout_s=30,
    graceful_shutdown_timeout_s=20)(serve.ingress()(Scorer))


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder (``import_path: oodlab.serve.app:build_app``)."""
    try:
        parsed = AppArgs.model_validate(args or {})
    except ValidationError as err:
        raise ValueError(f"oodlab serve args: {err}") from None
    return OODScorer.bind(parsed.model_dump())
