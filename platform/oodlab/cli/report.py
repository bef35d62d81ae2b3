"""``oodlab report``: every method on every benchmark, from MLflow, as Markdown and HTML.

The library side is :mod:`oodlab.report.report` (it imports numpy, matplotlib and MLflow), so
it is imported inside the command.
"""

from __future__ import annotations

import argparse

from oodlab.cli.main import EXIT_BAD_INPUT, local_tracking_uri
from oodlab.console import stderr


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``oodlab report`` on the top-level subparsers."""
    rep = sub.add_parser(
        "report", help="compare every method on every benchmark from MLflow (Markdown + HTML)",
        description="Read the finished runs made by `oodlab results` (tag oodlab.results) and "
                    "write report.md, report.html and plots/ to --out: per benchmark (data.id), "
                    "FPR@95 / AUROC / AUPR-in per OOD set and the ID metric, mean ± std over "
                    "seeds with the seed count, best per column marked, a head/tail table for "
                    "multi-label runs, each row's ROC and histogram plots and run links.")
    rep.add_argument("--experiment", action="append", default=[], metavar="NAME",
                     help="MLflow experiment to read (repeatable; default: all)")
    rep.add_argument("--table", help="only runs of this `oodlab results --name` table")
    rep.add_argument("--out", default="docs/results/report", help="output directory")
    rep.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else "
                                            "sqlite:///<OODLAB_WORKDIR or .oodlab>/mlflow.db)")
    rep.add_argument("--mlflow-url", default="http://127.0.0.1:5000",
                     help="base URL of the MLflow UI, for run links")
    rep.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from oodlab.report.report import write_report

    uri = local_tracking_uri(args.tracking_uri)
    try:
        md, page = write_report(uri, args.out, args.experiment or None, args.table,
                                args.mlflow_url, "oodlab " + " ".join(args.argv_echo))
    except ValueError as err:
        print(f"oodlab: error: {err}", file=stderr())
        return EXIT_BAD_INPUT
    print(f"written {md} and {page}")
    return 0
