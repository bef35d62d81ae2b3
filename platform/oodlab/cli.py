"""The ``oodlab`` command. Thin: parse arguments, load and validate the spec, call the library.

Exit codes: 0 success, 1 a run that failed, 2 bad input (spec, arguments, missing data).
"""

from __future__ import annotations

import argparse
import sys

from oodlab import __version__
from oodlab.jobs import add_parser as add_jobs_parser
from oodlab.report import add_parser as add_report_parser
from oodlab.serve.cli import add_parser as add_serve_parser

EXIT_BAD_INPUT = 2

EPILOG = """examples:
  oodlab run jobs/quickstart.yaml
  oodlab run jobs/quickstart.yaml --set train.epochs=1 --set resources.num_workers=2
  oodlab tune jobs/quickstart.yaml --space search_spaces/energy_oe.yaml
  oodlab promote <run_id>
  oodlab data list
"""


def _cmd_run(args: argparse.Namespace) -> int:
    from oodlab.config import load_spec

    spec = load_spec(args.spec, args.set)  # SpecError -> exit 2 before Ray or MLflow start
    from oodlab.pipeline import headtail_table, results_table, run_experiment

    result = run_experiment(spec, spec_path=args.spec)
    sets = list(result.report.scores[spec.eval.scores[0]].per_set)
    print()
    id_key = "test/id_map" if "test/id_map" in result.metrics else "test/id_acc"
    print(f"== {spec.name}: method {spec.method.name}, ID {spec.data.id} "
          f"({id_key} {result.metrics.get(id_key, float('nan')):.3f}) ==")  # nan: unsupervised
    print(results_table(result.metrics, spec.eval.scores, sets))
    if "headtail/num_head_classes" in result.metrics:
        print()
        print(headtail_table(result.metrics, spec.eval.scores[0]))
    print(f"\nserved score: {spec.eval.scores[0]}, threshold {result.metrics['threshold']:.4f} "
          f"(95% TPR on ID validation)")
    print(f"MLflow run {result.run_id}; model {result.model['model_uri']}")
    print(f"open the UI with:  .venv/bin/mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


def _cmd_oe_select(args: argparse.Namespace) -> int:
    import json

    from oodlab.config import load_spec

    spec = load_spec(args.spec, args.set)
    if not spec.data.oe:
        from oodlab.config import SpecError

        raise SpecError("data.oe: list the OE candidate sets to rank")
    from oodlab import tracking
    from oodlab.pipeline import log_oe_selection, select_oe

    rows = select_oe(spec)
    print(f"{'candidate':<22}{'distance':>10}{'normalised':>12}  selected")
    for r in rows:
        mark = "yes" if r.selected else ""
        print(f"{r.name:<22}{r.distance:>10.4f}{r.normalised:>12.3f}  {mark}")
    run_id = tracking.start_run(spec, args.spec, tags={"oodlab.kind": "oe-select"})
    log_oe_selection(spec, run_id, rows)
    tracking.end_run(spec, run_id, ok=True)
    out = spec.workdir_path / "oe_select" / f"{spec.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"spec": spec.name, "selected": [r.name for r in rows if r.selected],
               "ranking": [vars(r) for r in rows], "mlflow_run": run_id}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out)
    print(f"choice written to {out} (MLflow run {run_id})")
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    from oodlab.config import SpecError, load_spec

    specs = [load_spec(p, args.set) for p in args.specs]  # validate all before running any
    for spec in specs:
        missing = [s for s in args.scores if s not in spec.eval.scores]
        if missing:
            raise SpecError(f"--scores {missing}: not in eval.scores of spec {spec.name!r} "
                            f"({spec.eval.scores})")
    from oodlab.results import run_seeds, write_report

    if not args.table_only:
        run_seeds(args.specs, args.seeds, args.name, args.set)
    # Echo the command that regenerates the runs too (without --table-only).
    command = "oodlab " + " ".join(a for a in args.argv_echo if a != "--table-only")
    out = write_report(specs, args.name, args.out, command, args.scores, args.per_set)
    print(out.read_text())
    print(f"written to {out}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from oodlab.config import load_spec
    from oodlab.search_space import check_space, load_space

    spec = load_spec(args.spec, args.set)
    space = load_space(args.space)
    check_space(space, spec)  # unknown field, empty range, unreported metric: exit 2 here
    from oodlab.promote import describe, promote
    from oodlab.tuning import run_search

    out = run_search(spec, space, args.space, name=args.name, resume=args.resume,
                     storage_url=args.storage)
    names = [o.metric for o in space.objectives]
    print(f"\n== search {out.name}: {len(out.trials)} trials, "
          f"{sum(t.epochs for t in out.trials)} epochs (study {out.study_storage}) ==")
    print(f"{'trial':<14}{'epochs':>7}  " + "".join(f"{m:>14}" for m in names) + "  params")
    for t in sorted(out.trials, key=lambda t: t.trial_id):
        star = "*" if t in out.pareto else " "
        vals = "".join(f"{v:>14.4f}" for v in t.values)
        print(f"{t.trial_id:<13}{star}{t.epochs:>7}  {vals}  "
              + ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items()))
    print("* = Pareto front" if len(names) > 1 else "* = best")
    print(f"best trial {out.best.trial_id} (MLflow run {out.best.run_id})")
    if not args.no_promote and out.best.run_id:
        p = promote(out.best.run_id, metric=names[0], mode=space.objectives[0].mode,
                    force=args.force)
        print(describe(p, names[0]))
    return 0


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _cmd_promote(args: argparse.Namespace) -> int:
    from oodlab.promote import describe, promote

    p = promote(args.run_id, tracking_uri=args.tracking_uri, metric=args.metric, mode=args.mode,
                model_name=args.model_name, alias=args.alias, force=args.force)
    print(describe(p, args.metric, args.alias))
    return 0


def _cmd_data_list(args: argparse.Namespace) -> int:
    from oodlab.data import list_datasets

    rows = list_datasets()
    print(f"{'name':<18}{'role':<10}{'source':<10}{'count':>7}  description")
    for d in rows:
        count = "" if d.count is None else str(d.count)
        print(f"{d.name:<18}{d.role:<10}{d.source:<10}{count:>7}  {d.description}")
    return 0


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field (dotted path, YAML value), e.g. "
                             "train.epochs=3; repeatable")


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
    _add_set(run)
    run.set_defaults(func=_cmd_run)

    oes = sub.add_parser(
        "oe-select", help="rank OE candidate sets with EDGE's singular-value measure",
        description="Extract features of the ID training set and of each OE candidate in "
                    "data.oe, rank the candidates by the distance between their top-k singular "
                    "values (settings: data.oe_select), log the table to MLflow and write the "
                    "choice to <workdir>/oe_select/<name>.json.")
    oes.add_argument("spec", help="experiment spec (YAML) whose data.oe lists the candidates")
    _add_set(oes)
    oes.set_defaults(func=_cmd_oe_select)

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
    _add_set(res)
    res.add_argument("--table-only", action="store_true",
                     help="do not run anything; rebuild the table from MLflow")
    res.set_defaults(func=_cmd_results)

    tun = sub.add_parser(
        "tune", help="Ray Tune + Optuna search over a spec, then promote the best trial",
        description="Search the fields named in a search space (search_spaces/*.yaml) with "
                    "Optuna (TPE or random) and ASHA (or FIFO); every trial is a Ray Train run "
                    "logged as an MLflow child run. The best trial by the validation objective "
                    "is evaluated once on the test sets, registered under the spec's "
                    "tracking.model_name, and becomes @champion only if it beats the current "
                    "one. A killed search continues with --resume.")
    tun.add_argument("spec", help="experiment spec (YAML)")
    tun.add_argument("--space", required=True, help="search space (YAML), search_spaces/*.yaml")
    tun.add_argument("--name", help="search name (default <spec name>-search); also the "
                                    "Optuna study name and the Tune experiment directory")
    tun.add_argument("--resume", action="store_true",
                     help="continue an interrupted search: finished trials are kept")
    tun.add_argument("--storage", help="Optuna storage URL (SQLAlchemy, e.g. "
                                       "postgresql://...; default sqlite:///<workdir>/optuna.db)")
    tun.add_argument("--no-promote", action="store_true", help="do not register the best trial")
    tun.add_argument("--force", action="store_true",
                     help="make the best trial @champion even if it is not better")
    _add_set(tun)
    tun.set_defaults(func=_cmd_tune)

    pro = sub.add_parser(
        "promote", help="register a run's detector; make it @champion if it is better",
        description="Register the detector of an MLflow run (a search trial is first evaluated "
                    "once on the test sets) and move the alias to it only if its validation "
                    "metric beats the current holder's. Test metrics are shown, never compared.")
    pro.add_argument("run_id")
    pro.add_argument("--metric", default="val/auroc", help="validation metric (default val/auroc)")
    pro.add_argument("--mode", choices=["max", "min"], default="max")
    pro.add_argument("--alias", default="champion")
    pro.add_argument("--model-name", help="registered model name (default: the run spec's)")
    pro.add_argument("--tracking-uri", help="MLflow tracking URI (default: the run spec's)")
    pro.add_argument("--force", action="store_true", help="move the alias even if not better")
    pro.set_defaults(func=_cmd_promote)

    data = sub.add_parser("data", help="built-in and external datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    dl = data_sub.add_parser("list", help="list every registered dataset with its role and size")
    dl.set_defaults(func=_cmd_data_list)
    add_serve_parser(sub)
    add_report_parser(sub)
    add_jobs_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from oodlab.config import SpecError
    from oodlab.data.registry import DataError, DatasetNotFoundError
    from oodlab.tracking import ModelReferenceError as InitFromError

    args = build_parser().parse_args(argv)
    args.argv_echo = list(argv if argv is not None else sys.argv[1:])
    try:
        return args.func(args)
    except (SpecError, DataError, DatasetNotFoundError, InitFromError) as err:
        print(f"oodlab: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
