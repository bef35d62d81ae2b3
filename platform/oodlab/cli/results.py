"""``oodlab results``: run specs over seeds, then a mean ± std table rebuilt from MLflow.

The library side is :mod:`oodlab.report.results`; it is imported inside the command.
"""

from __future__ import annotations

import argparse

from oodlab.cli.main import add_set


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``oodlab results`` on the top-level subparsers."""
    res = sub.add_parser(
        "results", help="run specs over seeds and write a mean ± std table from MLflow",
        description="Run each spec once per seed (tagged in MLflow), then write a Markdown "
                    "table of mean ± std over seeds, rebuilt from MLflow. Text from the line "
                    "'<!-- notes: kept when this file is regenerated -->' on in an existing "
                    "--out file is kept.")
    res.add_argument("specs", nargs="+", help="experiment specs (YAML)")
    res.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    res.add_argument("--name", required=True, help="table name (MLflow tag oodlab.results)")
    res.add_argument("--out", required=True, help="Markdown file to write")
    res.add_argument("--scores", nargs="+", default=[], metavar="SCORE",
                     help="one row per spec and score (each must be in the specs' eval.scores); "
                          "default: the served score only")
    res.add_argument("--per-set", nargs="+", default=[], metavar="METRIC",
                     choices=["auroc", "fpr95", "aupr_in"],
                     help="also write a table per metric with a column per test OOD set")
    res.add_argument("--baseline", metavar="SPEC_NAME",
                     help="also write per-seed paired differences of every other spec against "
                          "this one (its spec name), with a shown / not shown verdict")
    res.add_argument("--curves", nargs="+", default=[], metavar="METRIC",
                     help="also tabulate and plot these per-epoch metrics (e.g. val/auroc "
                          "um/ascent_fraction), mean ± std over seeds, to <out>_curves.png")
    add_set(res)
    res.add_argument("--table-only", action="store_true",
                     help="do not run anything; rebuild the table from MLflow")
    res.add_argument("--resume", action="store_true",
                     help="skip a spec and seed that already has a finished run in this table "
                          "(continue an interrupted table; the table name must stand for one "
                          "setup, overrides are not compared)")
    res.set_defaults(func=_cmd_results)


def _cmd_results(args: argparse.Namespace) -> int:
    from oodlab.spec import SpecError, load_spec

    specs = [load_spec(p, args.set) for p in args.specs]  # validate all before running any
    for spec in specs:
        missing = [s for s in args.scores if s not in spec.eval.scores]
        if missing:
            raise SpecError(f"--scores {missing}: not in eval.scores of spec {spec.name!r} "
                            f"({spec.eval.scores})")
    if args.baseline and args.baseline not in {s.name for s in specs}:
        raise SpecError(f"--baseline {args.baseline!r}: not the name of one of the specs "
                        f"({', '.join(s.name for s in specs)})")
    from oodlab.report.results import run_seeds, write_report

    if not args.table_only:
        run_seeds(args.specs, args.seeds, args.name, args.set, resume=args.resume)
    # Echo the command that regenerates the runs too (without --table-only / --resume).
    command = "oodlab " + " ".join(a for a in args.argv_echo
                                   if a not in ("--table-only", "--resume"))
    out = write_report(specs, args.name, args.out, command, args.scores, args.per_set,
                       baseline=args.baseline, curves=args.curves)
    print(out.read_text())
    print(f"written to {out}")
    return 0
