"""The ``oodlab`` command: the top-level parser, the shared ``--set`` option and the mapping
of errors to exit codes. Each subcommand group lives in its own module of this package and
registers itself with ``add_parser(sub)``; their heavy imports (torch, Ray, MLflow) happen
inside the command functions, so ``oodlab --help`` stays fast.

Exit codes: 0 success, 1 a run that failed, 2 bad input (spec, arguments, missing data).
"""

from __future__ import annotations

import argparse
import sys

from oodlab import __version__
from oodlab.errors import ModelReferenceError, SpecError

EXIT_BAD_INPUT = 2

EPILOG = """examples:
  oodlab run jobs/quickstart.yaml
  oodlab run jobs/quickstart.yaml --set train.epochs=1 --set resources.num_workers=2
  oodlab tune jobs/quickstart.yaml --space search_spaces/energy_oe.yaml
  oodlab promote <run_id>
  oodlab data list
"""


def add_set(parser: argparse.ArgumentParser) -> None:
    """The ``--set KEY=VALUE`` spec override option, shared by every spec-taking command."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field (dotted path, YAML value), e.g. "
                             "train.epochs=3; repeatable")


def build_parser() -> argparse.ArgumentParser:
    # imported here, not at the top: each of these modules imports add_set from this one
    from oodlab.cli import data, jobs, report, results, run, tune
    from oodlab.cli.posthoc import add_parser as add_posthoc_parser
    from oodlab.cli.serve import add_parser as add_serve_parser

    parser = argparse.ArgumentParser(
        prog="oodlab", description="Train, evaluate and track OOD detectors on Ray.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"oodlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_parser(sub)        # run, oe-select
    results.add_parser(sub)    # results
    tune.add_parser(sub)       # tune, promote
    data.add_parser(sub)       # data list
    add_serve_parser(sub)      # serve [build]
    report.add_parser(sub)     # report
    jobs.add_parser(sub)       # submit, jobs list|status|logs|stop
    add_posthoc_parser(sub)    # tune-posthoc
    return parser


def _bad_input(err: Exception) -> int:
    print(f"oodlab: error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv_echo = list(argv if argv is not None else sys.argv[1:])
    try:
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
