"""``oodlab serve build``: the Serve config (``serve deploy`` / KubeRay ``serveConfigV2``).

The same application entry is what ``oodlab serve`` deploys locally, so the file that goes
to Kubernetes is the one that was run and tested here. No secret is ever written: the token
reaches replicas through ``token_file`` (a mounted Secret) or ``$OODLAB_SERVE_TOKEN``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from oodlab.serve.config import DEPLOYMENT_NAME, IMPORT_PATH, ServeOptions


def app_config(opts: ServeOptions) -> dict[str, Any]:
    """One ``applications[]`` entry: import path + args + the deployment with user_config."""
    deployment = {"name": DEPLOYMENT_NAME, **opts.deployment.serve_fields(),
                  "user_config": opts.model.model_dump()}
    return {
        "name": opts.app_name,
        "route_prefix": opts.route_prefix,
        "import_path": IMPORT_PATH,
        "args": opts.args.model_dump(),
        "deployments": [deployment],
    }


def serve_config(opts: ServeOptions, host: str = "0.0.0.0") -> dict[str, Any]:
    """A whole Serve config (``ServeDeploySchema``); in a cluster the proxy binds ``host``."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": opts.port},
        "applications": [app_config(opts)],
    }


def validate(config: dict[str, Any]) -> None:
    """Check a config against Ray Serve's own schema (raises with the bad field)."""
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)


def write_config(opts: ServeOptions, out: str | Path, host: str = "0.0.0.0") -> Path:
    config = serve_config(opts, host)
    validate(config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Ray Serve config written by `oodlab serve build`. Deploy with `serve deploy`, or\n"
              "# embed it as a RayService's spec.serveConfigV2. Editing deployments[].user_config\n"
              "# (e.g. version) reloads the model in place; editing args restarts replicas.\n")
    out.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return out
