"""The ``oodlab`` command: the top-level parser, the shared ``--set`` option and the mapping
of errors to exit codes. Each subcommand group lives in its own module of this package and
registers itself with ``add_parser(sub)``; their heavy imports (torch, Ray, MLflow) happen
inside the command functions, so ``oodlab --help`` stays fast.

Exit codes: 0 success, 1 a run that failed, 2 bad input (spec, arguments, missing data).

The terminal shows oodlab's own lines; Ray's and MLflow's logs go to
``<workdir>/logs/oodlab-<time>.log`` (named on the terminal), or to the terminal with
``-v`` (:func:`oodlab.console.library_logs`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from oodlab import __version__
from oodlab.console import library_logs, stderr
from oodlab.errors import ModelReferenceError, SpecError

EXIT_BAD_INPUT = 2

EPILOG = """examples:
  oodlab run jobs/quickstart.yaml
  oodlab run jobs/quickstart.yaml --set train.epochs=1 --set resources.num_workers=2
  oodlab -v run jobs/quickstart.yaml       # Ray's and MLflow's logs here, not in a file
  oodlab tune jobs/quickstart.yaml --space search_spaces/energy_oe.yaml
  oodlab promote <run_id>
  oodlab data list
"""


def add_set(parser: argparse.ArgumentParser) -> None:
    """The ``--set KEY=VALUE`` spec override option, shared by every spec-taking command."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field (dotted path, YAML value), e.g. "
                             "train.epochs=3; repeatable")


VERBOSE_HELP = ("show Ray's and MLflow's logs here instead of in <workdir>/logs/oodlab-<time>.log")


def local_tracking_uri(explicit: str | None = None) -> str:
    """The MLflow store a command without a spec reads: ``explicit`` (``--tracking-uri``),
    else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<OODLAB_WORKDIR or .oodlab>/mlflow.db``."""
    if explicit or os.environ.get("MLFLOW_TRACKING_URI"):
        return explicit or os.environ["MLFLOW_TRACKING_URI"]
    workdir = Path(os.environ.get("OODLAB_WORKDIR", ".oodlab")).expanduser().resolve()
    return f"sqlite:///{workdir / 'mlflow.db'}"


def build_parser() -> argparse.ArgumentParser:
    # imported here, not at the top: each of these modules imports add_set from this one
    from oodlab.cli import data, jobs, report, results, run, tune
    from oodlab.cli.posthoc import add_parser as add_posthoc_parser
    from oodlab.cli.serve import add_parser as add_serve_parser

    parser = argparse.ArgumentParser(
        prog="oodlab", description="Train, evaluate and track OOD detectors on Ray.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"oodlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_parser(sub)        # run, oe-select
    results.add_parser(sub)    # results
    tune.add_parser(sub)       # tune, promote
    data.add_parser(sub)       # data list
    add_serve_parser(sub)      # serve [build]
    report.add_parser(sub)     # report
    jobs.add_parser(sub)       # submit, jobs list|status|logs|stop
    add_posthoc_parser(sub)    # tune-posthoc
    for command in sub.choices.values():  # also after the command: oodlab run -v ...
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help=VERBOSE_HELP)
    return parser


def log_dir(args: argparse.Namespace) -> Path:
    """``<workdir>/logs`` of the command's spec (with its ``--set``), else of
    ``$OODLAB_WORKDIR`` or a ``--set workdir=...``, else ``.oodlab/logs``. A spec that does not
    load is left to the command to report."""
    spec = getattr(args, "spec", None) or next(iter(getattr(args, "specs", None) or []), None)
    overrides = getattr(args, "set", None) or []
    if isinstance(spec, str):
        from oodlab.spec import load_spec

        try:
            return load_spec(spec, overrides).workdir_path / "logs"
        except (SpecError, OSError, ValueError):
            pass
    workdir = next((o.partition("=")[2] for o in overrides if o.startswith("workdir=")),
                   ".oodlab")
    return Path(os.environ.get("OODLAB_WORKDIR", workdir)).expanduser().resolve() / "logs"


def _bad_input(err: Exception) -> int:
    print(f"oodlab: error: {err}", file=stderr())
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv_echo = list(argv if argv is not None else sys.argv[1:])
    try:
        with library_logs(log_dir(args), verbose=args.verbose):
            return args.func(args)
    except (SpecError, ModelReferenceError) as err:
        return _bad_input(err)
    except (ValueError, FileNotFoundError) as err:
        # the data layer imports torch: only load it to classify an error that may be its own
        from oodlab.data.types import DataError, DatasetNotFoundError

        if not isinstance(err, (DataError, DatasetNotFoundError)):
            raise
        return _bad_input(err)


if __name__ == "__main__":
    sys.exit(main())
