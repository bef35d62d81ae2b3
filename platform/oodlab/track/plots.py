"""Figures people would rather look at than read: ROC curves, score histograms, epoch curves."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from oodlab.detect.evaluate import ScoreResult

if TYPE_CHECKING:
    from types import ModuleType


@cache
def _pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only Agg backend, imported (and the backend chosen)
    once, by the first figure: about 0.5 s a process, which the many that draw none (Ray
    workers, replicas) skip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_figure(res: ScoreResult, title: str = ""):
    """ROC of ID test (positive) vs each OOD set, with AUROC and FPR@95 in the legend."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    id_s = res.id_test.numpy()
    for name, ood in res.ood.items():
        y = np.r_[np.ones(len(id_s)), np.zeros(len(ood))]
        fpr, tpr, _ = roc_curve(y, np.r_[id_s, ood.numpy()])
        m = res.per_set[name]
        ax.plot(fpr, tpr, label=f"{name} (AUROC {m['auroc']:.3f}, FPR95 {m['fpr95']:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.axhline(0.95, ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate (OOD accepted)", ylabel="true positive rate (ID kept)",
           title=title or f"ROC, score = {res.name}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def histogram_figure(res: ScoreResult, title: str = ""):
    """Score histograms: ID test vs each OOD set, with the served threshold."""
    sets = {"ID test": res.id_test.numpy()} | {k: v.numpy() for k, v in res.ood.items()}
    lo = min(float(np.quantile(v, 0.005)) for v in sets.values())
    hi = max(float(np.quantile(v, 0.995)) for v in sets.values())
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in sets.items():
        ax.hist(np.clip(values, lo, hi), bins=bins, histtype="step", density=True, label=name,
                lw=2 if name == "ID test" else 1)
    ax.axvline(res.threshold, c="k", ls="--", lw=1, label="threshold (95% ID TPR)")
    ax.set(xlabel=f"{res.name} score (higher = more ID)", ylabel="density",
           title=title or f"Score histograms, {res.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def headtail_figure(res: ScoreResult, groups: dict, title: str = ""):
    """Score histograms of head ID, tail-only ID and OOD (all test OOD sets pooled)."""
    import torch

    sets = {"head ID": res.id_test[groups["head"]].numpy(),
            "tail-only ID": res.id_test[groups["tail_only"]].numpy(),
            "OOD (all sets)": torch.cat(list(res.ood.values())).numpy()}
    sets = {k: v for k, v in sets.items() if len(v)}
    values = np.concatenate(list(sets.values()))
    bins = np.linspace(float(values.min()), float(values.max()) + 1e-6, 60)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in sets.items():
        ax.hist(v, bins=bins, histtype="step", density=True, lw=1.5, label=f"{name} ({len(v)})")
    ax.axvline(res.threshold, c="k", ls="--", lw=1, label="threshold (95% ID TPR)")
    ax.set(xlabel=f"{res.name} score (higher = more ID)", ylabel="density",
           title=title or f"Head vs tail-only ID vs OOD, {res.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def epoch_figure(history: dict[str, list[tuple[int, float]]], title: str = "Per-epoch view"):
    """Validation-OOD AUROC and ID accuracy against epoch (the Unleashing-Mask observation)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, points in history.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(np.array(steps) + 1, values, marker="o", label=key)
    ax.set(xlabel="epoch", ylabel="value", title=title)
    if ax.lines:  # a run without per-epoch history (an evaluation-only run) draws none
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def parallel_coordinates_figure(params: list[dict], values: list[float], metric: str):
    """One line per trial across the searched parameters (each scaled to [0, 1]), coloured
    by the objective; categorical values are placed at their rank."""
    keys = sorted(params[0]) if params else []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * max(len(keys), 2) + 1.5, 4))
    cols = []
    for k in keys:
        raw = [p[k] for p in params]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
            col = np.asarray(raw, dtype=float)
        else:
            order = {v: i for i, v in enumerate(sorted({str(v) for v in raw}))}
            col = np.asarray([order[str(v)] for v in raw], dtype=float)
        span = col.max() - col.min()
        cols.append((col - col.min()) / span if span > 0 else np.full_like(col, 0.5))
    finite = [v for v in values if np.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    cmap = plt.get_cmap("viridis")
    for i, v in enumerate(values):
        colour = cmap((v - lo) / (hi - lo) if np.isfinite(v) and hi > lo else 0.0)
        ax.plot(range(len(keys)), [c[i] for c in cols], color=colour, alpha=0.8, marker="o")
    ax.set_xticks(range(len(keys)), keys, rotation=20, fontsize=8)
    ax.set(ylabel="scaled value", title=f"trials coloured by {metric} ({lo:.3f} to {hi:.3f})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def comparison_figure(labels: list[str], panels: dict[str, tuple[list, list, str]],
                      title: str):
    """Side-by-side horizontal bars, one panel per metric: ``panels[name] = (means, stds,
    better)`` with one entry per label (NaN = missing, drawn as no bar); the best bar of each
    panel is dark, whiskers are the std over seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), sharey=True,
                             figsize=(3.2 * len(panels) + 3, 0.28 * len(labels) + 1.4))
    axes = np.atleast_1d(axes)
    y = np.arange(len(labels))
    for ax, (name, (means, stds, better)) in zip(axes, panels.items(), strict=True):
        m, sd = np.asarray(means, dtype=float), np.asarray(stds, dtype=float)
        ok = np.isfinite(m)
        best = (np.nanmax(m) if better == "max" else np.nanmin(m)) if ok.any() else np.nan
        colours = ["#1b5e20" if ok[i] and np.isclose(m[i], best, atol=5e-4) else "#90a4ae"
                   for i in range(len(m))]
        ax.barh(y[ok], m[ok], xerr=np.nan_to_num(sd[ok]), color=[colours[i] for i in y[ok]],
                error_kw={"lw": 0.8, "capsize": 2})
        for i in y[ok]:
            ax.text(0.01, i, f"{m[i]:.3f}", va="center", fontsize=6,
                    bbox={"fc": "white", "alpha": 0.7, "lw": 0, "pad": 1})
        ax.set(xlim=(0, 1), title=f"{name} ({'higher' if better == 'max' else 'lower'} "
                                  "is better)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def class_flagged_figure(rates: dict[str, list[list[float]]], title: str = ""):
    """Per class index, the mean (± std over seeds) rate of ID images flagged OOD; one line
    per spec."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, per_class in rates.items():
        x = [c for c, v in enumerate(per_class) if v]
        mean = [float(np.mean(per_class[c])) for c in x]
        std = [float(np.std(per_class[c], ddof=1)) if len(per_class[c]) > 1 else 0.0 for c in x]
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=name)
    ax.set_xlabel("class index (long-tailed mosaics: training-frequency rank, 0 = head)")
    ax.set_ylabel("ID images flagged OOD")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def epoch_curves_figure(data: dict[str, dict[str, list[list[float]]]], title: str = ""):
    """One panel per metric, one line per spec (one colour per spec in every panel): the mean
    over seeds per epoch, a band of ± one sample std."""
    names = list(dict.fromkeys(n for per_spec in data.values() for n in per_spec))
    colour = {n: f"C{i}" for i, n in enumerate(names)}
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data), 3.6), squeeze=False)
    for ax, (key, per_spec) in zip(axes[0], data.items(), strict=True):
        for name, per_epoch in per_spec.items():
            x = [e + 1 for e, v in enumerate(per_epoch) if v]
            mean = np.array([np.mean(per_epoch[e - 1]) for e in x])
            std = np.array([np.std(per_epoch[e - 1], ddof=1) if len(per_epoch[e - 1]) > 1
                            else 0.0 for e in x])
            ax.plot(x, mean, marker=".", color=colour[name])
            ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=colour[name])
        ax.set(xlabel="epoch", title=key)
        ax.title.set_fontsize(9)
    handles = [plt.Line2D([], [], color=colour[n], marker=".") for n in names]
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def close(fig) -> None:
    _pyplot().close(fig)
