"""Post-hoc search with the feature cache vs without it, in one run.

Run:  .venv/bin/python bench/posthoc_cache.py [--model REF] [--trials 50] [--network-trials 4]

Two ``oodlab tune-posthoc`` searches of one score's knob (default: the energy temperature) on
one trained checkpoint, one after the other in this process:

* with the cache: ``--trials`` TPE trials on cached features (the cache is built first when
  missing; its build time is reported apart);
* without it (``use_cache=False``): ``--network-trials`` trials, each running the network over
  ID train, ID validation and the validation OOD sets, as a search without a cache must.

Every trial of the second search is the same work, so its time per trial extrapolates
linearly to ``--trials`` trials. The figure: search seconds per trial, and for a
``--trials``-trial search. Goal: a 50-trial search >= 20x faster with the cache.

``--model`` defaults to seed 0 of ``jobs/fmnist_supervised.yaml`` in the ``fmnist-baselines``
results table (``make results-fmnist``); without one, that spec is trained here for one epoch
on 10,000 images first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchlib import header, write_result
from oodlab.cli.main import local_tracking_uri

GOAL = 20.0


def default_model(workdir: str) -> str:
    """Seed 0 of the results table, else a checkpoint trained here (1 epoch, 10,000 images)."""
    from oodlab.report.results import finished_seeds
    from oodlab.spec import load_spec, validate_spec
    from oodlab.spec.overrides import apply_overrides
    from oodlab.train.pipeline import run_experiment

    spec = load_spec("jobs/fmnist_supervised.yaml")
    seeds = finished_seeds(spec, "fmnist-baselines")
    if seeds:
        return f"runs:/{seeds[min(seeds)]}"
    raw = apply_overrides(spec.model_dump(mode="json"), [
        "data.limit=10000", "train.epochs=1", f"workdir={workdir}",
        "tracking.experiment=bench-posthoc", "name=bench_posthoc_ckpt"])
    return f"runs:/{run_experiment(validate_spec(raw)).run_id}"


def plot(per_trial: dict[str, float], trials: int, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3))
    for ax, scale, title in zip(fig.subplots(1, 2), (1, trials),
                                ("search seconds per trial", f"{trials}-trial search, seconds"),
                                strict=True):
        bars = ax.bar(list(per_trial), [v * scale for v in per_trial.values()],
                      color=["#3a7", "#c55"])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="runs:/<id>, models:/<name>@<alias> or a file")
    parser.add_argument("--score", default="energy")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--network-trials", type=int, default=4)
    parser.add_argument("--workdir", default=".oodlab", help="where the feature cache lives")
    parser.add_argument("--out", default="bench/results/posthoc_cache.json")
    parser.add_argument("--figure", default="docs/results/posthoc_cache.png")
    args = parser.parse_args(argv)

    from oodlab.search.posthoc import tune_posthoc

    ref = args.model or default_model(args.workdir)
    common = {"scores": [args.score], "register": False, "tracking_uri": local_tracking_uri(),
              "overrides": [f"workdir={args.workdir}", "tracking.experiment=bench-posthoc"]}
    cached = tune_posthoc(ref, n_trials=args.trials, **common)
    network = tune_posthoc(ref, n_trials=args.network_trials, use_cache=False, **common)
    per_trial = {"cached features": cached["time_search_s"] / args.trials,
                 "network every trial": network["time_search_s"] / args.network_trials}
    ratio = per_trial["network every trial"] / per_trial["cached features"]
    plot(per_trial, args.trials, Path(args.figure))
    result = header("posthoc_cache", "bench/posthoc_cache.py", argv) | {
        "model": ref, "score": args.score, "trials": args.trials,
        "network_trials": args.network_trials, "per_trial_s": per_trial,
        "cache_build_s": None if cached["cache_hit"] else cached["time_extract_s"],
        "search_s": {"cached": cached["time_search_s"], "network": network["time_search_s"]},
        "ratio": ratio, "figure": args.figure,
        "summary": [{"figure": f"post-hoc search, {args.trials} trials of {args.score}: "
                               f"network every trial ÷ cached features, search time "
                               f"({args.network_trials} network trials measured, "
                               "extrapolated linearly)",
                     "value": f"{ratio:.0f}x", "goal": f">= {GOAL:.0f}x",
                     "met": ratio >= GOAL}]}
    print(write_result(args.out, result).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
