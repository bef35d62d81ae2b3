"""Helpers shared by tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Built-in data is deterministic, so tests share one cache (built once per machine).
DATA_CACHE = Path(__file__).resolve().parent.parent / ".oodlab" / "test-cache"


def tiny_spec(workdir: Path, **sections) -> dict:
    """A spec that trains in seconds: few images, a narrow CNN, one epoch."""
    spec = {
        "name": "tiny",
        "seed": 0,
        "workdir": str(workdir),
        "data": {"id": "mnist", "limit": 256, "batch_size": 64, "oe_batch_size": 64,
                 "val_ood": ["val_letters"], "test_ood": ["letters", "gaussian"],
                 "oe": ["oe_textures"], "cache_dir": str(DATA_CACHE)},
        "model": {"arch": "small_cnn", "width": 8},
        "method": {"name": "energy_oe"},
        "train": {"epochs": 1, "lr": 0.05},
        "eval": {"scores": ["energy", "msp"], "epoch_val_limit": 128},
        "resources": {"num_workers": 1},
        "tracking": {"experiment": "tests"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


# ------------------------------------------------------------------ S3 (moto's server mode)

# fake keys (moto's convention) and the variables that could send a test to a real account
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}
AWS_UNSET = ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL",
             "AWS_SESSION_TOKEN")


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """An S3 server (moto) on a free 127.0.0.1 port for the block; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def point_aws_at(mp, endpoint: str, *, keys: bool = True) -> None:
    """Set (with a pytest MonkeyPatch) the AWS variables so boto3 talks to ``endpoint``:
    region, endpoint and, with ``keys``, the fake keys; the rest of :data:`AWS_UNSET` and,
    without ``keys``, the key variables are removed."""
    for var in AWS_UNSET + (() if keys else ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")):
        mp.delenv(var, raising=False)
    for k, v in FAKE_AWS.items():
        if keys or k == "AWS_DEFAULT_REGION":
            mp.setenv(k, v)
    mp.setenv("AWS_ENDPOINT_URL", endpoint)


# ------------------------------------------------------------------ processes a test started
def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM ``proc``'s descendants (what ``ray stop`` sends, but only to the processes
    this test started), SIGKILL whatever is left after ``grace_s``, then ``proc`` itself."""
    pids = descendants(proc.pid)
    kill_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    kill_all([p for p in pids if alive(p)], signal.SIGKILL)
    proc.kill()
    proc.wait()


_HANDED_OUT: set[int] = set()  # ports free_port gave this test process


def free_port() -> int:
    """A loopback TCP port nobody listens on now that this process has not handed out before.

    Binding port 0 twice in a row can return the same port (the first socket is closed at
    once), and a port chosen for a server that is still starting is not listened on yet: a Ray
    node's several ports, or Ray's and a not-yet-listening MLflow server's, would collide."""
    from oodlab.cluster.ray_local import free_port as unused_port

    for _ in range(1000):
        port = unused_port()
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free loopback port not handed out already")


RAY_NODE_PORTS = ("node-manager-port", "object-manager-port", "metrics-export-port",
                  "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                  "runtime-env-agent-port")
RAY_HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port", *RAY_NODE_PORTS)


def ray_start(*args: str, num_cpus: int, temp_dir: Path, env: dict[str, str], log: Path,
              object_store_bytes: int = 200_000_000) -> tuple[subprocess.Popen, dict[str, int]]:
    """``ray start --block`` on 127.0.0.1 with free ports and its own temp dir (so it never
    reads or cleans another Ray's files). ``args``: ``--head``, or ``--address=<gcs>`` for one
    more node. Returns the process (stop it with :func:`stop_tree`) and its ports by flag."""
    head = "--head" in args
    ports = {flag: free_port() for flag in (RAY_HEAD_PORTS if head else RAY_NODE_PORTS)}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", *args, "--block",
           "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
           f"--object-store-memory={object_store_bytes}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", *(["--dashboard-host=127.0.0.1"] if head else []),
           *[f"--{flag}={port}" for flag, port in ports.items()]]
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, ports
