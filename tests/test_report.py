"""`oodlab report` on a tiny MLflow store written here: aggregation, missing values, HTML."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from oodlab.cli.main import main  # noqa: E402
from oodlab.report.report import (  # noqa: E402
    RESULTS_TAG,
    RunRecord,
    benchmark_name,
    provenance,
    write_report,
)

# spec -> seed -> metrics; "photos" AUPR-in is missing from every `weak` run
RUNS = {
    ("strong", "energy_oe", "mnist"): {
        0: {"letters": (0.10, 0.95, 0.96), "photos": (0.00, 1.00, 1.00), "id": 0.90},
        1: {"letters": (0.20, 0.93, 0.94), "photos": (0.02, 0.99, 0.99), "id": 0.92},
        2: {"letters": (0.30, 0.91, 0.92), "photos": (0.04, 0.98, 0.98), "id": 0.94},
    },
    ("weak", "supervised", "mnist"): {
        0: {"letters": (0.60, 0.70, 0.71), "photos": (0.50, 0.80, None), "id": 0.99},
        1: {"letters": (0.80, 0.60, 0.61), "photos": (0.70, 0.70, None), "id": 0.97},
    },
}


def _log(client: MlflowClient, exp: str, spec: str, method: str, bench: str, seed: int,
         m: dict, tmp: Path, table: str = "t") -> str:
    exp_id = (client.get_experiment_by_name(exp) or
              client.get_experiment(client.create_experiment(
                  exp, artifact_location=(tmp / "art").as_uri())))
    exp_id = exp_id.experiment_id
    run = client.create_run(exp_id, run_name=spec, tags={RESULTS_TAG: table})
    rid = run.info.run_id
    for k, v in {"method.name": method, "data.id": bench, "seed": seed,
                 "eval.scores": "['energy']"}.items():
        client.log_param(rid, k, v)
    for set_name, vals in m.items():
        if set_name == "id":
            client.log_metric(rid, "test/id_acc", vals)
            continue
        for key, v in zip(("fpr95", "auroc", "aupr_in"), vals, strict=True):
            if v is not None:
                client.log_metric(rid, f"test/energy/{set_name}/{key}", v)
    means = {k: np.mean([v[i] for s, v in m.items() if s != "id" and v[i] is not None])
             for i, k in enumerate(("fpr95", "auroc", "aupr_in"))}
    for k, v in means.items():
        client.log_metric(rid, f"test/energy/mean/{k}", float(v))
    if seed == 0:
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, 1])
        path = tmp / f"roc_energy_{spec}.png"
        fig.savefig(path)
        plt.close(fig)
        target = tmp / "plots"
        target.mkdir(exist_ok=True)
        shutil.copyfile(path, target / "roc_energy.png")
        client.log_artifact(rid, str(target / "roc_energy.png"), "plots")
    client.set_terminated(rid)
    return rid


@pytest.fixture()
def store(tmp_path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    for (spec, method, bench), seeds in RUNS.items():
        for seed, m in seeds.items():
            _log(client, "exp", spec, method, bench, seed, m, tmp_path)
    # a failed run and an untagged run must not count
    bad = client.create_run(client.get_experiment_by_name("exp").experiment_id,
                            run_name="strong", tags={RESULTS_TAG: "t"})
    client.log_param(bad.info.run_id, "eval.scores", "['energy']")
    client.log_metric(bad.info.run_id, "test/energy/letters/fpr95", 9.0)
    client.set_terminated(bad.info.run_id, "FAILED")
    return uri


def _cells(md: str, title: str, row: str) -> list[str]:
    section = md.split(f"### {title}")[1].split("###")[0]
    line = next(line for line in section.splitlines() if line.startswith(f"| {row}"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_aggregates_seeds_marks_best_and_missing(store, tmp_path):
    md_path, html_path = write_report(store, tmp_path / "out", ["exp"])
    md = md_path.read_text()
    # columns: letters, photos, mean, ID acc
    fpr_strong = _cells(md, "mnist: FPR@95 per OOD set", "strong (energy_oe) · energy")
    fpr_weak = _cells(md, "mnist: FPR@95 per OOD set", "weak (supervised) · energy")
    # by hand: letters FPR 0.1, 0.2, 0.3 -> mean 0.2, sample std 0.1
    assert fpr_strong[0] == "**0.200 ± 0.100 (n=3)**"
    # weak letters 0.6, 0.8 -> 0.7 ± 0.1414; not the best (FPR: lower is better)
    assert fpr_weak[0] == "0.700 ± 0.141 (n=2)"
    # ID accuracy: strong 0.92 ± 0.02, weak 0.98 ± 0.01414 (best: higher)
    assert fpr_strong[3] == "0.920 ± 0.020 (n=3)"
    assert fpr_weak[3] == "**0.980 ± 0.014 (n=2)**"
    aupr_weak = _cells(md, "mnist: AUPR-in per OOD set", "weak (supervised) · energy")
    assert aupr_weak[1] == "–"  # never logged: missing, not zero
    assert "9.000" not in md  # the FAILED run is not aggregated
    assert md.count("seed 0]") == 2 and "#/experiments/" in md
    assert (tmp_path / "out" / "plots").is_dir() and "![" in md
    assert "head / tail" not in md  # no multi-label runs here
    assert "5 runs on hardware not recorded" in md  # the fixture's runs carry no tag
    assert "![mnist-comparison](plots/mnist-comparison.png)" in md
    assert (tmp_path / "out" / "plots" / "mnist-comparison.png").stat().st_size > 0
    assert html_path.read_text().count("<table>") == 3


def test_provenance_counts_hardware_and_wall_time():
    def rec(hw: str, minutes: float) -> RunRecord:
        return RunRecord("r", "0", "s", "m", "mnist", 0, [], {}, "t", hw, minutes)

    text = provenance([rec("cpu box", 30), rec("cpu box", 45), rec("", 15)])
    # 30 + 45 + 15 minutes = 1.5 h; the untagged run is said to be untagged
    assert text == ("2 runs on cpu box; 1 run on hardware not recorded; "
                    "1.5 h of run wall time in total")


def test_capped_splits_are_a_benchmark_of_their_own():
    assert benchmark_name({"data.id": "mnist", "data.limit": "None"}) == "mnist"
    assert benchmark_name({"data.id": "mnist", "data.limit": "200"}) == "mnist, limit 200"


def test_one_spec_in_two_tables_is_two_rows(tmp_path):
    """The same spec run for two results tables (e.g. two ``--set`` variants) must not pool
    its seeds: one row per table, each labelled with its table."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    for table, fpr in (("dir-smallest", 0.1), ("dir-largest", 0.5)):
        for seed in (0, 1):
            m = {"letters": (fpr + seed / 10, 0.9, 0.9), "id": 0.9}
            _log(client, "exp", "sel", "edge", "mosaic", seed, m, tmp_path, table=table)
    _log(client, "exp", "plain", "bce", "mosaic", 0, {"letters": (0.9, 0.5, 0.5)}, tmp_path)
    md = write_report(uri, tmp_path / "out")[0].read_text()
    small = _cells(md, "mosaic: FPR@95 per OOD set", "sel [dir-smallest] (edge) · energy")
    large = _cells(md, "mosaic: FPR@95 per OOD set", "sel [dir-largest] (edge) · energy")
    assert small[0] == "**0.150 ± 0.071 (n=2)**"  # 0.1, 0.2 by hand
    assert large[0] == "0.550 ± 0.071 (n=2)"  # 0.5, 0.6
    assert "| plain (bce) · energy |" in md  # a spec in one table keeps the short label


def test_published_difference_and_run_provenance(tmp_path):
    """A row whose method, score, ID and OOD set have a published number shows the
    difference from it; every run lists its provenance hashes; a row without a counterpart
    says so."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("exp", artifact_location=(tmp_path / "art").as_uri())
    for seed, auroc in ((0, 0.95), (1, 0.97)):
        run = client.create_run(exp, run_name="lmd_fmnist", tags={
            RESULTS_TAG: "t", "oodlab.provenance.checkpoint": f"{seed}abcdef0123456789",
            "oodlab.provenance.split.id_test": "feedbeefcafe0000",
            "oodlab.provenance.code": "1a2b3c4"})
        rid = run.info.run_id
        for k, v in {"method.name": "ddpm", "data.id": "fashion_mnist", "seed": seed,
                     "eval.scores": "['lmd']"}.items():
            client.log_param(rid, k, v)
        for k, v in {"test/lmd/mnist/auroc": auroc, "test/lmd/mean/auroc": auroc}.items():
            client.log_metric(rid, k, v)
        client.set_terminated(rid)
    _log(client, "exp", "plain", "supervised", "mnist", 0, {"letters": (0.5, 0.5, 0.5)},
         tmp_path)
    md = write_report(uri, tmp_path / "out")[0].read_text()
    row = _cells(md, "Published counterparts", "lmd_fmnist (ddpm) · lmd")
    # 0.95, 0.97: mean 0.960, sample std 0.014; 0.960 - 0.992 (Liu et al. 2023, Table 1)
    assert row[:5] == ["mnist", "auroc", "0.960 ± 0.014 (n=2)", "0.992", "-0.032"]
    assert "Table 1" in row[5]
    assert "weights 0abcdef0, ID train/val/test –/–/feedbeef" in md and "code 1a2b3c4" in md
    assert "weights 1abcdef0" in md
    mnist = md.split("## Benchmark `mnist`")[1]
    assert "No row on this benchmark has a published counterpart" in mnist
    assert "provenance not recorded" in mnist


def test_html_opens_in_a_headless_browser(store, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is needed for this test (make test installs it)"
    _, html_path = write_report(store, tmp_path / "out")
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", html_path.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ok = re.search(r'data-images-ok="(\d+)/(\d+)"', proc.stdout)
    assert ok, proc.stdout[:500]  # the page's script ran after load
    loaded, total = map(int, ok.groups())
    assert total == 3 and loaded == total  # both logged ROC plots + the comparison figure
    console_errors = [line for line in proc.stderr.splitlines()
                      if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]
    assert not console_errors, console_errors


def test_cli_names_a_missing_experiment_and_writes_nothing(store, tmp_path, capsys):
    out = tmp_path / "nothing"
    code = main(["report", "--tracking-uri", store, "--experiment", "nope", "--out", str(out)])
    assert code == 2
    assert "nope" in capsys.readouterr().err
    assert not (out / "report.md").exists()
