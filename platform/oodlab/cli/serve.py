"""``oodlab serve``: serve, smoke-test, reload, or write the Serve config of a registered model.

Registered from :func:`oodlab.cli.main.build_parser` via :func:`add_parser`. Heavy imports (Ray,
MLflow, torch) happen inside the command, never at ``oodlab --help`` time.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from oodlab.cli.main import local_tracking_uri
from oodlab.console import stderr
from oodlab.serve.config import (
    BATCH_STAGES,
    DEFAULT_ALIAS,
    HAPROXY_INGRESS_ENV,
    INGRESS_MODES,
    KEEP_HEAP_MB,
    TOKEN_ENV,
    ServeOptions,
)

if TYPE_CHECKING:
    from oodlab.serve.deploy import Deployment

EPILOG = f"""examples:
  oodlab serve models:/quickstart-detector@champion          # http://127.0.0.1:8000/docs
  oodlab serve --spec jobs/quickstart.yaml --smoke           # serve, score one image, stop
  oodlab serve --reload                                      # after moving the alias
  oodlab serve build --spec jobs/quickstart.yaml --tracking-uri http://mlflow:5000 \\
      --token-file /etc/oodlab/token --require-token -o k8s/serve_config.yaml

MODEL is models:/<name>@<alias>, models:/<name>/<version> or a bare <name>
(= models:/<name>@{DEFAULT_ALIAS}); without it, the --spec's tracking.model_name@{DEFAULT_ALIAS}.
Auth: set ${TOKEN_ENV} or --token-file; then every endpoint but /healthz needs
'Authorization: Bearer <token>'. See docs/serving.md.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``oodlab serve`` (with its ``build`` action) on the top-level subparsers."""
    p = sub.add_parser(
        "serve", help="serve the registered champion over HTTP with Ray Serve",
        description="Serve a registered detector (default alias champion) as a Ray Serve "
                    "application with a FastAPI ingress: POST /v1/score, GET /v1/model, "
                    "GET /healthz, /docs. `oodlab serve build` writes the same application "
                    "as a Serve config (serve deploy / KubeRay serveConfigV2).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("words", nargs="*", metavar="[build] [MODEL]",
                   help="`build` to write the Serve config instead of serving; MODEL as below")
    src = p.add_argument_group("model")
    src.add_argument("--spec", help="experiment spec whose tracking.model_name (and tracking "
                                    "URI) to serve")
    src.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's, else "
                                            "MLFLOW_TRACKING_URI, else .oodlab/mlflow.db)")
    src.add_argument("--version", help="serve (or --reload to) this registry version instead "
                                       "of the alias's current one")
    app = p.add_argument_group("application")
    app.add_argument("--name", default="oodlab", help="Serve application name (default oodlab)")
    app.add_argument("--route-prefix", default="/")
    app.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    app.add_argument("--port", type=int, default=8000)
    app.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    app.add_argument("--batch-stage", choices=BATCH_STAGES, default="auto",
                     help="where a replica decodes and scores a batch: thread (beside its "
                          "event loop) or loop (on it, between batches); auto (default): loop "
                          "for a CPU replica with one CPU, where a thread only shares the "
                          "loop's core, while batches take at most 50 ms; else thread")
    app.add_argument("--keep-heap-mb", type=int, default=KEEP_HEAP_MB,
                     help="MiB of freed memory a replica keeps for its next batch (glibc's "
                          f"malloc trim threshold; default {KEEP_HEAP_MB}); 0: glibc's "
                          "defaults, which return each batch's activations to the kernel and "
                          "fault them back in")
    app.add_argument("--ingress", choices=INGRESS_MODES, default="proxy",
                     help="HTTP front of the Ray this command starts: Serve's Python proxy "
                          "(default) or HAProxy forwarding to the replicas' own ports "
                          "(Serve's throughput-optimized mode; see docs/serving.md)")
    bat = p.add_argument_group("batching and scaling")
    bat.add_argument("--max-batch-size", type=int, default=32, help="images per forward pass")
    bat.add_argument("--batch-wait-ms", type=float, default=5.0,
                     help="how long a batch waits to fill (default 5)")
    bat.add_argument("--replicas", type=int, default=1, help="fixed replica count")
    bat.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX "
                                                            "replicas instead")
    bat.add_argument("--target-images", type=int, default=32,
                     help="autoscaling target: images in flight per replica (default 32)")
    bat.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    bat.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    bat.add_argument("--max-ongoing", type=int, default=64,
                     help="requests in flight per replica")
    lim = p.add_argument_group("limits and auth")
    lim.add_argument("--max-images", type=int, default=64, help="images per request")
    lim.add_argument("--max-body-mb", type=float, default=8.0, help="request body size limit")
    lim.add_argument("--token-file", help=f"bearer token file (else ${TOKEN_ENV})")
    lim.add_argument("--require-token", action="store_true",
                     help="replicas refuse to start without a token")
    act = p.add_argument_group("actions")
    act.add_argument("--smoke", action="store_true",
                     help="score one rendered image over HTTP, print it, then stop")
    act.add_argument("--keep", action="store_true", help="with --smoke: keep serving")
    act.add_argument("--reload", action="store_true",
                     help="switch a running application to where the alias points now "
                          "(in place, no downtime)")
    act.add_argument("--detach", action="store_true",
                     help="return once deployed (needs --address or RAY_ADDRESS)")
    act.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS; for "
                                       "--reload, else 'auto')")
    act.add_argument("-o", "--out", default="serve_config.yaml",
                     help="build: file to write (default serve_config.yaml)")
    p.set_defaults(func=run)


def _words(words: list[str]) -> tuple[bool, str | None]:
    from oodlab.spec import SpecError

    build = bool(words) and words[0] == "build"
    rest = words[1:] if build else words
    if len(rest) > 1:
        raise SpecError(f"serve: expected [build] [MODEL], got {' '.join(words)!r}")
    return build, (rest[0] if rest else None)


def _model_source(args: argparse.Namespace, ref: str | None, build: bool
                  ) -> tuple[str, str | None]:
    """(model reference, tracking URI) from MODEL, --spec and --tracking-uri."""
    from oodlab.spec import SpecError

    spec = None
    if args.spec:
        from oodlab.spec import load_spec

        spec = load_spec(args.spec)
    if ref is None:
        if spec is None or not spec.tracking.model_name:
            raise SpecError("serve: give MODEL (models:/<name>@<alias>) or a --spec with "
                            "tracking.model_name")
        ref = f"models:/{spec.tracking.model_name}@{DEFAULT_ALIAS}"
    if args.tracking_uri or build:  # a built config must not point at a local sqlite file
        return ref, args.tracking_uri or (spec.tracking.tracking_uri if spec else None)
    if spec is not None:
        from oodlab.track.tracking import tracking_uri

        return ref, tracking_uri(spec)
    return ref, local_tracking_uri()


def options(args: argparse.Namespace, ref: str, tracking_uri: str | None, build: bool
            ) -> ServeOptions:
    """ServeOptions from the command line; a bad value is a SpecError naming the option."""
    from pydantic import ValidationError

    from oodlab.spec import SpecError

    autoscaling = None
    if args.autoscale:
        lo, sep, hi = args.autoscale.partition(":")
        if not (sep and lo.isdigit() and hi.isdigit()):
            raise SpecError(f"--autoscale {args.autoscale!r}: expected MIN:MAX, e.g. 1:4")
        autoscaling = {"min_replicas": int(lo), "max_replicas": int(hi),
                       "target_images": args.target_images}
    token_file = args.token_file
    if token_file and not build:
        token_file = str(Path(token_file).expanduser().resolve())
        if not Path(token_file).is_file():
            raise SpecError(f"--token-file {args.token_file!r}: no such file")
    require = args.require_token or bool(token_file) or (
        not build and bool(os.environ.get(TOKEN_ENV)))
    try:
        return ServeOptions.model_validate({
            "app_name": args.name, "route_prefix": args.route_prefix, "host": args.host,
            "port": args.port,
            "model": {"model": ref, "version": args.version, "tracking_uri": tracking_uri,
                      "max_batch_size": args.max_batch_size,
                      "batch_wait_timeout_s": args.batch_wait_ms / 1000.0},
            "args": {"max_images": args.max_images,
                     "max_body_bytes": int(args.max_body_mb * 2**20),
                     "token_file": token_file, "require_token": require,
                     "device": args.device, "batch_stage": args.batch_stage,
                     "keep_heap_mb": args.keep_heap_mb},
            "deployment": {"num_replicas": args.replicas, "autoscaling": autoscaling,
                           "num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
                           "max_ongoing_requests": args.max_ongoing},
        })
    except ValidationError as err:
        bad = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                        for e in err.errors())
        raise SpecError(f"serve options: {bad}") from None


def run(args: argparse.Namespace) -> int:
    """Entry point of ``oodlab serve``; exit 2 for bad input, 1 for a failed deployment."""
    from oodlab.serve.deploy import ServeError

    try:
        return _run(args)
    except ServeError as err:
        print(f"oodlab: serve failed: {err}", file=stderr())
        return 1


def _run(args: argparse.Namespace) -> int:
    from oodlab.spec import SpecError

    build, ref = _words(args.words)
    if args.reload:
        if build or ref:
            raise SpecError("--reload takes no MODEL and no build: it re-resolves the alias "
                            "of the running application (use --name to pick it)")
        return _reload(args)
    if args.detach and not (args.address or os.environ.get("RAY_ADDRESS")):
        raise SpecError("--detach needs a Ray cluster that outlives this command: give "
                        "--address or set RAY_ADDRESS")
    if args.ingress == "haproxy":
        _use_haproxy(args, build)
    ref, tracking = _model_source(args, ref, build)
    opts = options(args, ref, tracking, build)
    if build:
        from oodlab.serve.build import write_config

        out = write_config(opts, args.out)
        print(f"Serve config for {opts.model.model} written to {out}")
        return 0
    if args.smoke:
        from oodlab.serve.smoke import serve_and_score_once

        smoke = serve_and_score_once(opts.model.model, tracking, keep=args.keep, options=opts,
                                     address=args.address)
        return _block(smoke.deployment) if args.keep else 0
    return _serve(args, opts)


def _use_haproxy(args: argparse.Namespace, build: bool) -> None:
    """Put Serve's HAProxy mode into the environment of the Ray this command will start."""
    from oodlab.spec import SpecError

    env = " ".join(f"{k}={v}" for k, v in HAPROXY_INGRESS_ENV.items())
    hint = f"set {env} in the environment of the cluster's nodes (k8s/overlays/haproxy)"
    if build:
        raise SpecError(f"--ingress haproxy is not part of a Serve config: {hint}")
    if args.address or os.environ.get("RAY_ADDRESS"):
        raise SpecError(f"--ingress haproxy applies to the Ray this command starts: {hint}")
    from oodlab.serve.deploy import use_haproxy_ingress

    use_haproxy_ingress()


def _serve(args: argparse.Namespace, opts: ServeOptions) -> int:
    import ray

    from oodlab.console import progress
    from oodlab.serve.deploy import connect, dashboard_url, deploy, token_auth_hint
    from oodlab.serve.registry import resolve

    pinned = resolve(opts.model.load_ref, opts.model.tracking_uri)
    opts.model.version = pinned.version
    started_ray = connect(args.address)
    stop = None if args.detach else _stop_on_signals()  # Ray is up: from here on, gracefully
    progress(f"deploying {opts.model.model} (version {pinned.version}) as {opts.app_name!r}")
    dep = deploy(opts, args.address, stop=stop)
    dep.started_ray = started_ray
    if stop is None or not stop.is_set():
        print(f"serving {opts.model.model} (version {pinned.version}) at {dep.url}/v1/score; "
              f"docs {dep.url}/docs")
        address = ray.get_runtime_context().gcs_address
        print(f"after moving the alias: {token_auth_hint()}RAY_DASHBOARD_ADDRESS="
              f"{dashboard_url()} oodlab serve --reload --name {opts.app_name} "
              f"--address {address}", flush=True)
    if args.detach:
        return 0
    return _block(dep, stop)


class _Stop(threading.Event):
    """Set by the first SIGINT or SIGTERM; ``signame`` is its name."""

    signame: str = ""


def _stop_on_signals() -> _Stop:
    """From now on SIGINT (Ctrl-C) and SIGTERM set the returned event. Installed once Ray is
    up: Ray's driver replaces both handlers while it starts, and its core worker answers
    SIGTERM with a native stack dump and an abort."""
    stop = _Stop()

    def on_signal(signum: int, _frame: object) -> None:
        stop.signame = stop.signame or signal.Signals(signum).name
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def _block(dep: Deployment, stop: _Stop | None = None) -> int:
    """Serve until SIGINT (Ctrl-C) or SIGTERM, then stop gracefully: the application's route
    goes first (no new requests), its replicas answer the requests in flight, then Serve and
    Ray stop if this process started them. A second signal aborts the wait. A signal that
    came while the application deployed stops it the same way."""
    from oodlab.serve.deploy import remove

    stop = stop or _stop_on_signals()
    deployed = not stop.is_set()
    if deployed:
        print("Ctrl-C or SIGTERM stops the server", flush=True)
    while not stop.wait(1.0):
        pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    remove(dep)
    done = ("after answering the requests in flight" if deployed
            else "before it served (the signal came while it deployed)")
    print(f"oodlab serve: {stop.signame}: stopped {dep.app_name!r} at {dep.url} {done}",
          flush=True)
    return 0


def _reload(args: argparse.Namespace) -> int:
    from oodlab.serve.deploy import reload

    r = reload(args.name, args.version, args.address)
    if r.changed:
        print(f"{r.app_name}: {r.model} version {r.old_version} -> {r.new_version} "
              "(reloaded in place)")
    else:
        print(f"{r.app_name}: {r.model} already serves version {r.new_version}")
    return 0
