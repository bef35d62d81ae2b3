"""``oodlab tune-posthoc``: search post-hoc score knobs of a trained checkpoint on cached
features (:mod:`oodlab.search.posthoc`)."""

from __future__ import annotations

import argparse

from oodlab.cli.main import add_set


def add_parser(sub) -> None:
    p = sub.add_parser("tune-posthoc", help="search post-hoc score knobs on cached features "
                       "(validation OOD only); register the best detector",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="runs:/<run_id>, models:/<name>@<alias> or a detector file")
    p.add_argument("--scores", nargs="+", default=None, help="scores to search (default all)")
    p.add_argument("--trials", type=int, default=50, help="trials per score")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--no-cache", action="store_true",
                   help="run the network in every trial (the baseline the cache is timed "
                        "against)")
    p.add_argument("--no-register", action="store_true", help="log, do not register")
    add_set(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oodlab.search.posthoc import tune_posthoc

    out = tune_posthoc(args.model, overrides=args.set, scores=args.scores,
                       n_trials=args.trials, seed=args.seed, use_cache=not args.no_cache,
                       register=not args.no_register)
    print(f"run {out['run_id']}: best {out['best_score']} {out['best_params']} "
          f"val/auroc {out['val_auroc']:.4f}; cache {'hit' if out['cache_hit'] else 'built'} "
          f"({out['time_extract_s']:.1f} s), search {out['time_search_s']:.1f} s")
    print(f"{'score':<12} {'val dflt':>8} {'val tuned':>9} {'test dflt':>9} {'test tuned':>10}"
          "  tuned setting")
    for name, r in out["results"].items():
        print(f"{name:<12} {r.default_val:8.4f} {r.best_val:9.4f} "
              f"{r.test_default['mean/auroc']:9.4f} {r.test_best['mean/auroc']:10.4f}  {r.best}")
    return 0
