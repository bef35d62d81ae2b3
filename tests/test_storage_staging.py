"""A dataset on S3 is staged once per node: four processes of one machine (the Train workers
of one node) stage the same prefix at once; each file is downloaded exactly once, every
process sees the full copy, and the manifest lists every file."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from oodlab.cluster import storage
from tests.helpers import moto_s3, point_aws_at

BUCKET = "stage-test"
FILES = {f"data/set/part-{i}.bin": bytes([i]) * (2000 + i) for i in range(6)}


@pytest.fixture()
def s3(monkeypatch):
    with moto_s3() as endpoint:
        point_aws_at(monkeypatch, endpoint)
        monkeypatch.setattr(storage, "_SESSIONS", {})
        client = storage.client()
        client.create_bucket(Bucket=BUCKET)
        for key, body in FILES.items():
            client.put_object(Bucket=BUCKET, Key=key, Body=body)
        yield client


def _worker(cache: str, out) -> None:
    storage._SESSIONS.clear()  # a fresh process builds its own boto3 session
    res = storage.stage(f"s3://{BUCKET}/data/set", cache)
    out.put((sorted(res.downloaded), sorted(res.cached)))


def test_concurrent_workers_on_one_node_stage_once(s3, tmp_path):
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    names = sorted(k.removeprefix("data/set/") for k in FILES)
    downloads = sorted(f for downloaded, _ in results for f in downloaded)
    assert downloads == names  # each file fetched once across the four processes
    assert sum(1 for downloaded, _ in results if downloaded) == 1
    assert all(sorted(d + c) == names for d, c in results)
    root = tmp_path / BUCKET / "data/set"
    assert sorted(json.loads((root / storage.MANIFEST).read_text())) == names
    for key, body in FILES.items():
        assert (root / key.removeprefix("data/set/")).read_bytes() == body
