"""Ray Jobs (https://docs.ray.io/en/latest/cluster/running-applications/job-submission/):
submit ``oodlab run`` / ``oodlab tune`` to a Ray cluster and manage what was submitted. The
``oodlab submit`` and ``oodlab jobs`` commands over these functions live in
:mod:`oodlab.cli.jobs`.

What travels with a job (its runtime_env):

- ``working_dir``: the project (specs, search spaces), minus :data:`EXCLUDES` (virtual
  environments, local MLflow stores, caches, git); the spec and search space must lie in it.
- ``py_modules``: this ``oodlab`` package, so the driver and every Train/Tune worker run the
  code that was submitted, whatever the cluster has installed.
- ``env_vars``: the non-secret settings of this shell (:data:`FORWARD_ENV`: MLflow URI,
  S3 endpoint/region/profile, workdir) plus ``--env``; AWS keys only with
  ``--pass-aws-credentials`` (they are visible in the job's runtime_env on the dashboard;
  on Kubernetes the pods get them from a Secret instead).

Ray >= 2.59 turns token authentication on for local clusters: the client sends
``Authorization: Bearer <token>`` read from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token`` (unless ``RAY_AUTH_MODE=disabled``), so no variable has to be exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oodlab.cluster.env import user_environment
from oodlab.errors import JobError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PACKAGE_DIR = Path(__file__).resolve().parent
EXCLUDES = [".venv", "venv", ".oodlab", ".git", "**/__pycache__", "*.pyc", ".pytest_cache",
            ".ruff_cache", ".mypy_cache", "mlruns", "mlartifacts", "*.db", "node_modules",
            "bench/results", "k8s", "docs", "*.egg-info"]
FORWARD_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL",
               "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
               "OODLAB_WORKDIR")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def project_root() -> Path:
    """The directory that holds ``pyproject.toml`` and ``platform/oodlab`` (this checkout)."""
    root = PACKAGE_DIR.parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def job_address(address: str | None = None) -> str:
    """``--address``, else ``RAY_ADDRESS`` when it is a dashboard URL, else localhost:8265."""
    env = os.environ.get("RAY_ADDRESS", "")
    address = address or (env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS)
    if not address.startswith(("http://", "https://")):
        raise JobError(f"--address {address!r}: expected the Ray dashboard URL, "
                       "e.g. http://127.0.0.1:8265")
    return address.rstrip("/")


def auth_headers() -> dict[str, str]:
    """The bearer header for Ray's token auth, when this machine has a token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """Turn the job client's failures into one JobError line about ``what``."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        raise JobError(f"{what}: the Ray cluster refused our token ({str(err).splitlines()[0]}"
                       "); set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token"
                       ) from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        text = str(err).strip()
        raise JobError(f"{what}: {text.splitlines()[-1][:300] if text else repr(err)}"
                       ) from None


def client(address: str | None = None):
    """A JobSubmissionClient for ``address`` that works with Ray's token authentication.

    Ray lets ``RAY_API_SERVER_ADDRESS`` (which a local ``init_ray`` sets in this process) and
    ``RAY_ADDRESS`` override the address given to the client; :func:`job_address` has
    already folded ``RAY_ADDRESS`` in, so both are hidden while the client is built and the
    job goes where ``--address`` says.
    """
    from ray.job_submission import JobSubmissionClient

    url = job_address(address)
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
              if k in os.environ}
    try:
        with _errors(f"cannot reach the Ray dashboard at {url}"):
            return JobSubmissionClient(url, headers=auth_headers())
    finally:
        os.environ.update(hidden)


def _inside(path: str | Path, root: Path, what: str) -> str:
    p = Path(path).expanduser()
    full = (p if p.is_absolute() else Path.cwd() / p).resolve()
    if not full.is_file():
        raise JobError(f"{what} not found: {path}")
    try:
        return full.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise JobError(f"{what} {path} is outside the working dir {root} that is uploaded "
                       "with the job; move it there or pass --working-dir") from None


def _env_pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not key or not key.replace("_", "").isalnum():
        raise JobError(f"--env {item!r}: expected NAME=VALUE or NAME (taken from this shell)")
    if not sep:
        if key not in os.environ:
            raise JobError(f"--env {key}: not set in this shell")
        value = os.environ[key]
    return key, value


@dataclass
class Submission:
    """What :func:`build_submission` prepared: the entrypoint and its runtime_env."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


def build_submission(spec_path: str | Path, *, space: str | Path | None = None,
                     overrides: list[str] | None = None, working_dir: str | Path | None = None,
                     env: list[str] | None = None, pass_credentials: bool = False,
                     python: str = "python", resume: bool = False,
                     name: str | None = None) -> Submission:
    """Validate the spec (and search space) here, then describe the job that runs it."""
    from oodlab.spec import load_spec

    spec = load_spec(spec_path, overrides)  # a bad spec fails here, not on the cluster
    root = Path(working_dir).expanduser().resolve() if working_dir else project_root()
    if not root.is_dir():
        raise JobError(f"--working-dir {working_dir}: not a directory")
    rel_spec = _inside(spec_path, root, "spec")
    args = [python, "-m", "oodlab"]
    if space is not None:
        from oodlab.spec.search_space import check_space, load_space

        check_space(load_space(space), spec)
        args += ["tune", rel_spec, "--space", _inside(space, root, "search space")]
        args += ["--name", name] if name else []
        args += ["--resume"] if resume else []
    else:
        args += ["run", rel_spec]
    for item in overrides or []:
        args += ["--set", item]
    # the user's tracking URI, not one that mlflow.set_tracking_uri wrote into this process
    with user_environment():
        env_vars = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
    if pass_credentials:
        env_vars |= {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}
    env_vars |= dict(_env_pair(item) for item in env or [])
    kind = "tune" if space is not None else "run"
    submission_id = f"oodlab-{kind}-{spec.name}-{uuid.uuid4().hex[:8]}".lower()
    runtime_env = {"working_dir": str(root), "py_modules": [str(PACKAGE_DIR)],
                   "excludes": EXCLUDES, "env_vars": env_vars}
    return Submission(submission_id, shlex.join(args), runtime_env,
                      {"oodlab.kind": kind, "oodlab.spec": rel_spec})


def submit(sub: Submission, address: str | None = None, num_cpus: float = 0,
           num_gpus: float = 0) -> str:
    """Submit a prepared job; returns its submission id."""
    jc = client(address)
    with _errors(f"submitting {sub.entrypoint!r} failed"):
        return jc.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                             submission_id=sub.submission_id, metadata=sub.metadata,
                             entrypoint_num_cpus=num_cpus, entrypoint_num_gpus=num_gpus)


def status(job_id: str, address: str | None = None) -> str:
    with _errors(f"job {job_id}"):
        return str(client(address).get_job_status(job_id).value)


def wait(job_id: str, address: str | None = None, timeout_s: float = 600,
         until: set[str] | None = None) -> str:
    """Poll until the job reaches one of ``until`` (default: a terminal status)."""
    until = until or TERMINAL
    deadline = time.monotonic() + timeout_s
    while True:
        state = status(job_id, address)
        if state in until or state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(1.0)


def follow(job_id: str, address: str | None = None, out=None) -> str:
    """Stream the job's logs (to ``out``, default stdout) until it ends; return its final
    status."""
    jc = client(address)
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in jc.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with _errors(f"job {job_id}"):
        asyncio.run(_tail())
    return wait(job_id, address)


def stop(job_id: str, address: str | None = None, timeout_s: float = 60) -> str:
    """Ask the job to stop and wait for it to end; returns the final status."""
    with _errors(f"job {job_id}"):
        client(address).stop_job(job_id)
    return wait(job_id, address, timeout_s)


def logs(job_id: str, address: str | None = None) -> str:
    with _errors(f"job {job_id}"):
        return client(address).get_job_logs(job_id)


def list_jobs(address: str | None = None) -> list[dict[str, Any]]:
    """Submitted jobs (newest first) as plain rows."""
    rows = []
    with _errors("listing jobs"):
        found = client(address).list_jobs()
    for job in found:
        rows.append({"id": job.submission_id or job.job_id, "status": str(job.status.value),
                     "start": job.start_time, "entrypoint": job.entrypoint,
                     "message": job.message or ""})
    return sorted(rows, key=lambda r: r["start"] or 0, reverse=True)

