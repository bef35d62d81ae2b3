"""Start or join Ray the one way oodlab does it.

A local start pins the dashboard to a free port on 127.0.0.1 and tells every worker its
URL (``RAY_API_SERVER_ADDRESS``). Ray Train's placement-group cleaner asks that state API
whether a controller is still alive; without the pin it guesses the cluster from
``/tmp/ray`` and, when a second Ray runs on the same machine (two shells, a test run beside
a search), asks the wrong one and never frees a stopped trial's CPUs.
"""

from __future__ import annotations

import os
import platform as stdlib_platform
import socket
from typing import Any

import ray

from oodlab.cluster.env import user_environment

HARDWARE_TAG = "oodlab.hardware"  # MLflow tag: hardware() of the process that ran the run
_QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
              "DO_NOT_TRACK": "true"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def init_ray(address: str | None = None, num_cpus: int | None = None,
             log_to_driver: bool = True, **kwargs: Any) -> bool:
    """Join ``address`` (else ``RAY_ADDRESS``), or start a local Ray with a pinned dashboard.

    Returns True if this call started (or joined) Ray, False if it was already initialized.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)  # the cluster's own dashboard answers
        ray.init(address=address, log_to_driver=log_to_driver, **kwargs)
        return True
    port = free_port()
    env = _QUIET_ENV | {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    runtime_env = kwargs.pop("runtime_env", None) or {}
    runtime_env["env_vars"] = env | runtime_env.get("env_vars", {})
    with user_environment():  # Ray's processes inherit this environment
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, log_to_driver=log_to_driver, runtime_env=runtime_env,
                 **kwargs)
    os.environ["RAY_API_SERVER_ADDRESS"] = env["RAY_API_SERVER_ADDRESS"]
    return True


def hardware() -> str:
    """What runs are computed on, in words: the Ray cluster's CPUs and GPUs when Ray is up
    (else this machine's cores), the architecture, and the GPU model this process sees."""
    import torch

    if ray.is_initialized():
        res = ray.cluster_resources()
        cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
        where = f"Ray cluster with {cpus} CPUs and {gpus} GPUs"
    else:
        where = f"{os.cpu_count()} CPU cores"
    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
           if torch.cuda.is_available() else "no GPU")
    return f"{stdlib_platform.machine()}, {where}; driver sees {gpu}"
