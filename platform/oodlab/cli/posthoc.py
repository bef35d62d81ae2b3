"""``oodlab tune-posthoc``: search post-hoc score knobs of a trained checkpoint on cached
features (:mod:`oodlab.search.posthoc`)."""

from __future__ import annotations

import argparse

from oodlab.cli.main import add_set, local_tracking_uri
from oodlab.errors import SpecError


def add_parser(sub) -> None:
    p = sub.add_parser("tune-posthoc", help="search post-hoc score knobs on cached features "
                       "(validation OOD only); register the best detector",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="*", help="runs:/<run_id>, models:/<name>@<alias> or a "
                   "detector file; several (one per seed) are searched one after the other")
    p.add_argument("--results-of", metavar="SPEC", help="instead of MODEL: every seed's newest "
                   "finished run of SPEC in the `oodlab results` table named by --table")
    p.add_argument("--table", help="the `oodlab results --name` of --results-of")
    p.add_argument("--scores", nargs="+", default=None, help="scores to search (default all)")
    p.add_argument("--trials", type=int, default=50, help="trials per score")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--no-cache", action="store_true",
                   help="run the network in every trial (the baseline the cache is timed "
                        "against)")
    p.add_argument("--no-register", action="store_true", help="log, do not register")
    p.add_argument("--tracking-uri", help="MLflow store that runs:/ and models:/ refer to "
                   "(default: MLFLOW_TRACKING_URI, else sqlite:///<OODLAB_WORKDIR or "
                   ".oodlab>/mlflow.db)")
    p.add_argument("--out", help="write the table over all MODELs (mean ± std, paired "
                   "tuned − default, settings, provenance) to this markdown file")
    add_set(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oodlab.search.posthoc import tune_posthoc

    summaries = []
    for ref in args.model + results_refs(args):
        out = tune_posthoc(ref, overrides=args.set, scores=args.scores, n_trials=args.trials,
                           seed=args.seed, use_cache=not args.no_cache,
                           register=not args.no_register,
                           tracking_uri=local_tracking_uri(args.tracking_uri))
        _print(out)
        summaries.append(out)
    if args.out:
        from oodlab.report.posthoc import write_posthoc_table

        path = write_posthoc_table(summaries, args.out, "oodlab " + " ".join(args.argv_echo))
        print(f"table: {path}")
    return 0


def results_refs(args: argparse.Namespace) -> list[str]:
    """``runs:/`` refs of --results-of SPEC in --table, by seed; [] without --results-of."""
    if not args.model and not args.results_of:
        raise SpecError("tune-posthoc: give MODEL(s) or --results-of SPEC --table NAME")
    if not args.results_of:
        return []
    if not args.table:
        raise SpecError("tune-posthoc: --results-of needs --table (an `oodlab results --name`)")
    from oodlab.report.results import finished_seeds
    from oodlab.spec import load_spec

    spec = load_spec(args.results_of)
    seeds = finished_seeds(spec, args.table)
    if not seeds:
        raise SpecError(f"--results-of {args.results_of}: no finished run of {spec.name!r} in "
                        f"table {args.table!r} (run `oodlab results` first)")
    return [f"runs:/{seeds[s]}" for s in sorted(seeds)]


def _print(out: dict) -> None:
    print(f"run {out['run_id']} ({out['source']}): best {out['best_score']} "
          f"{out['best_params']} val/auroc {out['val_auroc']:.4f}; cache "
          f"{'hit' if out['cache_hit'] else 'built'} ({out['time_extract_s']:.1f} s), search "
          f"{out['time_search_s']:.1f} s")
    print(f"{'score':<12} {'val dflt':>8} {'val tuned':>9} {'test dflt':>9} {'test tuned':>10}"
          "  tuned setting")
    for name, r in out["results"].items():
        print(f"{name:<12} {r.default_val:8.4f} {r.best_val:9.4f} "
              f"{r.test_default['mean/auroc']:9.4f} {r.test_best['mean/auroc']:10.4f}  {r.best}")
