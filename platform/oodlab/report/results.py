"""``oodlab results``: run specs over several seeds and write a mean ± std table.

Runs are tagged ``oodlab.results=<table name>`` in MLflow; the table is rebuilt from MLflow
(never copied by hand), with the seed count, so it can be regenerated at any time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from oodlab.cluster.ray_local import hardware
from oodlab.detect.provenance import PREFIX
from oodlab.spec import ExperimentSpec, load_spec

RESULTS_TAG = "oodlab.results"

# column label -> metric key template ({score} = the served score)
# headline means are over near- and far-OOD sets; sanity sets (noise) have their own column
DEFAULT_COLUMNS = {
    "AUROC ↑": "test/{score}/mean/auroc",
    "FPR@95 ↓": "test/{score}/mean/fpr95",
    "AUPR-in ↑": "test/{score}/mean/aupr_in",
    "near AUROC ↑": "test/{score}/near/auroc",
    "far AUROC ↑": "test/{score}/far/auroc",
    "sanity AUROC ↑": "test/{score}/sanity/auroc",
    "val AUROC ↑": "val_final/{score}/mean/auroc",
    "val FPR@95 ↓": "val_final/{score}/mean/fpr95",
}
ID_COLUMNS = {"ID acc ↑": "test/id_acc", "ID mAP ↑": "test/id_map"}
TAIL_COLUMNS = {
    "tail-only AUROC ↑": "headtail/{score}/tail_only/mean/auroc",
    "tail-only FPR@95 ↓": "headtail/{score}/tail_only/mean/fpr95",
    "tail-only flagged OOD ↓": "headtail/{score}/tail_only/flagged_ood",
    "head AUROC ↑": "headtail/{score}/head/mean/auroc",
    "tail − head flagged ↓": "headtail/{score}/tail_minus_head/flagged_ood",
}


def run_seeds(spec_paths: Sequence[str], seeds: Sequence[int], table: str,
              overrides: Sequence[str] = (), resume: bool = False) -> list[str]:
    """Run every spec with every seed (one Ray session); returns the MLflow run ids.

    ``resume``: skip a (spec, seed) that already has a finished run in this table, so an
    interrupted table continues where it stopped (the table name must then stand for one
    setup: runs are matched by table, spec name and seed, not by overrides).
    """
    from oodlab.console import progress
    from oodlab.train.pipeline import run_experiment

    run_ids = []
    for path in spec_paths:
        for seed in seeds:
            spec = load_spec(path, [*overrides, f"seed={seed}"])
            if resume and (done := finished_seeds(spec, table).get(seed)):
                progress(f"{spec.name} seed {seed}: finished run {done} kept", source="results")
                run_ids.append(done)
                continue
            progress(f"{spec.name} seed {seed}", source="results")
            res = run_experiment(spec, spec_path=path, tags={RESULTS_TAG: table})
            run_ids.append(res.run_id)
    return run_ids


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std, ddof=1) with the seed count; '–' when missing."""
    if not values:
        return "–"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {std:.3f} (n={len(values)})"


def collect(spec: ExperimentSpec, table: str) -> dict[str, list[dict[str, float]]]:
    """Finished runs of one results table, grouped by spec name, from MLflow."""
    from oodlab.track import tracking

    client = tracking.client_for(spec)
    exp = client.get_experiment_by_name(spec.tracking.experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`{RESULTS_TAG}` = '{table}' and "
                                            "attributes.status = 'FINISHED'",
                              max_results=5000)
    grouped: dict[str, list[dict[str, float]]] = defaultdict(list)
    for r in runs:
        grouped[r.data.tags.get("mlflow.runName", "?")].append(
            dict(r.data.metrics) | {"_score": r.data.params.get("eval.scores", ""),
                                    "_seed": r.data.tags.get("oodlab.seed", "?"),
                                    "_run_id": r.info.run_id,
                                    "_start": r.info.start_time or 0,
                                    "_provenance": provenance_of(r.data.tags)})
    return grouped


def provenance_of(tags: dict[str, str]) -> dict[str, str]:
    """A run's ``oodlab.provenance.*`` tags, without the prefix."""
    return {k.removeprefix(PREFIX): v for k, v in tags.items() if k.startswith(PREFIX)}


PROVENANCE_COLUMNS = ("checkpoint", "split.id_train", "split.id_val", "split.id_test",
                      "split.test_ood", "spec", "code")


def provenance_table(specs: Sequence[ExperimentSpec], table: str) -> str:
    """One line per run of the table: its seed, run id, optimizer steps, the epoch it serves
    (1-based, of ``train.epochs``) and provenance hashes (weights of the served checkpoint,
    content of each split, spec) and code version; '–' where a run predates a tag."""
    lines = ["| spec | seed | run | steps | epoch served | " + " | ".join(PROVENANCE_COLUMNS)
             + " |", "|---" * (len(PROVENANCE_COLUMNS) + 5) + "|"]
    grouped: dict[str, list[dict]] = {}
    for spec in specs:
        grouped.update(collect(spec, table))
    for spec in specs:
        for m in sorted(grouped.get(spec.name, []), key=lambda m: (str(m["_seed"]), m["_start"])):
            prov = m["_provenance"]
            steps = f"{int(m['train/optimizer_steps']):,}" if "train/optimizer_steps" in m else "–"
            served = (f"{int(m['train/selected_epoch']) + 1} of {spec.train.epochs}"
                      if "train/selected_epoch" in m else "–")
            lines.append(f"| {spec.name} | {m['_seed']} | `{m['_run_id']}` | {steps} | {served} | "
                         + " | ".join(prov.get(c, "–") for c in PROVENANCE_COLUMNS) + " |")
    return "\n".join(lines)


def finished_seeds(spec: ExperimentSpec, table: str) -> dict[int, str]:
    """seed -> run id of the newest finished run of ``spec`` in ``table``."""
    runs = sorted(collect(spec, table).get(spec.name, []), key=lambda m: m["_start"])
    return {int(m["_seed"]): m["_run_id"] for m in runs if str(m["_seed"]).isdigit()}


def markdown_table(specs: Sequence[ExperimentSpec], table: str,
                   scores: Sequence[str] = ()) -> str:
    """One row per spec and score (default: the served score); mean ± std over its seeds for
    every column present in any run."""
    rows, columns = [], dict(DEFAULT_COLUMNS)
    grouped: dict[str, list[dict[str, float]]] = {}
    for spec in specs:
        grouped.update(collect(spec, table))
    multilabel = any("test/id_map" in m for runs in grouped.values() for m in runs)
    columns |= {k: v for k, v in ID_COLUMNS.items() if (v == "test/id_map") == multilabel}
    if multilabel:
        columns |= TAIL_COLUMNS
    present = {k for runs in grouped.values() for m in runs for k in m}
    columns = {label: key for label, key in columns.items()  # drop columns no run has
               if any(key.format(score=s) in present
                      for spec in specs for s in (scores or spec.eval.scores[:1]))}
    header = "| spec | method | score | " + " | ".join(columns) + " |"
    rows = [header, "|" + "---|" * (len(columns) + 3)]
    for spec in specs:
        runs = grouped.get(spec.name, [])
        for score in scores or spec.eval.scores[:1]:
            cells = []
            for key in columns.values():
                k = key.format(score=score)
                cells.append(mean_std([m[k] for m in runs if k in m]))
            rows.append(f"| {spec.name} | {spec.method.name} | {score} | "
                        + " | ".join(cells) + " |")
    return "\n".join(rows)


NOTES_MARKER = "<!-- notes: kept when this file is regenerated -->"
PER_SET_METRICS = {"auroc": "AUROC ↑", "fpr95": "FPR@95 ↓", "aupr_in": "AUPR-in ↑"}


def per_set_table(specs: Sequence[ExperimentSpec], table: str, metric: str,
                  scores: Sequence[str] = ()) -> str:
    """One row per spec and score, one column per test OOD set of ``metric`` (``auroc``,
    ``fpr95`` or ``aupr_in``), grouped: near sets then their mean, far sets then theirs, the
    headline mean (near + far), then sanity sets and their mean; mean ± std over seeds."""
    columns = per_set_columns(specs)
    lines = ["| spec | score | " + " | ".join(label for label, _ in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for spec in specs:
        runs = collect(spec, table).get(spec.name, [])
        for score in scores or spec.eval.scores[:1]:
            cells = [mean_std([m[k] for m in runs if (k := f"test/{score}/{key}/{metric}") in m])
                     for _, key in columns]
            lines.append(f"| {spec.name} | {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_set_columns(specs: Sequence[ExperimentSpec]) -> list[tuple[str, str]]:
    """(label, metric-key part) of the per-set table: each group's sets then the group mean;
    the headline mean leaves the sanity sets out."""
    groups: dict[str, list[str]] = {}
    for spec in specs:
        for group, names in spec.data.test_sets().items():
            groups.setdefault(group, [])
            groups[group] += [n for n in names if n not in groups[group]]
    columns: list[tuple[str, str]] = []
    for group in ("near", "far", "ungrouped"):
        columns += [(s, s) for s in groups.get(group, [])]
        if group in ("near", "far") and group in groups:
            columns.append((f"**{group} mean**", group))
    columns.append(("**mean**", "mean"))
    if "sanity" in groups:
        columns += [(s, s) for s in groups["sanity"]] + [("sanity mean", "sanity")]
    return columns


# metric (key template) of the paired table -> (column label, True when higher is better)
PAIRED_COLUMNS = {
    "test/{score}/mean/auroc": ("Δ AUROC", True),
    "test/{score}/mean/fpr95": ("Δ FPR@95", False),
    "test/{score}/near/auroc": ("Δ near AUROC", True),
    "test/{score}/far/auroc": ("Δ far AUROC", True),
    "test/id_acc": ("Δ ID acc", True),
    "test/id_map": ("Δ ID mAP", True),
    "headtail/{score}/tail_only/mean/auroc": ("Δ tail-only AUROC", True),
    "headtail/{score}/tail_minus_head/flagged_ood": ("Δ tail − head flagged", False),
}


def paired_difference(diffs: Sequence[float], higher_is_better: bool) -> str:
    """Mean ± sample std of per-seed differences, the seeds whose difference goes the good
    way, and the verdict: "shown" when the two-sided 95 % t-interval of the mean difference
    excludes 0, otherwise "not shown" (the difference is inside seed noise)."""
    from scipy import stats

    n = len(diffs)
    if n == 0:
        return "–"
    mean = float(np.mean(diffs))
    good = sum(1 for d in diffs if (d > 0) == higher_is_better and d != 0)
    if n < 2:
        return f"{mean:+.3f} ({good}/1 better; n=1, not shown)"
    std = float(np.std(diffs, ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / np.sqrt(n)
    verdict = "shown" if abs(mean) > half else "not shown"
    return f"{mean:+.3f} ± {std:.3f} ({good}/{n} better, {verdict})"


def paired_table(specs: Sequence[ExperimentSpec], table: str, baseline: str,
                 scores: Sequence[str] = ()) -> str:
    """Per-seed paired differences (spec − baseline) for every non-baseline spec and score,
    seeds matched by the ``oodlab.seed`` tag (the newest finished run of each seed). The
    baseline is scored with the same score when it has it, else with its served score."""
    by_name = {s.name: s for s in specs}
    if baseline not in by_name:
        raise ValueError(f"baseline {baseline!r} is not one of the specs {sorted(by_name)}")
    grouped: dict[str, list[dict[str, float]]] = {}
    for spec in specs:
        grouped.update(collect(spec, table))

    def per_seed(name: str) -> dict[str, dict[str, float]]:
        runs = sorted(grouped.get(name, []), key=lambda m: m["_start"])
        return {str(m["_seed"]): m for m in runs}  # newest run of a seed wins

    base_runs, base_spec = per_seed(baseline), by_name[baseline]
    present = {k for runs in grouped.values() for m in runs for k in m}
    columns = {key: col for key, col in PAIRED_COLUMNS.items()
               if any(key.format(score=s) in present for spec in specs
                      for s in (scores or spec.eval.scores[:1]))}
    lines = [f"| spec − {baseline} | score | " + " | ".join(c[0] for c in columns.values())
             + " |", "|" + "---|" * (len(columns) + 2)]
    for spec in specs:
        if spec.name == baseline:
            continue
        runs = per_seed(spec.name)
        for score in scores or spec.eval.scores[:1]:
            base_score = score if score in base_spec.eval.scores else base_spec.eval.scores[0]
            cells = []
            for key, (_, higher) in columns.items():
                k, kb = key.format(score=score), key.format(score=base_score)
                diffs = [runs[s][k] - base_runs[s][kb] for s in sorted(runs)
                         if s in base_runs and k in runs[s] and kb in base_runs[s]]
                cells.append(paired_difference(diffs, higher))
            label = score if base_score == score else f"{score} vs {base_score}"
            lines.append(f"| {spec.name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


FLAGGED_KEY = "headtail/{score}/class/{c}/flagged_ood"


def class_flagged(specs: Sequence[ExperimentSpec], table: str, score: str
                  ) -> dict[str, list[list[float]]]:
    """spec name -> per class index, the per-seed rates of ID test images of that class
    flagged OOD at the served threshold (multi-label runs log them; others give nothing)."""
    out: dict[str, list[list[float]]] = {}
    for spec in specs:
        runs = collect(spec, table).get(spec.name, [])
        classes = [int(k.split("/")[3]) for m in runs for k in m
                   if k.startswith(f"headtail/{score}/class/")]
        if classes:
            out[spec.name] = [[m[k] for m in runs if (k := FLAGGED_KEY.format(score=score, c=c))
                               in m] for c in range(max(classes) + 1)]
    return out


def flagged_section(specs: Sequence[ExperimentSpec], table: str, score: str,
                    figure: Path) -> str:
    """Markdown table and figure of the per-class flagged-OOD rate (mean ± std over seeds),
    classes in index order (for the long-tailed mosaics, the training-frequency rank); empty
    when no run logged per-class rates."""
    rates = class_flagged(specs, table, score)
    if not rates:
        return ""
    from oodlab.track import plots

    n = max(len(r) for r in rates.values())
    lines = ["| spec | " + " | ".join(f"class {c}" for c in range(n)) + " |",
             "|" + "---|" * (n + 1)]
    lines += [f"| {name} | " + " | ".join(mean_std(v) for v in per) + " |"
              for name, per in rates.items()]
    fig = plots.class_flagged_figure(rates, title=f"{table}: ID test images flagged OOD "
                                     f"at the served threshold ({score})")
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110, bbox_inches="tight")
    plots.close(fig)
    return (f"\n### ID images flagged OOD per class ({score})\n\nRate of each class's ID test "
            "images whose score falls below the served threshold (95 % of validation ID "
            "accepted), mean ± std over seeds; class index = training-frequency rank for the "
            f"long-tailed mosaics (0 = most frequent). Figure: [{figure.name}]({figure.name}).\n\n"
            + "\n".join(lines) + "\n")


def epoch_curves(specs: Sequence[ExperimentSpec], table: str, key: str
                 ) -> dict[str, list[list[float]]]:
    """Spec name -> per epoch, the values of the per-epoch metric ``key`` over seeds (from
    each finished run's MLflow metric history, by step); specs that never logged it are
    left out."""
    from oodlab.track import tracking

    out: dict[str, list[list[float]]] = {}
    for spec in specs:
        client = tracking.client_for(spec)
        per_epoch: list[list[float]] = []
        for run in collect(spec, table).get(spec.name, []):
            history = sorted(client.get_metric_history(run["_run_id"], key),
                             key=lambda m: m.step)
            for epoch, m in enumerate(history):
                if epoch == len(per_epoch):
                    per_epoch.append([])
                per_epoch[epoch].append(m.value)
        if per_epoch:
            out[spec.name] = per_epoch
    return out


def curves_section(specs: Sequence[ExperimentSpec], table: str, keys: Sequence[str],
                   figure: Path) -> str:
    """Per-epoch metrics (mean ± std over seeds): one Markdown table per key and one figure
    with a panel per key, a line per spec; empty when no run logged any of them."""
    data = {k: c for k in keys if (c := epoch_curves(specs, table, k))}
    if not data:
        return ""
    from oodlab.track import plots

    fig = plots.epoch_curves_figure(data, title=f"{table}: per epoch, mean ± std over seeds")
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110, bbox_inches="tight")
    plots.close(fig)
    text = (f"\n### Per epoch\n\nMean ± sample std over seeds of each epoch's value. Figure: "
            f"[{figure.name}]({figure.name}).\n")
    for key, per_spec in data.items():
        n = max(len(v) for v in per_spec.values())
        text += (f"\n`{key}`\n\n| spec | " + " | ".join(f"ep {e + 1}" for e in range(n))
                 + " |\n|" + "---|" * (n + 1) + "\n")
        text += "\n".join(f"| {name} | " + " | ".join(
            f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.3f}" if v else "–"
            for v in per_epoch + [[]] * (n - len(per_epoch))) + " |"
            for name, per_epoch in per_spec.items()) + "\n"
    return text


def write_report(specs: Sequence[ExperimentSpec], table: str, out: str | Path,
                 command: str, scores: Sequence[str] = (),
                 per_set: Sequence[str] = (), baseline: str | None = None,
                 curves: Sequence[str] = (), hardware_text: str | None = None) -> Path:
    """Write the table (one per-OOD-set table per metric in ``per_set``, and with ``baseline``
    the per-seed paired differences against that spec) with the command, date and hardware it
    came from (``hardware_text``: runs computed elsewhere; default this machine), atomically.
    Whatever an existing file holds from :data:`NOTES_MARKER` on (the analysis written by
    hand) is kept."""
    out = Path(out)
    body = (f"# {table}\n\nGenerated by `{command}` on {time.strftime('%Y-%m-%d')}, "
            f"{hardware_text or hardware()}. Mean ± sample std over seeds; n = seeds.\n\n"
            + markdown_table(specs, table, scores) + "\n")
    if baseline:
        body += (f"\n### Paired differences against {baseline} (same seed)\n\n"
                 "Mean ± sample std of the per-seed difference; \"shown\" when the 95 % "
                 "t-interval of the mean difference excludes 0, \"not shown\" when the "
                 "difference is inside seed noise.\n\n"
                 + paired_table(specs, table, baseline, scores) + "\n")
    for metric in per_set:
        body += (f"\n### {PER_SET_METRICS[metric]} per test OOD set\n\n"
                 + per_set_table(specs, table, metric, scores) + "\n")
    for score in scores or specs[0].eval.scores[:1]:
        body += flagged_section(specs, table, score,
                                out.with_name(f"{out.stem}_flagged_{score}.png"))
    if curves:
        body += curves_section(specs, table, curves, out.with_name(f"{out.stem}_curves.png"))
    body += ("\n### Provenance\n\nEvery run behind the table: hashes of the served weights, "
             "of each split's content and of the spec, and the code version "
             "(`oodlab.provenance.*` tags).\n\n" + provenance_table(specs, table) + "\n")
    return write_keeping_notes(out, body)


def write_keeping_notes(out: Path, body: str, *, marker: bool = False) -> Path:
    """Write ``body`` to ``out`` atomically; whatever the old file holds from
    :data:`NOTES_MARKER` on (the analysis written by hand) is appended unchanged. ``marker``:
    a file without notes yet gets the marker at its end, so notes written below it survive
    the next rewrite."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text() if out.is_file() else ""
    if NOTES_MARKER in old:
        body += "\n" + old[old.index(NOTES_MARKER):]
    elif marker:
        body += "\n" + NOTES_MARKER + "\n"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(body)
    tmp.replace(out)
    return out
