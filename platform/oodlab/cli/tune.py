"""``oodlab tune`` (Ray Tune + Optuna search over a spec) and ``oodlab promote`` (register a
run's detector, move the alias only if it is better).

Search: Optuna's TPE sampler (Bergstra et al., "Algorithms for Hyper-Parameter
Optimization", NeurIPS 2011) with ASHA early stopping (Li et al., "A System for Massively
Parallel Hyperparameter Tuning", MLSys 2020); the library side is :mod:`oodlab.search`.
"""

from __future__ import annotations

import argparse

from oodlab.cli.main import add_set


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``oodlab tune`` and ``oodlab promote`` on the top-level subparsers."""
    tun = sub.add_parser(
        "tune", help="Ray Tune + Optuna search over a spec, then promote the best trial",
        description="Search the fields named in a search space (search_spaces/*.yaml) with "
                    "Optuna (TPE or random) and ASHA (or FIFO); every trial is a Ray Train run "
                    "logged as an MLflow child run; a trial that runs all its epochs is "
                    "evaluated once on the test sets like any run. The best trial by the "
                    "validation objective, among those that keep the space's constraints, is "
                    "registered under the spec's tracking.model_name and becomes @champion only "
                    "if it beats the current one (exit 1 when no trial is feasible). The "
                    "Spearman correlation of validation and test metrics over the trials is "
                    "printed. A killed search continues with --resume.")
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
    add_set(tun)
    tun.set_defaults(func=_cmd_tune)

    pro = sub.add_parser(
        "promote", help="register a run's detector; make it @champion if it is better",
        description="Register the detector an MLflow run logged (a trial stopped early has "
                    "none) and move the alias to it only if its validation "
                    "metric beats the current holder's. Test metrics are shown, never compared.")
    pro.add_argument("run_id")
    pro.add_argument("--metric", default="val/auroc", help="validation metric (default val/auroc)")
    pro.add_argument("--mode", choices=["max", "min"], default="max")
    pro.add_argument("--alias", default="champion")
    pro.add_argument("--model-name", help="registered model name (default: the run spec's)")
    pro.add_argument("--tracking-uri", help="MLflow tracking URI (default: the run spec's)")
    pro.add_argument("--force", action="store_true", help="move the alias even if not better")
    pro.set_defaults(func=_cmd_promote)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _cmd_tune(args: argparse.Namespace) -> int:
    from oodlab.spec import load_spec
    from oodlab.spec.search_space import check_space, load_space

    spec = load_spec(args.spec, args.set)
    space = load_space(args.space)
    check_space(space, spec)  # unknown field, empty range, unreported metric: exit 2 here
    from oodlab.search.promote import describe, promote
    from oodlab.search.tune import run_search

    out = run_search(spec, space, args.space, name=args.name, resume=args.resume,
                     storage_url=args.storage)
    names = [o.metric for o in space.objectives]
    print(f"\n== search {out.name}: {len(out.trials)} trials, "
          f"{sum(t.epochs for t in out.trials)} epochs (study {out.study_storage}) ==")
    print(f"{'trial':<14}{'epochs':>7}  " + "".join(f"{m:>14}" for m in names) + "  params")
    for t in sorted(out.trials, key=lambda t: t.trial_id):
        star = "*" if t in out.pareto else ("x" if not t.feasible else " ")
        vals = "".join(f"{v:>14.4f}" for v in t.values)
        print(f"{t.trial_id:<13}{star}{t.epochs:>7}  {vals}  "
              + ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items()))
    print("* = Pareto front" if len(names) > 1 else "* = best",
          "| x = breaks a constraint (" + "; ".join(c.describe() for c in space.constraints)
          + ")" if space.constraints else "")
    failed = [t.trial_id for t in out.trials if t.status == "error"]
    if failed:
        print(f"{len(failed)} trial(s) FAILED (error in training; MLflow run status FAILED, "
              f"the error in its log file): {', '.join(sorted(failed))}")
    for metric, c in out.rank_correlation.items():
        print(f"validation vs test over {c.trials} finished trial(s): Spearman rho({metric}, "
              f"test/{metric.removeprefix('val/')}) = {c.rho:.2f}")
    if out.best is None:
        print("no trial keeps the search space's constraints: nothing is promoted")
        return 1
    print(f"best trial {out.best.trial_id} (MLflow run {out.best.run_id})")
    if not args.no_promote and out.best.run_id:
        p = promote(out.best.run_id, metric=names[0], mode=space.objectives[0].mode,
                    force=args.force)
        print(describe(p, names[0]))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from oodlab.search.promote import describe, promote

    p = promote(args.run_id, tracking_uri=args.tracking_uri, metric=args.metric, mode=args.mode,
                model_name=args.model_name, alias=args.alias, force=args.force)
    print(describe(p, args.metric, args.alias))
    return 0
