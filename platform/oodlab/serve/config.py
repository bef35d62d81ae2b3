"""Typed serving options, split the way Ray Serve applies them.

* :class:`ModelConfig` is the deployment's ``user_config``: which model, which version,
  where the registry is, and the batching knobs. Serve hands a change of it to the running
  replicas' ``reconfigure`` in place (no restart): that is how a new champion goes live.
* :class:`AppArgs` are the application builder's ``args``: request limits, auth, device.
  A change of them is a new code version, so Serve replaces the replicas (rolling).
* :class:`DeploymentOptions` are Serve's own per-deployment fields (replicas, autoscaling,
  resources); a change of the replica count is applied in place too.
* :class:`ServeOptions` bundles the three with the application name, route and port; it is
  what ``oodlab serve`` and ``oodlab serve build`` turn into a Serve config.
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from oodlab.serve.autoscale import POLICY_PATH
from oodlab.spec.base import StrictModel

DEPLOYMENT_NAME = "OODScorer"
IMPORT_PATH = "oodlab.serve.app:build_app"
TOKEN_ENV = "OODLAB_SERVE_TOKEN"
DEFAULT_ALIAS = "champion"
# Serve's throughput-optimized mode with HAProxy (Ray >= 2.56; the binary comes with
# ray[serve]): HAProxy listens on the HTTP port in place of Serve's Python proxy actor and
# forwards to each ingress replica's own HTTP port (direct ingress). Every Serve process
# reads these at import, so they must be in the environment of the Ray that runs Serve
# (docs.ray.io, "Enable High Throughput on Ray Serve with KubeRay").
HAPROXY_INGRESS_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
INGRESS_MODES = ("proxy", "haproxy")
BatchStage = Literal["auto", "thread", "loop"]
BATCH_STAGES: tuple[str, ...] = get_args(BatchStage)
KEEP_HEAP_MB = 64  # AppArgs.keep_heap_mb's default: a few batches of a small CNN's activations
_MODEL_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def normalise_ref(ref: str) -> str:
    """``name`` -> ``models:/name@champion``; a ``models:/`` reference is checked as is."""
    ref = ref.strip()
    if not ref.startswith("models:/") and re.fullmatch(r"[A-Za-z0-9][\w.\-]*", ref):
        ref = f"models:/{ref}@{DEFAULT_ALIAS}"
    if not _MODEL_REF.match(ref):
        raise ValueError(f"model {ref!r}: serve loads registered models only: "
                         "models:/<name>@<alias>, models:/<name>/<version> or a bare <name> "
                         f"(= models:/<name>@{DEFAULT_ALIAS})")
    return ref


def split_ref(ref: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of a normalised ``models:/`` reference."""
    m = _MODEL_REF.match(normalise_ref(ref))
    assert m is not None
    return m["name"], m["alias"], m["version"]


class ModelConfig(StrictModel):
    """The live part (Serve ``user_config``); replicas reconfigure in place when it changes."""

    model: str = Field(description="models:/<name>@<alias> or models:/<name>/<version>")
    version: str | None = Field(
        None, pattern=r"^\d+$",
        description="pin this registry version (set by `oodlab serve` and `--reload`); "
                    "unset: each replica resolves the alias when it (re)loads")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; unset: the replica's MLFLOW_TRACKING_URI")
    max_batch_size: int = Field(32, ge=1, le=4096, description="images per forward pass")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0,
                                        description="how long a batch waits to fill up")

    @field_validator("model")
    @classmethod
    def _ref(cls, v: str) -> str:
        return normalise_ref(v)

    @property
    def load_ref(self) -> str:
        """The reference replicas load: the pinned version if any, else ``model``."""
        name, _, _ = split_ref(self.model)
        return f"models:/{name}/{self.version}" if self.version else self.model


class AppArgs(StrictModel):
    """Static per-application settings (the builder's ``args``); changing them restarts."""

    max_images: int = Field(64, ge=1, le=10_000, description="images in one request")
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="request body size limit")
    max_pixels: int = Field(4096 * 4096, ge=64, description="pixels of one decoded image")
    token_file: str | None = Field(
        None, description=f"file holding the bearer token (else env {TOKEN_ENV}, else no auth)")
    require_token: bool = Field(
        False, description="fail at start-up if no token is found (never serve open by mistake)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when the replica has a GPU, else cpu")
    batch_stage: BatchStage = Field(
        "auto", description="where a batch is decoded and scored: 'thread', in a thread "
                            "beside the replica's event loop; 'loop', on the event loop between "
                            "batches; auto: 'loop' for a CPU replica with one CPU while its "
                            "batches take at most 50 ms, else 'thread'")
    keep_heap_mb: int = Field(
        KEEP_HEAP_MB, ge=0, le=4096,
        description="MiB of freed memory the replica's C heap keeps for the next batch "
                    "(glibc's malloc trim threshold, oodlab.cluster.heap); 0: glibc's "
                    "defaults, under which each batch's activations are returned to the "
                    "kernel and faulted back in, page by page, by the next")


class Autoscaling(StrictModel):
    """Serve's autoscaling_config with oodlab's images-in-flight policy
    (:mod:`oodlab.serve.autoscale`): the load of a replica is its images, not its requests."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_images: int = Field(
        32, ge=1, description="images in flight per replica to aim for (default: one full "
                              "batch of the default max_batch_size)")
    downscale_delay_s: float = Field(
        30.0, ge=0, description="how long a lower replica count must hold before scaling down")

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"autoscaling: max_replicas {self.max_replicas} < min_replicas "
                             f"{self.min_replicas}")
        return self

    def serve_config(self) -> dict[str, Any]:
        """Serve's ``autoscaling_config``, the policy named by import path."""
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "policy": {"policy_function": POLICY_PATH,
                           "policy_kwargs": {"target_images": self.target_images,
                                             "downscale_delay_s": self.downscale_delay_s}}}


class DeploymentOptions(StrictModel):
    """Serve's own deployment fields: replicas or autoscaling, resources, concurrency."""

    num_replicas: int = Field(1, ge=1, description="fixed replica count (without autoscaling)")
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(
        64, ge=1, description="requests in flight per replica; bounds how full a batch gets")

    def serve_fields(self) -> dict[str, Any]:
        """The ``deployments[]`` fields of a Serve config."""
        out: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.autoscaling is not None:
            out["autoscaling_config"] = self.autoscaling.serve_config()
        else:
            out["num_replicas"] = self.num_replicas
        return out


class ServeOptions(StrictModel):
    """Everything ``oodlab serve`` needs; one Serve application."""

    app_name: str = Field("oodlab", pattern=r"^[A-Za-z0-9][\w.\-]*$")
    route_prefix: str = Field("/", pattern=r"^/")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model: ModelConfig
    args: AppArgs = Field(default_factory=AppArgs)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
