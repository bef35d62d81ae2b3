"""Run the Serve config on a Ray cluster: deploy, reload the champion in place, tear down.

``oodlab serve`` deploys the very application entry that ``oodlab serve build`` writes,
through Serve's declarative path (the one ``serve deploy`` and KubeRay use). Only that
path keeps a deployment's code version when just its ``user_config`` changes, so a reload
reaches the running replicas' ``reconfigure`` instead of replacing them. The declarative
calls (``serve_start`` / ``deploy_apps`` / ``get_serve_details``) are Ray 2.60's
``ray.serve._private`` client API, the same the ``serve run config.yaml`` command uses;
they are kept to this module.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oodlab.serve.build import app_config
from oodlab.serve.config import DEPLOYMENT_NAME, ModelConfig, ServeOptions, split_ref
from oodlab.serve.registry import resolve


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


def connect(address: str | None = None, existing: bool = False) -> bool:
    """Connect to ``address`` (else RAY_ADDRESS; with ``existing``, else "auto"), or start a
    local Ray. Returns True if this call started Ray."""
    import ray

    from oodlab.ray_local import init_ray

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


def _client(start: bool = False, host: str = "127.0.0.1", port: int = 8000):
    from ray.serve._private import api as serve_api
    from ray.serve.context import _get_global_client

    if start:
        return serve_api.serve_start(http_options={"host": host, "port": port})
    return _get_global_client()


def _serve_running() -> bool:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def deployed_apps(client) -> dict[str, dict[str, Any]]:
    """The declaratively deployed applications' configs, by name."""
    apps = client.get_serve_details().get("applications", {})
    return {name: app["deployed_app_config"] for name, app in apps.items()
            if app.get("deployed_app_config")}


def _apply(client, apps: dict[str, dict[str, Any]]) -> None:
    from ray.serve.schema import ServeDeploySchema

    client.deploy_apps(ServeDeploySchema.model_validate({"applications": list(apps.values())}))


def wait_running(app_name: str, timeout_s: float = 180.0) -> None:
    """Block until the application is RUNNING; raise ServeError with Serve's message if its
    deployment fails (e.g. the model cannot be loaded) or it takes longer than ``timeout_s``."""
    from ray import serve

    deadline, status = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        status = app.status if app else None
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            msgs = [app.message] + [f"{n}: {d.message}" for n, d in app.deployments.items()
                                    if d.message]
            raise ServeError(f"application {app_name!r} {status}: " + "\n".join(m for m in msgs
                                                                                 if m))
        time.sleep(0.25)
    raise ServeError(f"application {app_name!r} not running after {timeout_s:.0f}s "
                     f"(status {status})")


def http_url(client, route_prefix: str = "/") -> str:
    """The loopback URL of the Serve proxy as it actually runs (not as requested)."""
    http = client.get_serve_details().get("http_options") or {}
    host = http.get("host") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{http.get('port', 8000)}{route_prefix.rstrip('/')}"


def deploy(opts: ServeOptions, address: str | None = None,
           timeout_s: float = 180.0) -> Deployment:
    """Deploy (or update) ``opts`` as one application; other applications stay as they are."""
    started_ray = connect(address)
    started_serve = not _serve_running()
    client = _client(start=True, host=opts.host, port=opts.port)
    apps = deployed_apps(client)
    apps[opts.app_name] = app_config(opts)
    _apply(client, apps)
    wait_running(opts.app_name, timeout_s)
    return Deployment(opts.app_name, http_url(client, opts.route_prefix), started_ray,
                      started_serve)


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
    from ray.serve.exceptions import RayServeException

    connect(address, existing=True)
    try:
        client = _client()
    except RayServeException as err:
        raise ServeError(f"no Ray Serve instance on this cluster ({err})") from None
    apps = deployed_apps(client)
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
        _apply(client, apps)
        wait_running(app_name, timeout_s)
    return result


def remove(dep: Deployment) -> None:
    """Undo what :func:`deploy` started: the app, and Serve/Ray if this process started them."""
    import ray
    from ray import serve

    if dep.started_serve:
        serve.shutdown()
    else:
        serve.delete(dep.app_name)
    if dep.started_ray:
        ray.shutdown()
