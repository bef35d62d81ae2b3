"""S3 credentials are never frozen: Ray Train's pyarrow filesystem asks the process's boto3
session on every call, so temporary credentials renewed by a botocore refreshable provider
are picked up mid-run, and the pickled filesystem (what Ray ships to workers) holds no key.
"""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta

import pytest

from oodlab.cluster import storage
from tests.helpers import moto_s3, point_aws_at

BUCKET = "creds-test"


class ShortLivedProvider:
    """A botocore credential provider handing out 5-minute session credentials (inside
    botocore's 15-minute advisory window, so every use renews them), like STS does."""

    METHOD = "oodlab-test-sts"
    CANONICAL_NAME = "oodlab-test-sts"

    def __init__(self) -> None:
        self.issued: list[str] = []

    def _fetch(self) -> dict[str, str]:
        key = f"ASIATEST{len(self.issued):04d}"
        self.issued.append(key)
        expiry = datetime.now(UTC) + timedelta(minutes=5)
        return {"access_key": key, "secret_key": f"secret-{key}", "token": f"token-{key}",
                "expiry_time": expiry.isoformat()}

    def load(self):
        from botocore.credentials import RefreshableCredentials

        return RefreshableCredentials.create_from_metadata(
            self._fetch(), refresh_using=self._fetch, method=self.METHOD)


@pytest.fixture()
def sts_session(monkeypatch):
    """AWS variables pointing at a moto server; the process session resolves credentials
    through :class:`ShortLivedProvider` first (botocore's provider chain)."""
    import boto3
    import botocore.session
    from botocore.credentials import CredentialProvider

    with moto_s3() as endpoint:
        point_aws_at(monkeypatch, endpoint, keys=False)  # keys come from the provider only
        provider = ShortLivedProvider()
        adapter = type("Adapter", (CredentialProvider,), {
            "METHOD": provider.METHOD, "CANONICAL_NAME": provider.CANONICAL_NAME,
            "load": lambda self: provider.load()})()
        core = botocore.session.Session()
        core.get_component("credential_provider").insert_before("env", adapter)
        sts = boto3.session.Session(botocore_session=core)
        monkeypatch.setattr(storage, "session", lambda profile=None: sts)
        storage.client().create_bucket(Bucket=BUCKET)
        yield provider


def test_ray_storage_filesystem_follows_refreshed_credentials(sts_session):
    import pyarrow.fs

    fs = storage.ray_storage(f"s3://{BUCKET}/runs")["storage_filesystem"]
    handler = fs.handler
    with fs.open_output_stream(f"{BUCKET}/runs/a.txt") as out:
        out.write(b"first")
    first_key = handler._keys[0]
    with fs.open_input_stream(f"{BUCKET}/runs/a.txt") as inp:
        assert inp.read() == b"first"
    info = fs.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/runs"))
    assert [i.base_name for i in info] == ["a.txt"]
    # the provider renewed the keys between calls and the filesystem used each new set
    assert handler._keys[0] != first_key and handler._keys[0] == sts_session.issued[-1]
    assert handler.rebuilds >= 3 and len(sts_session.issued) >= 3
    assert storage.checkpoint_uri(type("C", (), {"filesystem": fs, "path": "b/x"})()) == "s3://b/x"


def test_pickled_filesystem_carries_no_secret_and_resolves_its_own(sts_session):
    fs = storage.ray_storage(f"s3://{BUCKET}/runs")["storage_filesystem"]
    fs.get_file_info(f"{BUCKET}/runs")  # credentials resolved (and cached) in this process
    blob = pickle.dumps(fs)
    assert b"secret-" not in blob and b"ASIATEST" not in blob and b"token-" not in blob
    clone = pickle.loads(blob)
    assert clone.handler._keys is None and clone.handler.endpoint == fs.handler.endpoint
    with clone.open_output_stream(f"{BUCKET}/runs/b.txt") as out:
        out.write(b"from a worker")
    assert clone.handler._keys[0] == sts_session.issued[-1]
