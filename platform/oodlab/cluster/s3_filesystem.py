"""S3 as a pyarrow filesystem with credentials that refresh (Ray Train's ``storage_filesystem``).

Kept apart from :mod:`oodlab.cluster.storage` so that importing storage does not import
pyarrow.
"""

from __future__ import annotations

import threading
from typing import Any

import pyarrow.fs

from oodlab.cluster import storage


class RefreshingS3(pyarrow.fs.FileSystemHandler):
    """A pyarrow filesystem handler for S3 whose credentials come from this process's boto3
    session on every call, never from keys frozen at start.

    pyarrow's ``S3FileSystem`` takes fixed keys (or the AWS C++ SDK's own chain, which cannot
    see a botocore provider nor ``AWS_ENDPOINT_URL_S3``), so this handler keeps one and
    builds a new one whenever :func:`oodlab.cluster.storage.session` returns different keys:
    a refreshable provider renewed them, or the profile was rotated. Every pyarrow call is
    delegated to it.
    Pickled (Ray ships the storage filesystem to every Train worker) it carries only the
    endpoint, region and profile; each process resolves its own credentials. Wrap it in
    ``pyarrow.fs.PyFileSystem`` (:func:`oodlab.cluster.storage.s3_filesystem`).
    """

    TYPE_NAME = "s3"

    def __init__(self, endpoint: str | None, region_name: str, profile: str | None = None):
        self.endpoint, self.region_name, self.profile = endpoint, region_name, profile
        self._fs: Any = None
        self._keys: tuple | None = None
        self._lock = threading.Lock()
        self.rebuilds = 0  # how often new credentials were picked up (observable in tests)

    def __getstate__(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "region_name": self.region_name,
                "profile": self.profile}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def current(self):
        """The pyarrow S3FileSystem holding the session's credentials right now."""
        import pyarrow.fs

        creds = storage.session(self.profile).get_credentials()
        frozen = creds.get_frozen_credentials() if creds is not None else None  # refreshes
        keys = (frozen.access_key, frozen.secret_key, frozen.token) if frozen else None
        with self._lock:
            if self._fs is None or keys != self._keys:
                auth: dict[str, Any] = {}
                if keys is not None:
                    auth = {"access_key": keys[0], "secret_key": keys[1]}
                    if keys[2]:
                        auth["session_token"] = keys[2]
                self._fs = pyarrow.fs.S3FileSystem(endpoint_override=self.endpoint,
                                                   region=self.region_name, **auth)
                self._keys = keys
                self.rebuilds += 1
            return self._fs

    # -- pyarrow.fs.FileSystemHandler: each call on the current S3FileSystem
    def get_type_name(self) -> str:
        return self.TYPE_NAME

    def equals(self, other) -> bool:
        return isinstance(other, RefreshingS3) and self.__getstate__() == other.__getstate__()

    def normalize_path(self, path: str) -> str:
        return self.current().normalize_path(path)

    def get_file_info(self, paths):
        return self.current().get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.current().get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.current().create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.current().delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.current().delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.current().delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self.current().delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.current().move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.current().copy_file(src, dest)

    def open_input_stream(self, path: str):
        return self.current().open_input_stream(path)

    def open_input_file(self, path: str):
        return self.current().open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        return self.current().open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata):
        return self.current().open_append_stream(path, metadata=metadata)
