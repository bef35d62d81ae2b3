"""S3 storage against an S3-compatible server on 127.0.0.1 (moto's server mode, started here).

A tiny 2-epoch run with ``storage: s3://...`` puts its Ray checkpoints and MLflow artifacts in
the bucket and resumes from the S3 checkpoint; dataset staging honours size + ETag and never
counts a partial download; a missing bucket or missing credentials give one clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, ReadTimeoutError

from oodlab.cluster import storage
from oodlab.spec import SpecError, validate_spec
from tests.helpers import moto_s3, point_aws_at, tiny_spec

BUCKET = "oodlab-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port, with the AWS variables pointing at it."""
    with moto_s3() as endpoint, pytest.MonkeyPatch.context() as mp:
        point_aws_at(mp, endpoint)
        client = storage.client()
        client.create_bucket(Bucket=BUCKET)
        yield client


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_parse_s3_url_names_the_field():
    loc = storage.parse_s3_url("s3://my-bucket/a/b/")
    assert (loc.bucket, loc.prefix, loc.path, loc.key("x")) == ("my-bucket", "a/b", "my-bucket/a/b",
                                                                  "a/b/x")
    assert storage.parse_s3_url("s3://my-bucket").path == "my-bucket"
    with pytest.raises(SpecError, match=r"data.root='s3://Bad_Bucket/x'.*not a valid S3 bucket"):
        storage.parse_s3_url("s3://Bad_Bucket/x", field="data.root")
    with pytest.raises(SpecError, match="storage='/tmp/x': expected s3://"):
        storage.parse_s3_url("/tmp/x")


def test_explain_access_denied_and_rejected_keys():
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")
    msg = str(storage.explain(denied, storage.parse_s3_url("s3://team-bucket/p"), "storage"))
    assert "access denied to s3 bucket 'team-bucket'" in msg and "s3:PutObject" in msg
    bad = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "?"}}, "HeadBucket")
    assert "credentials were rejected" in str(storage.explain(bad, "s3://b/p", "storage"))


def test_missing_bucket_is_one_clear_error_before_any_run(s3, tmp_path):
    with pytest.raises(storage.StorageError,
                       match=r"s3 bucket 'no-such-bucket' at endpoint http://127\.0\.0\.1:\d+ "
                             r"does not exist"):
        storage.preflight("s3://no-such-bucket/runs")

    from mlflow.tracking import MlflowClient

    from oodlab.track import tracking
    from oodlab.train.pipeline import run_experiment

    spec = validate_spec(tiny_spec(tmp_path, storage="s3://no-such-bucket/runs"))
    with pytest.raises(storage.StorageError, match="no-such-bucket"):
        run_experiment(spec)
    exp = MlflowClient(tracking.tracking_uri(spec)).get_experiment_by_name("tests")
    assert exp is None  # failed before an MLflow run (or experiment) was created


def test_no_credentials_is_named(s3, tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(storage.StorageError, match="no AWS credentials found"):
        storage.preflight(f"s3://{BUCKET}/no-creds")


def test_staging_uses_size_and_etag_and_never_counts_a_partial_download(s3, tmp_path,
                                                                        monkeypatch):
    s3.put_object(Bucket=BUCKET, Key="data/set/a.bin", Body=b"a" * 100)
    s3.put_object(Bucket=BUCKET, Key="data/set/sub/b.bin", Body=b"b" * 50)
    url, cache = f"s3://{BUCKET}/data/set", tmp_path / "cache"

    first = storage.stage(url, cache)
    assert first.root == cache / BUCKET / "data/set"
    assert sorted(first.downloaded) == ["a.bin", "sub/b.bin"] and first.cached == []
    assert (first.root / "sub/b.bin").read_bytes() == b"b" * 50

    again = storage.stage(url, cache)
    assert again.downloaded == [] and sorted(again.cached) == ["a.bin", "sub/b.bin"]

    # same size, new content: the ETag differs, so it is fetched again
    s3.put_object(Bucket=BUCKET, Key="data/set/a.bin", Body=b"A" * 100)
    changed = storage.stage(url, cache)
    assert changed.downloaded == ["a.bin"] and (changed.root / "a.bin").read_bytes() == b"A" * 100

    # a truncated local copy (size differs from the listing) is not a cache hit
    (changed.root / "sub/b.bin").write_bytes(b"b" * 10)
    assert storage.stage(url, cache).downloaded == ["sub/b.bin"]

    # an interrupted download leaves neither a file nor a manifest entry behind
    s3.put_object(Bucket=BUCKET, Key="data/set/c.bin", Body=b"c" * 80)
    real_client = storage.client

    class Flaky:
        def __init__(self) -> None:
            self.inner = real_client()

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def download_file(self, bucket, key, dest):
            Path(dest).write_bytes(b"c" * 30)
            raise ReadTimeoutError(endpoint_url="s3")

    monkeypatch.setattr(storage, "client", Flaky)
    with pytest.raises(storage.StorageError, match="data.root s3://oodlab-test/data/set"):
        storage.stage(url, cache)
    assert not (first.root / "c.bin").exists()
    assert [p.name for p in first.root.glob(".*part*")] == []
    monkeypatch.setattr(storage, "client", real_client)
    resumed = storage.stage(url, cache)
    assert resumed.downloaded == ["c.bin"] and sorted(resumed.cached) == ["a.bin", "sub/b.bin"]

    with pytest.raises(storage.StorageError, match="no objects under this prefix"):
        storage.stage(f"s3://{BUCKET}/data/none", cache)


def test_data_root_on_s3_is_staged_on_each_node_by_load_bundle(s3, tmp_path):
    import shutil

    from oodlab.data.bundle import load_bundle

    s3.put_object(Bucket=BUCKET, Key="datasets/ext/readme.txt", Body=b"external data")
    spec = validate_spec(tiny_spec(tmp_path, data={"root": f"s3://{BUCKET}/datasets/ext"}))
    staged = Path(spec.data.cache_dir) / "s3" / BUCKET
    try:
        load_bundle(spec, include_test=False)  # what the driver and every Train worker call
        assert (staged / "datasets/ext/readme.txt").read_bytes() == b"external data"
    finally:
        shutil.rmtree(staged, ignore_errors=True)


@pytest.mark.slow
def test_run_on_s3_checkpoints_artifacts_and_resume(s3, ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from oodlab.data.bundle import load_bundle
    from oodlab.track import tracking
    from oodlab.train.loop import fit
    from oodlab.train.pipeline import run_experiment

    spec = validate_spec(tiny_spec(tmp_path, storage=f"s3://{BUCKET}/runs",
                                   train={"epochs": 2}))
    result = run_experiment(spec)
    run_name = f"{spec.name}-{result.run_id}"
    stored = keys(s3, "runs/")

    ckpts = sorted(k for k in stored if k.startswith(f"runs/{run_name}/") and
                   k.endswith("/state.pt"))
    assert len(ckpts) == 2, stored  # one per epoch (num_to_keep=2)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.artifact_uri.startswith(f"s3://{BUCKET}/runs/mlartifacts/tests/")
    artifacts = [k for k in stored if k.startswith("runs/mlartifacts/tests/")]
    assert any(k.endswith("/spec.resolved.yaml") for k in artifacts)
    assert any(k.endswith("/MLmodel") for k in artifacts)
    assert any(k.endswith("/detector.pt") for k in artifacts)
    tag = run.data.tags[tracking.CHECKPOINT_TAG]  # a URI promote can open (s3://...)
    assert tag.startswith(f"s3://{BUCKET}/runs/{run_name}/checkpoint_")
    assert f"{tag.removeprefix('s3://').split('/', 1)[1]}/state.pt" in ckpts
    assert not os.path.exists(tmp_path / "ray")  # nothing went to local storage

    # The same run name again with one more epoch: Ray Train restores from the S3 checkpoint.
    longer = spec.model_copy(update={"train": spec.train.model_copy(update={"epochs": 3})})
    num_classes = load_bundle(spec, include_test=False).num_classes
    outcome = fit(longer, run_name=run_name, num_classes=num_classes)
    assert outcome.metrics["run/start_epoch"] == 2 and outcome.metrics["epoch"] == 2
    assert outcome.checkpoint_path.startswith(f"s3://{BUCKET}/runs/{run_name}/")
    import ray.train

    from oodlab.train.loop import model_from_checkpoint  # what promote does with a trial's tag

    model = model_from_checkpoint(longer, ray.train.Checkpoint(outcome.checkpoint_path),
                                  num_classes)
    assert sum(p.numel() for p in model.parameters()) > 0
    new = set(keys(s3, f"runs/{run_name}/")) - set(stored)
    assert any(k.endswith("/state.pt") for k in new)
