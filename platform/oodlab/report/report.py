"""``oodlab report``: every method on every benchmark, from MLflow, as Markdown and HTML.

The report reads the finished runs that ``oodlab results`` tagged (``oodlab.results``),
groups them by benchmark (the ID dataset, ``data.id``) and by row (spec, method, score), and
aggregates the seeds: mean ± sample std with the seed count. Nothing is copied by hand; a
metric a run never logged is shown as missing ("–"), never as zero. Per row, the ROC and
score-histogram plots of its lowest-seed run are copied next to the report, and every row
links to its MLflow runs. The ``oodlab report`` command over :func:`write_report` lives in
:mod:`oodlab.cli.report`.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from oodlab.cluster.ray_local import HARDWARE_TAG
from oodlab.report.published import counterparts
from oodlab.report.results import RESULTS_TAG, provenance_of

if TYPE_CHECKING:
    from mlflow import MlflowClient

# (label, metric suffix, better) of the per-set tables
SET_METRICS = (("FPR@95", "fpr95", "min"), ("AUROC", "auroc", "max"),
               ("AUPR-in", "aupr_in", "max"))
ID_METRICS = {"test/id_acc": "ID acc", "test/id_map": "ID mAP"}
HEADTAIL = re.compile(r"^headtail/(?P<score>[^/]+)/(?P<group>[^/]+)/mean/(?P<metric>auroc|fpr95)$")


@dataclass
class RunRecord:
    """One finished run, as the report needs it."""

    run_id: str
    experiment_id: str
    spec: str
    method: str
    benchmark: str
    seed: int
    scores: list[str]
    metrics: dict[str, float]
    table: str = ""  # the `oodlab results --name` that made it
    hardware: str = ""  # ray_local.hardware() when the run started ("" = not recorded)
    minutes: float = 0.0  # wall time from start to end
    provenance: dict[str, str] = field(default_factory=dict)  # oodlab.provenance.* tags


@dataclass
class Row:
    """One table row: a spec + method + score of one results table, aggregated over its seed
    runs. The table name is shown only where one spec was run for several tables (the same
    spec with different ``--set`` overrides), so that their seeds are never pooled."""

    benchmark: str
    table: str
    spec: str
    method: str
    score: str
    runs: list[RunRecord] = field(default_factory=list)
    show_table: bool = False

    @property
    def label(self) -> str:
        where = f" [{self.table}]" if self.show_table else ""
        return f"{self.spec}{where} ({self.method}) · {self.score}"

    def values(self, key: str) -> list[float]:
        """The metric over seeds, from the runs that logged it (and are not NaN)."""
        return [r.metrics[key] for r in self.runs
                if key in r.metrics and not np.isnan(r.metrics[key])]


@dataclass
class Column:
    label: str
    key: str  # metric key template: {score} is the row's score
    better: str  # "max" or "min"


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[Row]


def gather(client: MlflowClient, experiments: list[str] | None = None,
           table: str | None = None) -> list[RunRecord]:
    """Finished runs tagged by ``oodlab results`` (optionally of one table) in the named
    experiments (default: all)."""
    if experiments:
        found = {n: client.get_experiment_by_name(n) for n in experiments}
        missing = [n for n, e in found.items() if e is None]
        if missing:
            known = sorted(e.name for e in client.search_experiments())
            raise ValueError(f"no MLflow experiment named {missing}; known: {known}")
        ids = [e.experiment_id for e in found.values()]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    tag = f"tags.`{RESULTS_TAG}` = '{table}'" if table else f"tags.`{RESULTS_TAG}` != ''"
    runs = client.search_runs(ids, filter_string=f"{tag} and attributes.status = 'FINISHED'",
                              max_results=10_000)
    out = []
    for r in runs:
        p = r.data.params
        out.append(RunRecord(
            run_id=r.info.run_id, experiment_id=r.info.experiment_id,
            spec=r.data.tags.get("mlflow.runName", "?"), method=p.get("method.name", "?"),
            benchmark=benchmark_name(p), seed=int(p.get("seed", 0)),
            scores=_as_list(p.get("eval.scores", "")), metrics=dict(r.data.metrics),
            table=r.data.tags.get(RESULTS_TAG, ""),
            hardware=r.data.tags.get(HARDWARE_TAG, ""),
            minutes=((r.info.end_time or r.info.start_time) - r.info.start_time) / 60_000,
            provenance=provenance_of(r.data.tags)))
    return out


def benchmark_name(params: dict[str, str]) -> str:
    """The ID dataset, and the per-split cap when the run had one: runs on capped splits
    were tested on other (smaller) test sets, so they get a table of their own."""
    limit = params.get("data.limit", "None")
    name = params.get("data.id", "?")
    return name if limit in ("None", "") else f"{name}, limit {limit}"


def _as_list(text: str) -> list[str]:
    return [s.strip(" '\"") for s in text.strip("[]").split(",") if s.strip(" '\"")]


def build_rows(records: list[RunRecord]) -> dict[str, list[Row]]:
    """Benchmark -> rows (table, spec, method, score), ordered by spec, table, then score
    order."""
    rows: dict[tuple[str, str, str, str, str], Row] = {}
    for rec in sorted(records, key=lambda r: (r.benchmark, r.spec, r.table, r.seed)):
        for score in rec.scores:
            if not any(k.startswith(f"test/{score}/") for k in rec.metrics):
                continue
            key = (rec.benchmark, rec.table, rec.spec, rec.method, score)
            rows.setdefault(key, Row(*key)).runs.append(rec)
    tables_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in rows.values():
        tables_of[row.benchmark, row.spec].add(row.table)
    out: dict[str, list[Row]] = defaultdict(list)
    for row in rows.values():
        row.show_table = len(tables_of[row.benchmark, row.spec]) > 1
        out[row.benchmark].append(row)
    return dict(out)


def tables_for(benchmark: str, rows: list[Row]) -> list[Table]:
    """One table per set metric (columns = OOD sets, mean, ID metric), plus head/tail."""
    sets = sorted({k.split("/")[2] for r in rows for run in r.runs for k in run.metrics
                   if k.startswith(f"test/{r.score}/") and k.count("/") == 3}
                  - {"mean", "near", "far", "sanity"})
    id_keys = [k for k in ID_METRICS if any(k in run.metrics for r in rows for run in r.runs)]
    id_cols = [Column(ID_METRICS[k], k, "max") for k in id_keys]
    tables = []
    for label, suffix, better in SET_METRICS:
        cols = [Column(s, f"test/{{score}}/{s}/{suffix}", better) for s in [*sets, "mean"]]
        tables.append(Table(f"{benchmark}: {label} per OOD set", cols + id_cols, rows))
    groups = sorted({m["group"] for r in rows for run in r.runs for k in run.metrics
                     if (m := HEADTAIL.match(k))})
    if groups:
        cols = [Column(f"{g} {lab}", f"headtail/{{score}}/{g}/mean/{metric}", better)
                for g in groups for lab, metric, better in (("AUROC", "auroc", "max"),
                                                            ("FPR@95", "fpr95", "min"))]
        cols.append(Column("tail-only flagged OOD", "headtail/{score}/tail_only/flagged_ood",
                           "min"))
        tables.append(Table(f"{benchmark}: head / tail ID images (multi-label)", cols, rows))
    return tables


def provenance(records: list[RunRecord]) -> str:
    """Where and for how long the runs were computed: each distinct hardware tag with its run
    count, and the total wall time of the runs."""
    count: dict[str, int] = defaultdict(int)
    for rec in records:
        count[rec.hardware or "hardware not recorded"] += 1
    where = "; ".join(f"{n} run{'s' * (n != 1)} on {hw}" for hw, n in sorted(count.items()))
    total = sum(rec.minutes for rec in records)
    return f"{where}; {total / 60:.1f} h of run wall time in total"


def run_provenance(run: RunRecord) -> str:
    """One run's provenance in a line: weights, ID splits, test OOD sets, spec, code (hashes
    cut to 8 hex digits; the full ones are the run's ``oodlab.provenance.*`` tags)."""
    p = {k: v[:8] if k != "code" else v for k, v in run.provenance.items()}
    if not p:
        return "provenance not recorded"
    splits = "/".join(p.get(f"split.id_{s}", "–") for s in ("train", "val", "test"))
    return (f"weights {p.get('checkpoint', '–')}, ID train/val/test {splits}, test OOD "
            f"{p.get('split.test_ood', '–')}, spec {p.get('spec', '–')}, code {p.get('code', '–')}")


def published_rows(rows: list[Row]) -> list[list[str]]:
    """[row, OOD set, metric, ours, published, ours − published, source] for every row with
    a published counterpart (same method, score, ID and OOD set)."""
    out = []
    for row in rows:
        for pub in counterparts(row.method, row.score, row.benchmark):
            values = [r.metrics[k] for r in row.runs
                      if (k := f"test/{row.score}/{pub.ood_set}/{pub.metric}") in r.metrics]
            ours, mean = cell(values)
            diff = "–" if mean is None else f"{mean - pub.value:+.3f}"
            out.append([row.label, pub.ood_set, pub.metric, ours, f"{pub.value:.3f}", diff,
                        pub.source + (f" ({pub.note})" if pub.note else "")])
    return out


PUBLISHED_HEADER = ["row", "OOD set", "metric", "ours", "published", "ours − published",
                    "source"]
NO_PUBLISHED = ("No row on this benchmark has a published counterpart with the same method, "
                "ID and OOD set (oodlab/report/published.py lists the verified ones).")


def seed_stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; 0 for one seed) over seeds; NaN mean when missing."""
    if not values:
        return float("nan"), 0.0
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def cell(values: list[float]) -> tuple[str, float | None]:
    """``mean ± std (n=k)`` (sample std) and the mean; ``–`` and None when missing."""
    if not values:
        return "–", None
    mean, std = seed_stats(values)
    return f"{mean:.3f} ± {std:.3f} (n={len(values)})", mean


def table_cells(table: Table) -> list[list[tuple[str, bool]]]:
    """Text of each cell and whether it is the best mean of its column (ties all best)."""
    grid = [[cell(row.values(col.key.format(score=row.score))) for col in table.columns]
            for row in table.rows]
    out = [[(text, False) for text, _ in line] for line in grid]
    for j, col in enumerate(table.columns):
        means = [line[j][1] for line in grid if line[j][1] is not None]
        if len(means) < 2:
            continue
        best = max(means) if col.better == "max" else min(means)
        for i, line in enumerate(grid):
            if line[j][1] is not None and np.isclose(line[j][1], best, rtol=0, atol=5e-4):
                out[i][j] = (line[j][0], True)
    return out


def run_link(base_url: str, run: RunRecord) -> str:
    return f"{base_url.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"


def copy_plots(tracking_uri: str, rows: list[Row], plot_dir: Path) -> dict[str, list[Path]]:
    """ROC + histogram of each row's lowest-seed run, copied to ``plot_dir``."""
    import mlflow

    out: dict[str, list[Path]] = {}
    plot_dir.mkdir(parents=True, exist_ok=True)
    for row in rows:
        run = min(row.runs, key=lambda r: r.seed)
        got = []
        for kind in ("roc", "hist"):
            name = f"plots/{kind}_{row.score}.png"
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    path = mlflow.artifacts.download_artifacts(
                        run_id=run.run_id, artifact_path=name, dst_path=tmp,
                        tracking_uri=tracking_uri)
                    dest = plot_dir / _slug(f"{row.benchmark}-{row.spec}-{row.score}-{kind}.png")
                    shutil.copyfile(path, dest)
                    got.append(dest)
            except Exception:  # noqa: BLE001 - a run without that plot: report says so
                continue
        out[row.label] = got
    return out


def comparison_plot(benchmark: str, rows: list[Row], plot_dir: Path) -> Path:
    """One figure of the benchmark: mean AUROC and mean FPR@95 (over OOD sets) per row, with
    the std over seeds as whiskers and the best row dark."""
    from oodlab.track import plots

    panels = {}
    for label, suffix, better in (("mean AUROC", "auroc", "max"),
                                  ("mean FPR@95", "fpr95", "min")):
        stats = [seed_stats(row.values(f"test/{row.score}/mean/{suffix}")) for row in rows]
        panels[label] = ([m for m, _ in stats], [sd for _, sd in stats], better)
    fig = plots.comparison_figure([row.label for row in rows], panels,
                                  f"{benchmark}: every method and score, mean over OOD sets")
    plot_dir.mkdir(parents=True, exist_ok=True)
    path = plot_dir / _slug(f"{benchmark}-comparison.png")
    fig.savefig(path, dpi=110)
    plots.close(fig)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def render_markdown(title: str, meta: str, tables: dict[str, list[Table]],
                    overview: dict[str, Path],
                    plots: dict[str, list[Path]], out_dir: Path, base_url: str) -> str:
    lines = [f"# {title}", "", meta, ""]
    for benchmark, tabs in tables.items():
        lines += [f"## Benchmark `{benchmark}`", ""]
        if benchmark in overview:
            fig = overview[benchmark]
            lines += [f"![{fig.stem}]({fig.relative_to(out_dir).as_posix()})", ""]
        for t in tabs:
            lines += [f"### {t.title}", "", "Best mean per column in **bold**.", "",
                      "| row | " + " | ".join(c.label for c in t.columns) + " |",
                      "|---|" + "---|" * len(t.columns)]
            for row, cells in zip(t.rows, table_cells(t), strict=True):
                shown = [f"**{text}**" if best else text for text, best in cells]
                lines.append(f"| {row.label} | " + " | ".join(shown) + " |")
            lines.append("")
        rows = tabs[0].rows
        lines += ["### Published counterparts", ""]
        if pub := published_rows(rows):
            lines += ["| " + " | ".join(PUBLISHED_HEADER) + " |",
                      "|---" * len(PUBLISHED_HEADER) + "|"]
            lines += ["| " + " | ".join(r) + " |" for r in pub]
        else:
            lines.append(NO_PUBLISHED)
        lines += ["", "### Runs, provenance and plots", ""]
        for row in rows:
            links = "; ".join(f"[seed {r.seed}]({run_link(base_url, r)}) ({run_provenance(r)})"
                              for r in row.runs)
            imgs = " ".join(f"![{p.stem}]({p.relative_to(out_dir).as_posix()})"
                            for p in plots.get(row.label, []))
            lines.append(f"- **{row.label}**: {links}" + (f"<br>{imgs}" if imgs else
                                                            " (no plots logged)"))
        lines.append("")
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:100em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;
padding:.25em .5em;font-size:.85em;text-align:right}td:first-child,th:first-child{text-align:left}
td.best{font-weight:bold;background:#e6f4ea}td.missing{color:#999}img{width:260px;margin:2px}
img.wide{width:auto;max-width:100%}"""

# marks the page once every plot decoded, so a headless browser can check it opened whole
_CHECK_JS = """window.addEventListener('load',()=>{const i=[...document.images];
document.body.dataset.imagesOk=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});"""


def render_html(title: str, meta: str, tables: dict[str, list[Table]],
                overview: dict[str, Path],
                plots: dict[str, list[Path]], out_dir: Path, base_url: str) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}"
             f"</title><style>{_CSS}</style><script>{_CHECK_JS}</script></head><body>",
             f"<h1>{e(title)}</h1><p>{e(meta)}</p>"]
    for benchmark, tabs in tables.items():
        parts.append(f"<h2>Benchmark <code>{e(benchmark)}</code></h2>")
        if benchmark in overview:
            fig = overview[benchmark]
            parts.append(f"<p><img class='wide' src='{e(fig.relative_to(out_dir).as_posix())}'"
                         f" alt='{e(fig.stem)}'></p>")
        for t in tabs:
            parts.append(f"<h3>{e(t.title)}</h3><table><tr><th>row</th>"
                         + "".join(f"<th>{e(c.label)}</th>" for c in t.columns) + "</tr>")
            for row, cells in zip(t.rows, table_cells(t), strict=True):
                tds = "".join(
                    f"<td class='{'best' if best else ('missing' if text == '–' else '')}'>"
                    f"{e(text)}</td>" for text, best in cells)
                parts.append(f"<tr><td>{e(row.label)}</td>{tds}</tr>")
            parts.append("</table>")
        parts.append("<h3>Published counterparts</h3>")
        if pub := published_rows(tabs[0].rows):
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in PUBLISHED_HEADER)
                         + "</tr>" + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r)
                                             + "</tr>" for r in pub) + "</table>")
        else:
            parts.append(f"<p>{e(NO_PUBLISHED)}</p>")
        parts.append("<h3>Runs, provenance and plots</h3>")
        for row in tabs[0].rows:
            links = "<br>".join(f"<a href='{e(run_link(base_url, r))}'>seed {r.seed}</a> "
                                f"({e(run_provenance(r))})" for r in row.runs)
            imgs = "".join(f"<img src='{e(p.relative_to(out_dir).as_posix())}' "
                           f"alt='{e(p.stem)}'>" for p in plots.get(row.label, []))
            parts.append(f"<h4>{e(row.label)}</h4><p>{links}</p><div>{imgs}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(tracking_uri: str, out_dir: str | Path, experiments: list[str] | None = None,
                 table: str | None = None, base_url: str = "http://127.0.0.1:5000",
                 command: str = "oodlab report") -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and ``plots/`` into ``out_dir``; the files appear
    together or not at all (built in a temporary directory, then moved)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    records = gather(client, experiments, table)
    if not records:
        scope = f"experiments {experiments}" if experiments else "any experiment"
        raise ValueError(f"no finished runs tagged {RESULTS_TAG} in {scope} of {tracking_uri}; "
                         "make them with `oodlab results` (or `make results`)")
    by_bench = build_rows(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        tables = {b: tables_for(b, rows) for b, rows in sorted(by_bench.items())}
        plots: dict[str, list[Path]] = {}
        overview: dict[str, Path] = {}
        for bench, rows in by_bench.items():
            plots |= copy_plots(tracking_uri, rows, stage / "plots")
            overview[bench] = comparison_plot(bench, rows, stage / "plots")
        meta = (f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} from {len(records)} "
                f"MLflow runs ({tracking_uri}); {provenance(records)}. Mean ± sample std over "
                "seeds, n = seeds; – = not logged.")
        md = render_markdown("OOD detection results", meta, tables, overview, plots, stage,
                             base_url)
        page = render_html("OOD detection results", meta, tables, overview, plots, stage,
                           base_url)
        (stage / "report.md").write_text(md + "\n")
        (stage / "report.html").write_text(page + "\n")
        if (out_dir / "plots").exists():
            shutil.rmtree(out_dir / "plots")
        for name in ("plots", "report.md", "report.html"):
            os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir / "report.md", out_dir / "report.html"

