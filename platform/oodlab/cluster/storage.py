"""S3 storage: one ``storage`` setting for checkpoints, Tune state, MLflow artifacts and data.

A spec's ``storage: s3://bucket/prefix`` is all a run needs; where S3 is and who we are come
from the standard AWS settings, read the same way by every client (boto3 for MLflow and data
staging, pyarrow for Ray Train):

- endpoint: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (MinIO, moto; unset = AWS). pyarrow
  ignores the ``_S3`` variant (apache/arrow#49643), so Ray gets the endpoint explicitly here.
- credentials: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``), or a
  profile (``AWS_PROFILE``), or anything else boto3's default chain finds. They are never
  frozen: every process asks its own boto3 session, whose refreshable providers (assume-role,
  web identity / IRSA, container and instance metadata, ``credential_process``) renew
  temporary credentials before they expire; Ray Train's pyarrow filesystem
  (:mod:`oodlab.cluster.s3_filesystem`) rebuilds its S3 client whenever that session hands
  out new keys, and pickles no secret.
- region: ``AWS_REGION``/``AWS_DEFAULT_REGION`` or the profile's (default us-east-1).

:func:`preflight` checks bucket, credentials and access once, before training starts, and
turns S3's error codes into one sentence naming the bucket and what to fix.
:func:`stage` copies a dataset prefix into a local cache: a file counts as cached only when
its size and ETag match what S3 lists, and a download lands under a temporary name and is
renamed into place, so an interrupted copy never counts. One process per node stages a
prefix at a time (a file lock beside the copy): the eight Train workers of one node wait
for the first, then find every file cached, so a node makes one copy and the manifest has
one writer.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oodlab.errors import StorageError

MANIFEST = ".oodlab-s3-manifest.json"
PREFLIGHT_KEY = ".oodlab-preflight"
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")



@dataclass(frozen=True)
class S3Url:
    """``s3://bucket/prefix`` split into its parts (prefix without leading/trailing '/')."""

    bucket: str
    prefix: str

    @property
    def path(self) -> str:
        """``bucket/prefix``: how pyarrow names the location."""
        return f"{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.path}"


def is_s3(url: str | None) -> bool:
    return bool(url) and str(url).startswith("s3://")


def parse_s3_url(url: str, field: str = "storage") -> S3Url:
    """Parse ``s3://bucket[/prefix]``; a malformed URL is a StorageError naming ``field``."""
    if not is_s3(url):
        raise StorageError(f"{field}={url!r}: expected s3://<bucket>/<prefix>")
    rest = url.removeprefix("s3://")
    if "?" in rest:
        raise StorageError(f"{field}={url!r}: no query string; the endpoint comes from "
                           "AWS_ENDPOINT_URL")
    bucket, _, prefix = rest.partition("/")
    if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in "-." for c in bucket) \
            or bucket != bucket.lower():
        raise StorageError(f"{field}={url!r}: {bucket!r} is not a valid S3 bucket name "
                           "(3-63 lowercase letters, digits, '-' or '.')")
    return S3Url(bucket, prefix.strip("/"))


def endpoint_url() -> str | None:
    """The S3 endpoint from the standard variables (None = AWS itself)."""
    for var in _ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def _describe_endpoint() -> str:
    ep = endpoint_url()
    return f"endpoint {ep}" if ep else "AWS S3 (no AWS_ENDPOINT_URL set)"


_SESSIONS: dict[tuple, Any] = {}
_SESSIONS_LOCK = threading.Lock()


_SESSION_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_EC2_METADATA_DISABLED")


def session(profile: str | None = None):
    """This process's boto3 session for ``profile`` and the current AWS variables: it
    resolves credentials through botocore's provider chain and refreshes temporary ones
    itself (``RefreshableCredentials`` renew within 15 minutes of expiry), so clients built
    from it never hold expired keys. Kept while those settings stay the same (a provider that
    talks to STS or instance metadata is not asked again per call); new settings, new
    session."""
    import boto3

    profile = profile or os.environ.get("AWS_PROFILE") or None
    key = (profile, hash(tuple(os.environ.get(v) for v in _SESSION_ENV)))
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = boto3.session.Session(profile_name=profile)
        return _SESSIONS[key]


def region() -> str:
    return session().region_name or "us-east-1"


def client():
    """A boto3 S3 client from the standard AWS environment/profile and endpoint."""
    return session().client("s3", endpoint_url=endpoint_url(), region_name=region())


def explain(err: Exception, url: S3Url | str, action: str) -> StorageError:
    """One clear sentence for an S3 failure: no bucket, no credentials, access denied, or
    an unreachable endpoint."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    bucket = url.bucket if isinstance(url, S3Url) else str(url)
    where = f"s3 bucket {bucket!r} at {_describe_endpoint()}"
    if isinstance(err, NoCredentialsError | PartialCredentialsError):
        return StorageError(f"{action} {url}: no AWS credentials found; set AWS_ACCESS_KEY_ID "
                            "and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(err, EndpointConnectionError):
        return StorageError(f"{action} {url}: cannot reach {_describe_endpoint()} "
                            "(check AWS_ENDPOINT_URL)")
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return StorageError(f"{action} {url}: {where} does not exist; create it first "
                                f"(e.g. `aws s3 mb s3://{bucket}`)")
        if code in ("403", "AccessDenied", "AllAccessDisabled"):
            return StorageError(f"{action} {url}: access denied to {where}; the credentials "
                                "need s3:ListBucket, s3:GetObject, s3:PutObject and "
                                "s3:DeleteObject on it")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            return StorageError(f"{action} {url}: the AWS credentials were rejected by "
                                f"{_describe_endpoint()} ({code})")
        return StorageError(f"{action} {url}: {where}: {code} "
                            f"{err.response.get('Error', {}).get('Message', '')}".strip())
    return StorageError(f"{action} {url}: {type(err).__name__}: {err}")


def _check(url: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    loc = parse_s3_url(url)
    s3 = client()
    key = loc.key(PREFLIGHT_KEY)
    try:
        s3.head_bucket(Bucket=loc.bucket)
        s3.put_object(Bucket=loc.bucket, Key=key, Body=b"oodlab")
        s3.delete_object(Bucket=loc.bucket, Key=key)
    except (BotoCoreError, ClientError) as err:
        raise explain(err, loc, "storage") from None


@functools.lru_cache(maxsize=32)
def _checked(url: str, endpoint: str | None) -> bool:
    _check(url)
    return True


def preflight(url: str | None) -> None:
    """Check once per process that ``url`` (if s3://) exists and can be listed and written.

    A failure raises :class:`StorageError` before any training or tracking starts; a
    success is remembered (per URL and endpoint), so Tune trials do not repeat it.
    """
    if is_s3(url):
        _checked(str(url), endpoint_url())


def s3_filesystem():
    """A pyarrow filesystem on S3 at this environment's endpoint, with refreshing credentials
    (:class:`~oodlab.cluster.s3_filesystem.RefreshingS3`)."""
    import pyarrow.fs

    from oodlab.cluster.s3_filesystem import RefreshingS3

    profile = os.environ.get("AWS_PROFILE") or None
    return pyarrow.fs.PyFileSystem(RefreshingS3(endpoint_url(), region(), profile))


def ray_storage(path: str) -> dict[str, Any]:
    """``RunConfig`` storage arguments for ``path``: a local path as is; for s3:// a pyarrow
    filesystem with the endpoint resolved here, on the driver, so that workers on any node
    use the same one (Ray Train's ``storage_filesystem`` form, since pyarrow ignores
    ``AWS_ENDPOINT_URL_S3``: apache/arrow#49643), and credentials resolved by each process's
    own refreshing boto3 session (:class:`~oodlab.cluster.s3_filesystem.RefreshingS3`)."""
    if not is_s3(path):
        return {"storage_path": path}
    return {"storage_path": parse_s3_url(path).path, "storage_filesystem": s3_filesystem()}


def checkpoint_uri(checkpoint) -> str:
    """Where a Ray checkpoint lives, as a URI another process can open: ``s3://bucket/...``
    for checkpoints on S3 (their ``path`` has no scheme), the path itself otherwise."""
    fs = getattr(checkpoint, "filesystem", None)
    if fs is not None and fs.type_name in ("s3", "py::s3") and "://" not in checkpoint.path:
        return f"s3://{checkpoint.path}"
    return checkpoint.path


def _read_manifest(root: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(root: Path, manifest: dict[str, dict[str, Any]]) -> None:
    tmp = root / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, root / MANIFEST)


@dataclass
class StageResult:
    """What :func:`stage` did: where the copy is, and which files it fetched or reused."""

    root: Path
    downloaded: list[str]
    cached: list[str]


def stage(url: str, cache_dir: str | Path) -> StageResult:
    """Mirror ``s3://bucket/prefix`` into ``cache_dir/<bucket>/<prefix>`` and return it.

    A local file is reused when the manifest records the same size and ETag that S3 lists
    now and the file on disk has that size; otherwise it is downloaded to a temporary name
    and renamed into place, and only then recorded, so a partial download never counts.
    Concurrent calls for one prefix on one machine run one after the other (a file lock),
    so only the first downloads.
    """
    from filelock import FileLock

    loc = parse_s3_url(url, field="data.root")
    root = Path(cache_dir).expanduser() / loc.bucket / loc.prefix
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.oodlab-stage.lock")):  # one stager per node
        return _stage_locked(url, loc, root)


def _stage_locked(url: str, loc: S3Url, root: Path) -> StageResult:
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = client()
    manifest = _read_manifest(root)
    result = StageResult(root=root, downloaded=[], cached=[])
    base = f"{loc.prefix}/" if loc.prefix else ""
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=base)
        objects = [o for page in pages for o in page.get("Contents", [])]
        if not objects:
            raise StorageError(f"data.root {url}: no objects under this prefix at "
                               f"{_describe_endpoint()}")
        for obj in objects:
            rel = obj["Key"][len(base):]
            if not rel or rel.endswith("/") or rel == PREFLIGHT_KEY:
                continue
            dest = root / rel
            want = {"size": int(obj["Size"]), "etag": str(obj["ETag"]).strip('"')}
            if manifest.get(rel) == want and dest.is_file() \
                    and dest.stat().st_size == want["size"]:
                result.cached.append(rel)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
            manifest.pop(rel, None)
            try:
                s3.download_file(loc.bucket, obj["Key"], str(tmp))
                if tmp.stat().st_size != want["size"]:
                    raise StorageError(f"data.root {url}: {rel} arrived with "
                                       f"{tmp.stat().st_size} of {want['size']} bytes")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            manifest[rel] = want
            _write_manifest(root, manifest)
            result.downloaded.append(rel)
    except (BotoCoreError, ClientError) as err:
        raise explain(err, loc, "data.root") from None
    return result
