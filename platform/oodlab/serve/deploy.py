"""Run the Serve config on a Ray cluster: deploy, reload the champion in place, tear down.

``oodlab serve`` deploys the very config that ``oodlab serve build`` writes, through Serve's
declarative REST API on the Ray dashboard (``PUT``/``GET /api/serve/applications/``, the
path of ``serve deploy`` and KubeRay; docs.ray.io, "Serve REST API"). Only that path keeps a
deployment's code version when just its ``user_config`` changes (docs.ray.io, "Updating
Applications In-Place"), so a reload reaches the running replicas' ``reconfigure`` instead
of replacing them. Status and teardown use Serve's Python API (``serve.status``,
``serve.delete``, ``serve.shutdown``).

The dashboard is found at ``$RAY_DASHBOARD_ADDRESS`` (as for the ``serve`` CLI), else at the
address oodlab pinned when it started Ray (``$RAY_API_SERVER_ADDRESS``), else on Ray's
default port 8265 of the cluster's head.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oodlab.serve.build import app_config, serve_config
from oodlab.serve.config import (
    DEPLOYMENT_NAME,
    HAPROXY_INGRESS_ENV,
    ModelConfig,
    ServeOptions,
    split_ref,
)
from oodlab.serve.registry import resolve

SERVE_API = "/api/serve/applications/"
DEFAULT_DASHBOARD_PORT = 8265


class ServeError(RuntimeError):
    """A deployment that failed or did not become ready; the message says why."""


@dataclass
class Deployment:
    """Where an application answers, and what this process started for it."""

    app_name: str
    url: str
    started_ray: bool
    started_serve: bool


def token_auth_hint() -> str:
    """``RAY_AUTH_MODE=token `` when another process must present this machine's Ray token
    (Ray >= 2.59 local clusters require it; Ray reads the mode once, at import)."""
    has_token = Path("~/.ray/auth_token").expanduser().exists() or "RAY_AUTH_TOKEN" in os.environ
    return "RAY_AUTH_MODE=token " if has_token and "RAY_AUTH_MODE" not in os.environ else ""


def use_haproxy_ingress() -> None:
    """Serve's HAProxy front (:data:`~oodlab.serve.config.HAPROXY_INGRESS_ENV`) in this
    process's environment, for the one-node Ray it is about to start."""
    os.environ.update(HAPROXY_INGRESS_ENV)
    # a stopping replica stays reachable this long for load balancers on other nodes to drop
    # it (Serve's default 30 s); with one local node and Serve's own HAProxy, 5 s will do
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")


def connect(address: str | None = None, existing: bool = False) -> bool:
    """Connect to ``address`` (else RAY_ADDRESS; with ``existing``, else "auto"), or start a
    local Ray. Returns True if this call started Ray."""
    import ray

    from oodlab.cluster.ray_local import init_ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or ("auto" if existing else None)
    try:
        init_ray(address, log_to_driver=False)
    except (ConnectionError, RuntimeError) as err:
        text = str(err)
        hint = (f"; the cluster wants Ray's auth token: run with {token_auth_hint()}in front"
                if "auth" in text.lower() and token_auth_hint() else "")
        raise ServeError(f"cannot connect to Ray at {address}: "
                         f"{text.strip().splitlines()[-1][:300]}{hint}") from None
    return address is None


def dashboard_url() -> str:
    """The Ray dashboard that serves the Serve REST API of the connected cluster."""
    url = os.environ.get("RAY_DASHBOARD_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not url:
        import ray

        host = ray.get_runtime_context().gcs_address.rpartition(":")[0]
        url = f"http://{host}:{DEFAULT_DASHBOARD_PORT}"
    return url.rstrip("/")


def _ray_auth() -> dict[str, str]:
    """The ``Authorization`` header for a Ray cluster with token auth, from where Ray reads
    its token: ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``
    (docs.ray.io, "Ray token authentication"). Without a token, none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def serve_api(method: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """One call of the Serve REST API: ``GET`` the instance details, ``PUT`` a whole config
    (validated against ``ServeDeploySchema`` first)."""
    from ray.serve.schema import ServeDeploySchema

    url = dashboard_url() + SERVE_API
    data = None
    if config is not None:
        ServeDeploySchema.model_validate(config)  # the field at fault, before any request
        data = json.dumps(config).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **_ray_auth()})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            body = resp.read()
    except urllib.error.HTTPError as err:
        raise ServeError(f"{method} {url}: HTTP {err.code}: "
                         f"{err.read().decode(errors='replace').strip()[:800]}") from None
    except OSError as err:
        raise ServeError(f"cannot reach the Serve REST API at {url} ({err}); point "
                         "RAY_DASHBOARD_ADDRESS at the cluster's dashboard") from None
    return json.loads(body) if body.strip() else {}


def deployed_apps(details: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The declaratively deployed applications' configs, by name."""
    return {name: app["deployed_app_config"]
            for name, app in (details.get("applications") or {}).items()
            if app.get("deployed_app_config")}


def _apply(details: dict[str, Any], apps: dict[str, dict[str, Any]],
           cluster: dict[str, Any]) -> None:
    """PUT ``apps`` (the whole declarative state) with the proxy options of ``cluster``; a
    running Serve keeps its own, which cannot change while it runs."""
    if details.get("controller_info"):
        http = details.get("http_options") or {}
        cluster = {"http_options": {k: http[k] for k in ("host", "port") if k in http}}
        if details.get("proxy_location"):
            cluster["proxy_location"] = details["proxy_location"]
    serve_api("PUT", cluster | {"applications": list(apps.values())})


def wait_running(app_name: str, timeout_s: float = 180.0,
                 stop: threading.Event | None = None) -> None:
    """Block until the application is RUNNING (or ``stop`` is set); raise ServeError with
    Serve's message if its deployment fails (e.g. the model cannot be loaded) or it takes
    longer than ``timeout_s``."""
    from ray import serve

    stop = stop or threading.Event()
    deadline, status = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline and not stop.is_set():
        app = serve.status().applications.get(app_name)
        status = app.status if app else None
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            msgs = [app.message] + [f"{n}: {d.message}" for n, d in app.deployments.items()
                                    if d.message]
            raise ServeError(f"application {app_name!r} {status}: " + "\n".join(m for m in msgs
                                                                                 if m))
        stop.wait(0.25)
    if stop.is_set():
        return
    raise ServeError(f"application {app_name!r} not running after {timeout_s:.0f}s "
                     f"(status {status})")


def http_url(details: dict[str, Any], route_prefix: str = "/") -> str:
    """The loopback URL of the Serve proxy as it actually runs (not as requested)."""
    http = details.get("http_options") or {}
    host = http.get("host") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{http.get('port', 8000)}{route_prefix.rstrip('/')}"


def deploy(opts: ServeOptions, address: str | None = None, timeout_s: float = 180.0,
           stop: threading.Event | None = None) -> Deployment:
    """Deploy (or update) ``opts`` as one application; other applications stay as they are.
    A set ``stop`` ends the wait for it to run (the caller then removes it)."""
    started_ray = connect(address)
    details = serve_api("GET")
    started_serve = not details.get("controller_info")
    apps = deployed_apps(details)
    apps[opts.app_name] = app_config(opts)
    _apply(details, apps, serve_config(opts, host=opts.host))
    wait_running(opts.app_name, timeout_s, stop)
    return Deployment(opts.app_name, http_url(serve_api("GET"), opts.route_prefix),
                      started_ray, started_serve)


@dataclass
class Reload:
    app_name: str
    model: str
    old_version: str | None
    new_version: str

    @property
    def changed(self) -> bool:
        return self.old_version != self.new_version


def reload(app_name: str = "oodlab", version: str | None = None, address: str | None = None,
           timeout_s: float = 180.0) -> Reload:
    """Point a running application at ``version`` (default: where its alias points now).

    Only the deployment's ``user_config.version`` changes, so the replicas load the new
    version in ``reconfigure`` while they keep answering with the old one."""
    connect(address, existing=True)
    details = serve_api("GET")
    if not details.get("controller_info"):
        raise ServeError("no Ray Serve instance on this cluster")
    apps = deployed_apps(details)
    if app_name not in apps:
        raise ServeError(f"no application {app_name!r} deployed by oodlab serve here "
                         f"(found: {sorted(apps) or 'none'})")
    deployment = next((d for d in apps[app_name].get("deployments", [])
                       if d.get("name") == DEPLOYMENT_NAME), None)
    if deployment is None or not deployment.get("user_config"):
        raise ServeError(f"application {app_name!r} has no {DEPLOYMENT_NAME} user_config")
    cfg = ModelConfig.model_validate(deployment["user_config"])
    target = version or resolve(cfg.model, cfg.tracking_uri).version
    result = Reload(app_name, cfg.model, cfg.version, target)
    if result.changed:
        name, _, _ = split_ref(cfg.model)
        resolve(f"models:/{name}/{target}", cfg.tracking_uri)  # exists, before any replica
        deployment["user_config"] = cfg.model_copy(update={"version": target}).model_dump()
        _apply(details, apps, {})
        wait_running(app_name, timeout_s)
    return result


def remove(dep: Deployment) -> None:
    """Undo what :func:`deploy` started. The application goes first: its route disappears
    and its replicas finish the requests in flight (``graceful_shutdown_timeout_s``) before
    they stop; then Serve and Ray, if this process started them."""
    import ray
    from ray import serve

    serve.delete(dep.app_name)
    if dep.started_serve:
        serve.shutdown()
    if dep.started_ray:
        ray.shutdown()
