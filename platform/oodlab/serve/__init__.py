"""Serving: the registered champion detector over HTTP with Ray Serve.

Modules, one job each:

* ``config``: typed options (``user_config`` / builder ``args`` / deployment fields);
* ``registry``: alias -> version, load a version, its metrics;
* ``payload`` and ``images``: request body -> raw images -> model input tensors, with 4xx
  errors that name the bad field;
* ``auth``: the bearer-token FastAPI dependency, constant-time comparison;
* ``app``: the Serve deployment and its FastAPI ingress; ``build_app`` is the import path;
* ``build``: the Serve config YAML (``serve deploy``, KubeRay ``serveConfigV2``);
* ``deploy``: deploy / reload in place / remove on a Ray cluster (Serve REST API);
* ``smoke``: serve, score one image over loopback HTTP, tear down.

The ``oodlab serve`` command is :mod:`oodlab.cli.serve`.

Importing this package is cheap; Ray, MLflow and torch load with the module that needs them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["serve_and_score_once"]


def __getattr__(name: str) -> Any:
    if name == "serve_and_score_once":
        from oodlab.serve.smoke import serve_and_score_once

        return serve_and_score_once
    raise AttributeError(f"module 'oodlab.serve' has no attribute {name!r}")
