"""bench/benchlib.py: the no-Ray ceiling trains through the loop's own set-up and epoch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from oodlab.spec import validate_spec
from tests.helpers import tiny_spec

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_plain_rates_trains_every_epoch_of_an_oe_method(tmp_path):
    """One images/s per epoch, with the OE stream an OE method needs (a method that uses OE
    fails without its OE batch)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from benchlib import plain_rates

    spec = validate_spec(tiny_spec(tmp_path, train={"epochs": 2}))  # energy_oe
    rates = plain_rates(spec)
    assert len(rates) == 2 and all(r > 0 for r in rates)


def test_summary_table_reads_every_result_file(tmp_path):
    """bench/summary.py: headline rows from each JSON, a replica-alone row for serving, a
    GPU, pinned, thread-stage, ``.npy``-body or non-default model run labelled as such, and
    no crash on a benchmark whose ``summary`` is its own table (a dict)."""
    import json

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from summary import render

    run = {"date": "d", "command": "c", "host": "h"}
    (tmp_path / "a.json").write_text(json.dumps(run | {"benchmark": "a", "summary": [
        {"figure": "fig a", "value": "0.5", "goal": "≥ 0.4", "met": True}]}))
    (tmp_path / "b.json").write_text(json.dumps(run | {"benchmark": "b",
                                                       "summary": {"table": [1, 2]}}))
    timing = {"p50_ms": 1.0, "p99_ms": 2.0, "images_per_s": 10.0, "mean_batch": 4.0}
    (tmp_path / "serve.json").write_text(json.dumps(run | {
        "benchmark": "serve_load", "goals": [["batched_vs_unbatched", 8, 3.0]],
        "scenarios": [{"ingress": ingress, "images_per_request": 8, "batched": timing,
                       "unbatched": timing, "echo": timing, "batched_vs_floor": 0.5,
                       "batched_vs_raw": 0.4, "batched_vs_unbatched": ratio, "replica_alone": {
                           "batched": timing, "unbatched": timing,
                           "batched_vs_unbatched": 3.5}} | raw
                      for ingress, ratio, raw in (("proxy", 2.5, {}),
                                                  ("haproxy", 3.25, {"raw_images_per_s": 25.0}))
                      ]}))
    gpu = json.loads((tmp_path / "serve.json").read_text()) | {
        "model": {"arch": "resnet18", "width": 64},
        "replica": {"device": "cuda", "pinned_core": None}}
    pinned = gpu | {"model": {"arch": "small_cnn", "width": 16}, "replica": {"pinned_core": 1},
                    "body": "npy"}
    wider = gpu | {"model": {"arch": "small_cnn", "width": 32},
                   "replica": {"batch_stage": "thread"}}
    (tmp_path / "serve_pinned.json").write_text(json.dumps(pinned))
    (tmp_path / "serve_wider.json").write_text(json.dumps(wider))
    (tmp_path / "serve_gpu.json").write_text(json.dumps(gpu))
    table = render(tmp_path)
    assert "| a | fig a | 0.5 | ≥ 0.4 | yes |" in table
    assert "| b |" not in table
    assert "serving (proxy): batched ÷ unbatched, images/s, 8 image(s)/request" in table
    assert "| 2.50 | ≥ 3.0 | no |" in table and "| 3.25 | ≥ 3.0 | yes |" in table
    assert "(haproxy): batched ÷ unbatched" in table
    assert "serving (haproxy, resnet18:64, GPU replica): batched ÷ unbatched" in table
    assert "serving (haproxy, small_cnn:32, batch stage thread): batched ÷ unbatched" in table
    assert "serving, replica alone" in table  # once per file and shape, labelled by setup
    assert ("serving (proxy, replica on a core of its own, npy bodies): batched ÷ unbatched"
            in table)
    assert table.count("npy bodies") == 2 * 3 + 1  # the .npy run's rows only
    assert table.count("replica alone") == 4 and "| 3.50 |" in table
    # a run that measured the raw forward beside each row names it; an older run does not
    assert table.count("raw forward measured just before it: 25 images/s") == 4


def test_offline_site_keeps_file_modes_and_prunes_only_what_no_benchmark_loads(tmp_path):
    """bench/offline_site.py: Ray's binaries must stay executable after unpacking (zipfile
    drops modes by default), and pruning removes the jars and source maps, nothing else."""
    import stat
    import zipfile

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from offline_site import prune, unpack

    wheel = tmp_path / "ray-0-py3-none-any.whl"
    files = {"ray/core/src/ray/raylet/raylet": 0o755, "ray/jars/ray_dist.jar": 0o644,
             "ray/dashboard/client/build/index.html": 0o644,
             "ray/dashboard/client/build/static/js/main.js": 0o644,
             "ray/dashboard/client/build/static/js/main.js.map": 0o644,
             "ray/serve/api.py": 0o644}
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, mode in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            zf.writestr(info, b"x")
    site = tmp_path / "site"
    unpack(wheel, site)
    assert (site / "ray/core/src/ray/raylet/raylet").stat().st_mode & 0o111
    prune(site)
    left = {str(p.relative_to(site)) for p in site.rglob("*") if p.is_file()}
    assert left == {"ray/core/src/ray/raylet/raylet", "ray/dashboard/client/build/index.html",
                    "ray/dashboard/client/build/static/js/main.js", "ray/serve/api.py"}


def test_serve_load_gpu_replica_asks_serve_for_a_gpu_and_cuda():
    """bench/serve_load.py --replica-gpus: the measured service's replica must reserve the
    GPU and score on CUDA (a flag that only moved the raw forward would measure a CPU
    replica under a GPU label); without it, CPU and no GPU."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from serve_load import parse_args, service_options

    ref = ("models:/m@champion", "1", "sqlite:///x.db", 8000)
    gpu = service_options(parse_args(["--replica-gpus", "1", "--replica-cpus", "2"]), *ref)
    fields = gpu.deployment.serve_fields()["ray_actor_options"]
    assert fields == {"num_cpus": 2, "num_gpus": 1} and gpu.args.device == "cuda"
    cpu = service_options(parse_args([]), *ref)
    assert cpu.deployment.serve_fields()["ray_actor_options"]["num_gpus"] == 0
    assert cpu.args.device == "cpu" and cpu.args.batch_stage == "auto"
    assert service_options(parse_args(["--batch-stage", "thread"]), *ref
                           ).args.batch_stage == "thread"


def test_serve_load_offers_the_batch_stages_the_replica_takes():
    """The benchmarks' --batch-stage takes each of AppArgs.batch_stage's values and no other."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from oodlab.serve.config import BATCH_STAGES as APP_STAGES
    from serve_load import parse_args

    assert APP_STAGES == ("auto", "thread", "loop")
    for stage in APP_STAGES:
        assert parse_args(["--batch-stage", stage]).batch_stage == stage
    with pytest.raises(SystemExit):
        parse_args(["--batch-stage", "inline"])


def test_serve_load_bodies_carry_the_same_pixels_as_json_or_npy():
    """bench/serve_load.py --body: a JSON body's base64 PNGs and an .npy body hold the same
    images (the comparison is of encodings, not of inputs), each sent with its own content
    type, and the echo floor answers as many results for either."""
    import asyncio
    import base64
    import io
    import json

    import httpx
    import numpy as np
    from PIL import Image

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from serve_load import body_images, content_type, echo_api, request_bodies

    for shape in ((1, 28, 28), (3, 32, 32)):
        as_json = request_bodies(shape, 8, 3, "json")
        as_npy = request_bodies(shape, 8, 3, "npy")
        for j, n in zip(as_json, as_npy, strict=True):
            pngs = [base64.b64decode(b) for b in json.loads(j)["images"]]
            decoded = np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in pngs])
            batch = np.load(io.BytesIO(n))
            assert batch.dtype == np.uint8 and batch.shape == (8, *shape)
            channels_first = decoded[:, None] if shape[0] == 1 else decoded.transpose(0, 3, 1, 2)
            np.testing.assert_array_equal(batch, channels_first)
            assert body_images(j) == body_images(n) == 8
            assert (content_type(j), content_type(n)) == ("application/json",
                                                          "application/x-npy")
        assert not np.array_equal(np.load(io.BytesIO(as_npy[0])), np.load(io.BytesIO(as_npy[1])))

    async def echo(body: bytes) -> int:
        transport = httpx.ASGITransport(app=echo_api())
        async with httpx.AsyncClient(transport=transport, base_url="http://echo") as client:
            r = await client.post("/v1/score", content=body,
                                  headers={"content-type": content_type(body)})
            return len(r.json()["results"])

    assert asyncio.run(echo(as_json[0])) == asyncio.run(echo(as_npy[0])) == 8


def test_pinning_finds_child_processes_and_pins_every_thread():
    """bench/serve_load.py --pin-replica-core: the processes below the driver (Ray's, the
    front end's) are found from /proc, and every thread of a pinned process is moved."""
    import os
    import subprocess

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from serve_load import _descendants, _pin

    child = subprocess.Popen([sys.executable, "-c", "import threading, time; "
                              "threading.Thread(target=time.sleep, args=(30,)).start(); "
                              "time.sleep(30)"])
    try:
        import time

        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{child.pid}/task")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in _descendants(os.getpid())
        core = max(os.sched_getaffinity(0))
        _pin(child.pid, {core})
        tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(tids) >= 2 and all(os.sched_getaffinity(t) == {core} for t in tids)
    finally:
        child.kill()
        child.wait()


def test_replica_http_measures_a_replica_held_to_its_core(tmp_path):
    """bench/replica_http.py end to end, small: the replica answers every request from its
    own process, its CPU time is counted, and held to one core it never uses more; an
    ``.npy`` body costs the batch thread far less decoding than base64 PNGs in JSON."""
    import json
    import socket

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import replica_http

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "replica_http.json"
    assert replica_http.main(["--images-per-request", "8", "--requests", "60", "--port",
                              str(port), "--body", "json", "npy", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["body"]: r for r in result["rows"]}
    assert sorted(rows) == ["json", "npy"] and len(result["rows"]) == 2
    for body, row in rows.items():
        assert row["failures"] == 0 and row["images"] == 480
        assert row["replica_cpu_ms_per_image"] > 0 and row["raw_before"] > 0
        assert row["replica_cores_busy"] <= 1.05  # one core, however busy
        assert row["vs_raw"] == row["images_per_s"] / ((row["raw_before"] + row["raw_after"])
                                                       / 2)
        echo = result["echo"][replica_http.echo_key(8, body)]
        assert echo["failures"] == 0 and echo["images"] == 480
        assert row["vs_echo"] == row["requests_per_s"] / echo["requests_per_s"]
        assert row["forward_ms_per_image"] + row["beyond_forward_ms_per_image"] == (
            pytest.approx(row["replica_cpu_ms_per_image"]))
        # the replica's own split of its CPU: decoding and the forward are parts of the whole
        assert 0 < row["decode_cpu_ms_per_image"] < row["forward_cpu_ms_per_image"]
        assert 0 < row["other_cpu_ms_per_image"] < row["replica_cpu_ms_per_image"]
        assert row["decode_cpu_ms_per_image"] + row["forward_cpu_ms_per_image"] + row[
            "other_cpu_ms_per_image"] == pytest.approx(row["replica_cpu_ms_per_image"])
        assert 1 <= row["mean_batch"] <= 32
    # no PNG to decode: under a third of the JSON body's decoding (measured: about a tenth)
    assert rows["npy"]["decode_cpu_ms_per_image"] < rows["json"]["decode_cpu_ms_per_image"] / 3


def test_replica_http_model_sweep_options_and_figure(tmp_path):
    """--models takes ARCH:WIDTH (a bad one is refused); the figure of one or more runs is
    written, and --plot-from needs --figure."""
    import json

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import replica_http

    assert replica_http.parse_args(["--models", "small_cnn:16", "resnet18:64"]).models == [
        "small_cnn:16", "resnet18:64"]
    with pytest.raises(SystemExit):
        replica_http.parse_args(["--models", "resnet18"])
    rows = [{"arch": a, "width": w, "images_per_request": k, "forward_ms_per_image": f,
             "beyond_forward_ms_per_image": o, "vs_raw": f / (f + o)}
            for a, w, f in (("small_cnn", 16, 0.4), ("resnet18", 64, 10.0))
            for k, o in ((1, 1.0), (8, 0.25))]
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"rows": rows}))
    with pytest.raises(SystemExit):
        replica_http.parse_args(["--plot-from", str(run)])  # where to?
    assert replica_http.main(["--plot-from", str(run), str(run),
                              "--figure", str(tmp_path / "sweep.png")]) == 0
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_core_sharing_measures_the_batch_stage_alone_and_sharing_its_core(tmp_path):
    """bench/core_sharing.py, small: all three measurements count decoding and forward CPU,
    the ratios are the ones its rows give, and ``between`` does do the JSON work."""
    import json
    import os

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import torch

    import core_sharing

    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    out = tmp_path / "core_sharing.json"
    try:
        assert core_sharing.main(["--core", str(max(cores)), "--batch", "4", "--batches", "5",
                                  "--repeats", "1", "--out", str(out)]) == 0
    finally:  # main holds this process to one core and one torch thread
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["raw_cpu_ms_per_image"] > 0
    for kind in ("alone", "shared", "between"):
        assert 0 < row[kind]["decode_cpu_ms_per_image"] < row[kind]["forward_cpu_ms_per_image"]
    for kind in ("shared", "between"):
        assert row[f"forward_{kind}_vs_alone"] == pytest.approx(
            row[kind]["forward_cpu_ms_per_image"] / row["alone"]["forward_cpu_ms_per_image"])
    # the event loop's work was done: on the stage's thread after every batch, by the rival
    assert row["alone"]["bodies_validated"] == 0
    assert row["between"]["bodies_validated"] >= 5 and row["shared"]["bodies_validated"] > 0
    with pytest.raises(SystemExit, match="--core"):
        core_sharing.main(["--core", "4096"])


def test_serve_load_measures_the_raw_forward_on_the_pinned_core():
    """serve_load.on_core: the raw forward runs on the replica's core, and the thread gets its
    own affinity back afterwards (even when the measurement fails)."""
    import os

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from serve_load import on_core

    before = os.sched_getaffinity(0)
    core = max(before)
    assert on_core(core, lambda: os.sched_getaffinity(0)) == {core}
    assert os.sched_getaffinity(0) == before
    assert on_core(None, lambda: os.sched_getaffinity(0)) == before

    def fails() -> float:
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        on_core(core, fails)
    assert os.sched_getaffinity(0) == before
