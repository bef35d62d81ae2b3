"""Autoscaling on images in flight: the policy's arithmetic and the replica's count."""

from __future__ import annotations

import asyncio
import mmap
import time
from types import SimpleNamespace

import pytest
import torch
from fastapi import HTTPException

from oodlab.serve import app as serve_app
from oodlab.serve.autoscale import METRIC, ImagesInFlight, decide
from oodlab.serve.build import serve_config, validate
from oodlab.serve.config import Autoscaling, DeploymentOptions, ModelConfig, ServeOptions
from oodlab.serve.payload import RawImage


def test_replicas_follow_images_not_requests():
    # 2 requests of 32 images and 64 requests of 1 image are the same load
    assert decide(64, 32, 1, {}, now=0.0, downscale_delay_s=30)[0] == 2
    assert decide(65, 32, 1, {}, now=0.0, downscale_delay_s=30)[0] == 3
    assert decide(32, 32, 4, {}, now=0.0, downscale_delay_s=0)[0] == 1
    assert decide(0, 32, 1, {}, now=0.0, downscale_delay_s=0)[0] == 0  # Serve clamps to min


def test_scale_down_waits_for_the_delay_scale_up_does_not():
    n, state = decide(10, 32, 3, {}, now=100.0, downscale_delay_s=30)
    assert (n, state) == (3, {"below_since": 100.0})
    n, state = decide(10, 32, 3, state, now=120.0, downscale_delay_s=30)
    assert (n, state) == (3, {"below_since": 100.0})
    n, state = decide(10, 32, 3, state, now=131.0, downscale_delay_s=30)
    assert (n, state) == (1, {})
    # load coming back resets the clock
    _, state = decide(10, 32, 3, {}, now=0.0, downscale_delay_s=30)
    assert decide(200, 32, 3, state, now=1.0, downscale_delay_s=30) == (7, {})


def _ctx(metrics, target=2, state=None, now=0.0):
    return SimpleNamespace(target_num_replicas=target, aggregated_metrics=metrics,
                           policy_state=state or {}, current_time=now)


def test_policy_sums_the_replicas_reports():
    policy = ImagesInFlight(target_images=8, downscale_delay_s=0)
    assert policy(_ctx({METRIC: {"r1": 20.0, "r2": 12.0}}))[0] == 4
    assert policy(_ctx({METRIC: {"r1": 3.0}}))[0] == 1
    # nothing reported yet (replicas starting): keep the current target
    assert policy(_ctx({}, target=3))[0] == 3
    assert policy(_ctx(None, target=3))[0] == 3


def test_serve_config_names_the_policy_and_serve_accepts_it():
    opts = ServeOptions(model=ModelConfig(model="m"), deployment=DeploymentOptions(
        autoscaling=Autoscaling(min_replicas=1, max_replicas=3, target_images=16)))
    config = serve_config(opts)
    validate(config)  # Ray Serve's own schema; imports the policy by path
    auto = config["applications"][0]["deployments"][0]["autoscaling_config"]
    assert auto["policy"]["policy_function"] == "oodlab.serve.autoscale:ImagesInFlight"
    assert auto["policy"]["policy_kwargs"]["target_images"] == 16
    from ray.serve.config import AutoscalingConfig

    # what Serve's controller runs: the class Serve unpickles, built with the kwargs
    policy = AutoscalingConfig(**auto).policy.get_policy()(**auto["policy"]["policy_kwargs"])
    assert policy(_ctx({METRIC: {"r1": 40.0}}, target=1))[0] == 3


class _Detector:
    preprocessing = {"channels": 1, "image_size": 2}
    threshold = 0.0

    def predict(self, x):
        return torch.full((len(x),), 0.5), torch.zeros(len(x), dtype=torch.bool)


def _scorer(monkeypatch, seen: list[int], fail: bool = False) -> serve_app.Scorer:
    """A Scorer without Ray: the request reader and the batcher replaced by fakes."""
    scorer = serve_app.Scorer.__new__(serve_app.Scorer)
    scorer.args = SimpleNamespace(max_images=8, max_pixels=64, batch_stage="auto")
    scorer.device, scorer.cpus, scorer.last_batch_s = "cpu", 1, 0.0
    scorer.stats = {"requests": 0, "images": 0, "batches": 0, "largest_batch": 0,
                    "decode_cpu_s": 0.0, "forward_cpu_s": 0.0, "minor_faults": 0,
                    "batches_on_loop": 0}
    scorer.images_in_flight = 0
    scorer.current = SimpleNamespace(detector=_Detector(), ref=SimpleNamespace(
        name="m", version="1", alias=None))
    raws = [RawImage(label=f"images[{i}]", array=[[0.0, 1.0], [0.5, 0.5]]) for i in range(3)]

    async def read_images(request, max_images):
        return raws

    async def score_batch(chunk):  # the real batch stage, on a batch of one, without Serve
        seen.append(scorer.images_in_flight)
        if fail:
            raise RuntimeError("forward failed")
        loaded, raws = chunk
        return serve_app.decode_and_forward([(loaded, r) for r in raws], scorer.args.max_pixels)

    score_batch._get_max_batch_size = lambda: 2  # a 3-image request goes in two slices
    monkeypatch.setattr(serve_app, "read_images", read_images)
    scorer._score_batch = score_batch
    return scorer


def test_replica_counts_a_requests_images_in_and_out(monkeypatch):
    seen: list[int] = []
    scorer = _scorer(monkeypatch, seen)
    out = asyncio.run(scorer.score(None))
    assert [r.score for r in out.results] == [0.5] * 3
    assert seen == [3, 3]  # all three images in flight while their two slices are scored
    assert scorer.images_in_flight == 0
    assert asyncio.run(scorer.record_autoscaling_stats()) == {METRIC: 0.0}


def test_a_failed_request_still_counts_its_images_out(monkeypatch):
    seen: list[int] = []
    scorer = _scorer(monkeypatch, seen, fail=True)
    with pytest.raises(RuntimeError):
        asyncio.run(scorer.score(None))
    assert scorer.images_in_flight == 0


def test_an_undecodable_image_is_a_4xx_and_counted_out(monkeypatch):
    scorer = _scorer(monkeypatch, [])
    bad = [RawImage(label="images[0]", array=[[2.0, 0.0], [0.0, 0.0]])]

    async def read_images(request, max_images):
        return bad

    monkeypatch.setattr(serve_app, "read_images", read_images)
    with pytest.raises(HTTPException) as err:
        asyncio.run(scorer.score(None))
    assert err.value.status_code == 422 and "images[0]" in err.value.detail
    assert scorer.images_in_flight == 0


def test_batch_stage_fails_only_the_undecodable_image():
    """One batch holds images of several requests: a bad one gets its error, the others
    their own scores, in batch order, from one forward pass."""
    calls: list[int] = []

    class Scored(_Detector):
        def predict(self, x):
            calls.append(len(x))
            return x.flatten(1).sum(1), x.flatten(1).sum(1) < 1.0

    loaded = SimpleNamespace(detector=Scored())
    items = [(loaded, RawImage("images[0]", array=[[1.0, 1.0], [0.0, 0.0]])),
             (loaded, RawImage("images[1]", array=[[2.0, 0.0], [0.0, 0.0]])),  # out of [0, 1]
             (loaded, RawImage("images[0]", array=[[0.5, 0.0], [0.0, 0.0]]))]
    out = serve_app.decode_and_forward(items, max_pixels=64)
    assert out[0] == (2.0, False) and out[2] == (0.5, True)
    assert isinstance(out[1], serve_app.InputError) and "images[1]" in str(out[1])
    assert calls == [2]
    # nothing decodable: no forward pass at all
    assert isinstance(serve_app.decode_and_forward(items[1:2], 64)[0], serve_app.InputError)
    assert calls == [2]


def _spin(seconds: float) -> None:
    """Burn ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_batch_stage_counts_its_cpu_seconds_of_decoding_and_of_the_forward(monkeypatch):
    """Decoding that costs 10 ms of CPU an image and a forward that costs 30 ms: each lands
    in its own counter (swapped or summed counters fail), and a second batch adds to them."""
    def slow_to_tensor(raw, prep, max_pixels):
        _spin(0.01)
        return torch.zeros(1, 2, 2)

    class Slow(_Detector):
        def predict(self, x):
            _spin(0.03)
            return super().predict(x)

    monkeypatch.setattr(serve_app, "to_tensor", slow_to_tensor)
    loaded = SimpleNamespace(detector=Slow())
    items = [(loaded, RawImage(f"images[{i}]", array=[[0.0]])) for i in range(2)]
    stats = {"decode_cpu_s": 0.0, "forward_cpu_s": 0.0, "minor_faults": 0}
    serve_app.decode_and_forward(items, 64, stats)
    assert 0.02 <= stats["decode_cpu_s"] < 0.03
    assert 0.03 <= stats["forward_cpu_s"] < 0.04
    serve_app.decode_and_forward(items, 64, stats)
    assert 0.04 <= stats["decode_cpu_s"] < 0.06 and 0.06 <= stats["forward_cpu_s"] < 0.08


def test_batch_stage_counts_its_page_faults(monkeypatch):
    """A forward that writes 4 MiB of fresh pages (as activations returned to the kernel are,
    every batch): the stage's ``minor_faults`` grows by about one a page."""
    class Touching(_Detector):
        def predict(self, x):
            with mmap.mmap(-1, 4 << 20) as m:
                for offset in range(0, 4 << 20, mmap.PAGESIZE):
                    m[offset] = 1
            return super().predict(x)

    loaded = SimpleNamespace(detector=Touching())
    stats = {"decode_cpu_s": 0.0, "forward_cpu_s": 0.0, "minor_faults": 0}
    image = RawImage("images[0]", array=[[0.0, 1.0], [0.5, 0.5]])
    assert serve_app.decode_and_forward([(loaded, image)], 64, stats) == [(0.5, False)]
    assert stats["minor_faults"] >= (4 << 20) // mmap.PAGESIZE * 0.9


def _real_batcher(monkeypatch, max_batch_size: int) -> None:
    """The class's own ``@serve.batch`` queue, fresh on the test's event loop, no wait."""
    from ray.serve import batching

    lazy = serve_app.Scorer._score_batch.set_max_batch_size.__self__  # the class's batcher
    monkeypatch.setattr(lazy, "_queue", None)
    monkeypatch.setattr(lazy, "max_batch_size", max_batch_size)
    monkeypatch.setattr(lazy, "batch_wait_timeout_s", 0.0)
    monkeypatch.setattr(batching._BatchQueue,
                        "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)


def _stage_threads(monkeypatch) -> list[int]:
    """The thread of every batch stage from here on, in order."""
    import threading

    seen: list[int] = []
    real_stage = serve_app.decode_and_forward

    def stage(*args):
        seen.append(threading.get_ident())
        return real_stage(*args)

    monkeypatch.setattr(serve_app, "decode_and_forward", stage)
    return seen


async def _score_on_loop(scorer) -> tuple[object, int]:
    import threading

    return await scorer.score(None), threading.get_ident()


@pytest.mark.parametrize("stage", ["thread", "loop"])
def test_serve_batch_takes_a_request_in_slices_of_at_most_max_batch_size(monkeypatch, stage):
    """The replica's own ``@serve.batch`` queue, at most 2 images a batch: a 3-image request
    is scored in order, in two batches counted in images. Queued whole, Serve would fail it;
    counted in requests, one batch would hold all three images. The batch stage runs in a
    thread of its own or on the event loop's, as ``batch_stage`` says."""
    _real_batcher(monkeypatch, 2)
    scorer = _scorer(monkeypatch, [])
    scorer.args.batch_stage = stage
    del scorer._score_batch  # the fake of _scorer; the class's real batcher from here
    stage_threads = _stage_threads(monkeypatch)
    out, loop_thread = asyncio.run(_score_on_loop(scorer))
    on_loop = [t == loop_thread for t in stage_threads]
    assert on_loop == [stage == "loop"] * 2
    assert scorer.stats["batches_on_loop"] == (2 if stage == "loop" else 0)
    assert [r.score for r in out.results] == pytest.approx([0.5] * 3)
    assert scorer.stats["batches"] == 2 and scorer.stats["largest_batch"] == 2
    assert scorer.stats["forward_cpu_s"] > 0 and scorer.stats["decode_cpu_s"] > 0


def test_the_batch_stage_shares_the_event_loop_only_on_a_one_cpu_cpu_replica():
    """auto: a thread where it can overlap with the event loop (a GPU forward, a second
    CPU); on one CPU the loop itself. An explicit choice wins."""
    cpu, cuda = "cpu", "cuda"  # what registry.pick_device gives
    assert not serve_app.batch_in_thread("auto", cpu, 1)
    assert serve_app.batch_in_thread("auto", cpu, 2)
    assert serve_app.batch_in_thread("auto", cuda, 1)
    assert serve_app.batch_in_thread("thread", cpu, 1)
    assert not serve_app.batch_in_thread("loop", cuda, 4)
    # a batch that held the loop too long sends the next one to a thread, in auto only
    limit = serve_app.LOOP_BATCH_LIMIT_S
    assert serve_app.batch_in_thread("auto", cpu, 1, last_batch_s=limit * 1.2)
    assert not serve_app.batch_in_thread("auto", cpu, 1, last_batch_s=limit * 0.8)
    assert not serve_app.batch_in_thread("loop", cpu, 1, last_batch_s=limit * 10)


def test_a_slow_batch_on_the_loop_sends_the_next_one_to_a_thread(monkeypatch):
    """auto on one CPU: the first batch on the event loop; it takes longer than the limit, so
    the second goes to a thread; that one is quick, so the third is back on the loop."""
    _real_batcher(monkeypatch, 1)  # three batches of one image
    scorer = _scorer(monkeypatch, [])
    del scorer._score_batch
    monkeypatch.setattr(serve_app, "LOOP_BATCH_LIMIT_S", 0.2)  # room for a busy CI machine
    delays = [0.3, 0.0, 0.0]

    class Slow(_Detector):
        def predict(self, x):
            time.sleep(delays.pop(0))  # wall time: what the loop's requests wait for
            return super().predict(x)

    scorer.current.detector = Slow()
    stage_threads = _stage_threads(monkeypatch)
    out, loop_thread = asyncio.run(_score_on_loop(scorer))
    assert [t == loop_thread for t in stage_threads] == [True, False, True]
    assert scorer.stats["batches_on_loop"] == 2 and len(out.results) == 3


def test_a_request_sliced_before_a_reconfigure_is_sliced_again(monkeypatch):
    """A reconfigure that lowers max_batch_size after a request was sliced: Serve fails the
    slice that no longer fits, and the request is sliced again and answered."""
    scorer = _scorer(monkeypatch, [])
    limit = {"max": 2}
    scored: list[int] = []

    async def score_batch(chunk):
        loaded, raws = chunk
        await asyncio.sleep(0)  # both slices are queued; then the reconfigure lands
        limit["max"] = 1
        if len(raws) > limit["max"]:
            raise RuntimeError("Size of item is greater than max_batch_size.")
        scored.append(len(raws))
        return serve_app.decode_and_forward([(loaded, r) for r in raws], 64)

    score_batch._get_max_batch_size = lambda: limit["max"]
    scorer._score_batch = score_batch
    out = asyncio.run(scorer.score(None))
    assert [r.score for r in out.results] == [0.5] * 3
    assert scored == [1, 1, 1, 1]  # the 1-image slice of the first try, then three
    assert scorer.images_in_flight == 0
