"""Mahalanobis (Lee et al. 2018) on trained checkpoints against covariance shrinkage.

Run:  .venv/bin/python bench/mahalanobis_shrinkage.py --table fmnist-baselines-full \\
          jobs/fmnist_supervised.yaml jobs/fmnist_oe.yaml [more specs] \\
          [--grid 0 0.001 0.01 0.03 0.1 0.3 1] [--out bench/results/mahalanobis_shrinkage.json] \\
          [--figure docs/results/mahalanobis_shrinkage.png] \\
          [--md docs/results/mahalanobis_shrinkage.md]

For every finished seed of every spec in the ``oodlab results`` table ``--table``: the
checkpoint's outputs come from the feature cache of ``oodlab tune-posthoc`` (built with the
same Ray tasks when missing). At each shrinkage a of ``--grid`` the score is fitted on ID train
(tied covariance (1 - a) Sigma + a tr(Sigma)/D I; a = 0 is the paper's estimator) and scored
on ID test, every test OOD set and every validation OOD set. Beside the AUROCs it records what
explains them: the mean penultimate-feature norm of ID test and of each OOD group, the share
of the tied covariance inside the span of the class means, its condition number, and how far
the origin (the zero feature) is from the nearest class mean compared with ID test features.
Paired differences are taken per seed against the first spec. Writes the JSON, the tables as
markdown and one figure (test near, test far and validation AUROC against a, mean ± std over
seeds, one line per spec).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from benchlib import header, write_result


def checkpoint_rows(spec_path: str, table: str, grid: list[float]) -> list[dict]:
    """One dict per finished seed of the spec: AUROC per shrinkage, feature norms, condition."""
    from oodlab.data.bundle import load_bundle, test_ood_groups
    from oodlab.detect.metrics import auroc
    from oodlab.detect.scores import build_score
    from oodlab.detect.stats import Moments
    from oodlab.report.results import finished_seeds
    from oodlab.search.posthoc import extract
    from oodlab.spec import load_spec, validate_spec
    from oodlab.track import tracking

    spec = load_spec(spec_path)
    seeds = finished_seeds(spec, table)
    if not seeds:
        sys.exit(f"{spec_path}: no finished run of {spec.name!r} in table {table!r}")
    rows = []
    for seed, run_id in sorted(seeds.items()):
        detector = tracking.load_detector(f"runs:/{run_id}")
        state = detector.state()
        run_spec = validate_spec(state["spec"])
        bundle = load_bundle(run_spec, include_test=True)
        cache, hit = extract(state, run_spec, bundle,
                             Path(run_spec.storage or run_spec.workdir_path) / "feature_cache")
        out = {name: cache.outputs(name) for name in cache.sets if name != "id_train"}
        groups = {g: [f"ood:{n}" for n in names]
                  for g, names in test_ood_groups(run_spec.data).items() if g in ("near", "far")}
        val = [k for k in out if k.startswith("val_ood:")]
        moments = Moments()
        for features, _, labels in cache.chunks("id_train"):
            moments.update(features, labels)
        cov = moments.tied_covariance()
        eig = torch.linalg.eigvalsh(cov)
        span = torch.linalg.qr(moments.class_means()[1].T).Q  # basis of the class means
        row = {"spec": spec.name, "seed": seed, "run": run_id, "cache_hit": hit,
               "condition_number": float(eig.max() / eig.min()),
               "variance_in_class_mean_span": float(torch.trace(span.T @ cov @ span)
                                                    / torch.trace(cov)),
               "class_mean_span_dims": [span.shape[1], cov.shape[0]],
               "origin_vs_id_test": {},
               "feature_norm": {"id_test": float(out["id_test"].features.norm(dim=1).mean())}
               | {g: float(torch.cat([out[k].features for k in keys]).norm(dim=1).mean())
                  for g, keys in groups.items()},
               "auroc": {}}
        for a in grid:
            score = build_score("mahalanobis", shrinkage=a)
            score.fit_moments(moments)  # the ID-train pass above, shared by the whole grid
            sc = {k: score.score(o.logits, o.features) for k, o in out.items()}
            origin = -score.score(None, torch.zeros(1, cov.shape[0]))
            row["origin_vs_id_test"][str(a)] = float(origin / (-sc["id_test"]).median())
            per = {k: auroc(sc["id_test"], sc[k]) for keys in groups.values() for k in keys}
            row["auroc"][str(a)] = {g: float(np.mean([per[k] for k in keys]))
                                    for g, keys in groups.items()} | {
                "val": float(np.mean([auroc(sc["id_val"], sc[k]) for k in val]))}
        print(f"{spec.name} seed {seed}: " + ", ".join(
            f"a={a}: near {row['auroc'][str(a)]['near']:.3f} far {row['auroc'][str(a)]['far']:.3f}"
            for a in grid), flush=True)
        rows.append(row)
    return rows


def summarise(rows: list[dict], grid: list[float]) -> dict:
    """Mean ± std over seeds per spec and shrinkage; per-seed differences to the first spec."""
    specs = list(dict.fromkeys(r["spec"] for r in rows))
    by = {s: {r["seed"]: r for r in rows if r["spec"] == s} for s in specs}
    out: dict = {}
    for s in specs:
        out[s] = {}
        paired = sorted(set(by[s]) & set(by[specs[0]])) if s != specs[0] else []
        for a in grid:
            entry = {}
            for g in ("near", "far", "val"):
                v = [r["auroc"][str(a)][g] for r in by[s].values()]
                entry[g] = [float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0]
                if paired:
                    d = [by[s][k]["auroc"][str(a)][g] - by[specs[0]][k]["auroc"][str(a)][g]
                         for k in paired]
                    entry[f"{g}_minus_{specs[0]}"] = [
                        float(np.mean(d)), float(np.std(d, ddof=1)) if len(d) > 1 else 0.0,
                        len(d)]
            out[s][str(a)] = entry
    return out


def selection(summary: dict, grid: list[float]) -> dict[str, dict[str, float]]:
    """Per spec: would validation pick the shrinkage test favours? Spearman over the grid of
    the mean validation AUROC and the mean test AUROC ((near + far) / 2), and the a each picks."""
    from scipy import stats

    out = {}
    for spec, per_a in summary.items():
        val = [per_a[str(a)]["val"][0] for a in grid]
        test = [(per_a[str(a)]["near"][0] + per_a[str(a)]["far"][0]) / 2 for a in grid]
        out[spec] = {"spearman": float(stats.spearmanr(val, test).statistic),
                     "a_by_val": grid[int(np.argmax(val))],
                     "a_by_test": grid[int(np.argmax(test))]}
    return out


def figure(summary: dict, grid: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [max(a, grid[1] / 3 if len(grid) > 1 else 1e-4) for a in grid]  # a = 0 on a log axis
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, g, title in zip(axes, ("near", "far", "val"),
                            ("test near-OOD", "test far-OOD", "validation OOD"), strict=True):
        for spec, per_a in summary.items():
            m = np.array([per_a[str(a)][g][0] for a in grid])
            sd = np.array([per_a[str(a)][g][1] for a in grid])
            ax.plot(x, m, marker="o", label=spec)
            ax.fill_between(x, m - sd, m + sd, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xticks(x, ["0"] + [f"{a:g}" for a in grid[1:]])
        ax.set_title(f"Mahalanobis AUROC, {title}")
        ax.set_xlabel("covariance shrinkage a")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AUROC (mean ± std over seeds)")
    axes[0].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def markdown(result: dict) -> str:
    """The tables of the JSON: AUROC per spec and shrinkage (paired differences to the first
    spec beside them), then feature norms and covariance condition numbers per checkpoint."""
    grid, summary = result["grid"], result["summary"]
    ref = next(iter(summary))

    def ms(v: list[float]) -> str:
        return f"{v[0]:.3f} ± {v[1]:.3f}"

    lines = [f"# Mahalanobis against covariance shrinkage ({result['table']})", "",
             f"Generated by `{result['command']}` on {result['date']}, {result['host']}. "
             f"Mean ± sample std over seeds; differences are per seed against `{ref}` "
             "(mean ± std, n). a = 0 is Lee et al. 2018's exact tied covariance (the "
             f"default score); figure: [{Path(result['figure']).name}]"
             f"({Path(result['figure']).name}).", "",
             f"| spec | a | test near AUROC | test far AUROC | val AUROC | near − {ref} | "
             f"far − {ref} |", "|---|---|---|---|---|---|---|"]
    for spec, per_a in summary.items():
        for a in grid:
            e = per_a[str(a)]
            diff = [f"{e[k][0]:+.3f} ± {e[k][1]:.3f} (n={e[k][2]})" if k in e else ""
                    for k in (f"near_minus_{ref}", f"far_minus_{ref}")]
            lines.append(f"| {spec} | {a:g} | {ms(e['near'])} | {ms(e['far'])} | "
                         f"{ms(e['val'])} | {diff[0]} | {diff[1]} |")
    lines += ["", "Would validation pick the shrinkage? Spearman over the grid of mean "
              "validation AUROC and mean test AUROC ((near + far) / 2), and the a each favours:",
              "", "| spec | Spearman | a by validation | a by test |", "|---|---|---|---|"]
    lines += [f"| {spec} | {v['spearman']:+.2f} | {v['a_by_val']:g} | {v['a_by_test']:g} |"
              for spec, v in result["selection"].items()]
    lo, hi = str(grid[0]), str(grid[-1])
    lines += ["", "Per checkpoint: mean penultimate-feature norm; the share of the tied "
              "covariance's trace inside the span of the class means (C of D dimensions); its "
              "condition number; and the distance of the origin (the zero feature) to the "
              "nearest class mean divided by the median distance of ID test features, exact "
              f"(a = {lo}) and at a = {hi}:", "",
              "| spec | seed | run | ID test norm | near-OOD norm | far-OOD norm | variance in "
              f"class-mean span | condition | origin ÷ ID test, a = {lo} | a = {hi} |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        n, o = r["feature_norm"], r["origin_vs_id_test"]
        c, d = r["class_mean_span_dims"]
        lines.append(f"| {r['spec']} | {r['seed']} | `{r['run'][:12]}` | {n['id_test']:.2f} | "
                     f"{n.get('near', float('nan')):.2f} | {n.get('far', float('nan')):.2f} | "
                     f"{r['variance_in_class_mean_span']:.2f} ({c} of {d}) | "
                     f"{r['condition_number']:.0f} | {o[lo]:.1f} | {o[hi]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("specs", nargs="+", help="spec files; the first is the paired reference")
    p.add_argument("--table", required=True, help="the `oodlab results --name` of the runs")
    p.add_argument("--grid", type=float, nargs="+", default=[0, 0.001, 0.01, 0.03, 0.1, 0.3, 1])
    p.add_argument("--out", default="bench/results/mahalanobis_shrinkage.json")
    p.add_argument("--figure", default="docs/results/mahalanobis_shrinkage.png")
    p.add_argument("--md", default="docs/results/mahalanobis_shrinkage.md")
    args = p.parse_args(argv)
    grid = sorted(set(args.grid))
    if grid[0] != 0 or not all(0 <= a <= 1 for a in grid):
        sys.exit("--grid: values in [0, 1] and 0 (the exact estimator) among them")
    from oodlab.cluster.ray_local import init_ray

    init_ray(num_cpus=None)
    rows = [r for s in args.specs for r in checkpoint_rows(s, args.table, grid)]
    summary = summarise(rows, grid)
    figure(summary, grid, args.figure)
    result = header("mahalanobis_shrinkage", "bench/mahalanobis_shrinkage.py", argv) | {
        "table": args.table, "grid": grid, "rows": rows, "summary": summary,
        "selection": selection(summary, grid),
        "figure": args.figure}
    from oodlab.report.results import write_keeping_notes

    write_keeping_notes(Path(args.md), markdown(result), marker=True)  # notes below survive
    print(f"wrote {write_result(args.out, result)}, {args.figure} and {args.md}")


if __name__ == "__main__":
    main()
