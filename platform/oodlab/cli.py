"""The ``oodlab`` command. Thin: parse arguments, load and validate the spec, call the library.

Exit codes: 0 success, 1 a run that failed, 2 bad input (spec, arguments, missing data).
"""

from __future__ import annotations

import argparse
import sys

from oodlab import __version__

EXIT_BAD_INPUT = 2

EPILOG = """examples:
  oodlab run jobs/quickstart.yaml
  oodlab run jobs/quickstart.yaml --set train.epochs=1 --set resources.num_workers=2
  oodlab data list
"""


def _cmd_run(args: argparse.Namespace) -> int:
    from oodlab.config import load_spec

    spec = load_spec(args.spec, args.set)  # SpecError -> exit 2 before Ray or MLflow start
    from oodlab.pipeline import results_table, run_experiment

    result = run_experiment(spec, spec_path=args.spec)
    sets = list(result.report.scores[spec.eval.scores[0]].per_set)
    print()
    print(f"== {spec.name}: method {spec.method.name}, ID {spec.data.id} "
          f"(test ID accuracy {result.metrics['test/id_acc']:.3f}) ==")
    print(results_table(result.metrics, spec.eval.scores, sets))
    print(f"\nserved score: {spec.eval.scores[0]}, threshold {result.metrics['threshold']:.4f} "
          f"(95% TPR on ID validation)")
    print(f"MLflow run {result.run_id}; model {result.model['model_uri']}")
    print(f"open the UI with:  .venv/bin/mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


def _cmd_data_list(args: argparse.Namespace) -> int:
    from oodlab.data import list_datasets

    rows = list_datasets()
    print(f"{'name':<18}{'role':<10}{'source':<10}{'count':>7}  description")
    for d in rows:
        count = "" if d.count is None else str(d.count)
        print(f"{d.name:<18}{d.role:<10}{d.source:<10}{count:>7}  {d.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oodlab", description="Train, evaluate and track OOD detectors on Ray.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"oodlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="train + evaluate one spec on Ray, tracked in MLflow",
        description="Train the spec's method with Ray Train, evaluate it on every OOD set, "
                    "log everything to MLflow and print a results table.")
    run.add_argument("spec", help="experiment spec (YAML), e.g. jobs/quickstart.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec field (dotted path, YAML value); repeatable")
    run.set_defaults(func=_cmd_run)

    data = sub.add_parser("data", help="built-in and external datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    dl = data_sub.add_parser("list", help="list every registered dataset with its role and size")
    dl.set_defaults(func=_cmd_data_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    from oodlab.config import SpecError
    from oodlab.data.registry import DataError, DatasetNotFoundError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, DataError, DatasetNotFoundError) as err:
        print(f"oodlab: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
