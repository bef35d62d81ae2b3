"""Seed aggregation of the results table: mean ± sample std by hand, missing shown as missing."""

from __future__ import annotations

from oodlab.report.results import mean_std
from tests.helpers import tiny_spec


def test_mean_std_by_hand():
    # mean 2, sample std sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1
    assert mean_std([1.0, 2.0, 3.0]) == "2.000 ± 1.000 (n=3)"
    assert mean_std([0.5]) == "0.500 ± 0.000 (n=1)"


def test_missing_metric_is_a_dash_not_zero():
    assert mean_std([]) == "–"


def _store_with_runs(tmp_path):
    """Two finished seeds of a spec in a fresh MLflow store, tagged for table 't'."""
    from oodlab.report.results import RESULTS_TAG
    from oodlab.spec import validate_spec
    from oodlab.track import tracking
    from tests.helpers import tiny_spec

    spec = validate_spec(tiny_spec(tmp_path))
    client = tracking.client_for(spec)
    exp = tracking.ensure_experiment(client, spec)
    for seed, (auroc_letters, auroc_gauss) in enumerate(((0.6, 0.9), (0.8, 1.0))):
        run = client.create_run(exp, tags={RESULTS_TAG: "t", "mlflow.runName": spec.name,
                                           "oodlab.seed": str(seed),
                                           "oodlab.provenance.checkpoint": f"ckpt{seed}"})
        for k, v in {"test/energy/letters/auroc": auroc_letters,
                     "test/energy/gaussian/auroc": auroc_gauss,
                     "test/energy/mean/auroc": (auroc_letters + auroc_gauss) / 2}.items():
            client.log_metric(run.info.run_id, k, v)
        if seed == 1:  # the steps and the served epoch (0-based in MLflow) of one run
            client.log_metric(run.info.run_id, "train/optimizer_steps", 2145)
            client.log_metric(run.info.run_id, "train/selected_epoch", 0)
        client.set_terminated(run.info.run_id, "FINISHED")
    return spec


def test_per_set_table_and_hand_notes_survive_a_rewrite(tmp_path):
    from oodlab.report.results import NOTES_MARKER, write_report

    spec = _store_with_runs(tmp_path)
    out = tmp_path / "t.md"
    write_report([spec], "t", out, "oodlab results x", per_set=["auroc"])
    first = out.read_text()
    # letters: mean 0.7, sample std sqrt(2 * 0.1^2 / 1) = 0.141; gaussian 0.95 ± 0.071;
    # mean over sets 0.75, 0.9 -> 0.825 ± 0.106
    assert "| tiny | energy | 0.700 ± 0.141 (n=2) | 0.950 ± 0.071 (n=2) | 0.825 ± 0.106 (n=2) |" \
        in first
    assert "AUROC ↑ per test OOD set" in first
    provenance = first.split("### Provenance")[1]  # every run, its weights; '–' where untagged
    assert "| tiny | 0 |" in provenance and "| – | – | ckpt0 | – |" in provenance
    assert "| tiny | 1 |" in provenance and "| 2,145 | 1 of 1 | ckpt1 | – |" in provenance
    out.write_text(first + f"\n{NOTES_MARKER}\n\nPlainly: written by hand.\n")
    write_report([spec], "t", out, "oodlab results x")  # regenerated, without per-set now
    second = out.read_text()
    assert second.endswith(f"{NOTES_MARKER}\n\nPlainly: written by hand.\n")
    assert "per test OOD set" not in second and second.count(NOTES_MARKER) == 1


def test_per_set_table_groups_near_far_and_keeps_sanity_out_of_the_mean(tmp_path):
    from oodlab.report.results import per_set_columns
    from oodlab.spec import validate_spec

    spec = validate_spec(tiny_spec(tmp_path, data={
        "test_ood": [], "near_ood": ["letters"], "far_ood": ["photos", "blobs"],
        "sanity_ood": ["gaussian"]}))
    labels = [label for label, _ in per_set_columns([spec])]
    assert labels == ["letters", "**near mean**", "photos", "blobs", "**far mean**",
                      "**mean**", "gaussian", "sanity mean"]
    # the headline mean column comes before every sanity column
    assert labels.index("**mean**") < labels.index("gaussian")


def test_paired_difference_by_hand():
    from oodlab.report.results import paired_difference

    # diffs 0.02, 0.03, 0.04: mean 0.03, std 0.01, t(0.975, 2) = 4.303 -> half-width 0.0248
    assert paired_difference([0.02, 0.03, 0.04], higher_is_better=True) == \
        "+0.030 ± 0.010 (3/3 better, shown)"
    # the same diffs on a lower-is-better metric: all three seeds got worse
    assert paired_difference([0.02, 0.03, 0.04], higher_is_better=False) == \
        "+0.030 ± 0.010 (0/3 better, shown)"
    # mean 0.01, std 0.0265: the interval holds 0, so the difference is inside seed noise
    assert paired_difference([0.04, -0.01, 0.0], higher_is_better=True) == \
        "+0.010 ± 0.026 (1/3 better, not shown)"
    assert paired_difference([], higher_is_better=True) == "–"


def _log_seed_run(client, exp, name, seed, metrics, table="t"):
    from oodlab.report.results import RESULTS_TAG

    run = client.create_run(exp, tags={RESULTS_TAG: table, "mlflow.runName": name,
                                       "oodlab.seed": str(seed)})
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_paired_table_pairs_by_seed_not_by_order(tmp_path):
    """Seeds are matched by tag: logging the runs in a different order changes nothing, and a
    seed the baseline lacks is left out of the pair."""
    from oodlab.report.results import paired_table
    from oodlab.spec import validate_spec
    from oodlab.track import tracking

    base = validate_spec(tiny_spec(tmp_path, name="base"))
    other = validate_spec(tiny_spec(tmp_path, name="other"))
    client = tracking.client_for(base)
    exp = tracking.ensure_experiment(client, base)
    key = "test/energy/mean/auroc"
    for seed, auroc in ((0, 0.70), (1, 0.80), (2, 0.90)):
        _log_seed_run(client, exp, "base", seed, {key: auroc})
    # other = base + 0.05 on seeds 0 and 1, logged in reverse order; seed 7 has no pair
    for seed, auroc in ((7, 0.10), (1, 0.85), (0, 0.75)):
        _log_seed_run(client, exp, "other", seed, {key: auroc})
    table = paired_table([base, other], "t", "base")
    assert "| spec − base | score | Δ AUROC |" in table
    assert "| other | energy | +0.050 ± 0.000 (2/2 better, shown) |" in table


def test_resume_skips_finished_seeds(tmp_path, monkeypatch):
    """--resume reruns only the seeds without a finished run in the table."""
    import yaml

    from oodlab.report import results
    from oodlab.spec import validate_spec
    from oodlab.track import tracking

    spec_dict = tiny_spec(tmp_path)
    spec = validate_spec(spec_dict)
    client = tracking.client_for(spec)
    exp = tracking.ensure_experiment(client, spec)
    done = _log_seed_run(client, exp, spec.name, 0, {"test/energy/mean/auroc": 0.5})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    ran = []

    class Result:
        run_id = "new"

    def fake_run(s, spec_path, tags):
        ran.append(s.seed)
        return Result()

    monkeypatch.setattr("oodlab.train.pipeline.run_experiment", fake_run)
    ids = results.run_seeds([str(path)], [0, 1], "t", resume=True)
    assert ran == [1] and ids == [done, "new"]
    ran.clear()
    results.run_seeds([str(path)], [0, 1], "t", resume=False)
    assert ran == [0, 1]


def test_per_class_flagged_table_and_figure(tmp_path):
    """Per-class flagged-OOD rates are averaged per class index over seeds, in index order,
    and drawn; a table whose runs log none gets no such section."""
    from oodlab.report.results import write_report
    from oodlab.spec import validate_spec
    from oodlab.track import tracking

    spec = validate_spec(tiny_spec(tmp_path, name="ml"))
    client = tracking.client_for(spec)
    exp = tracking.ensure_experiment(client, spec)
    key = "headtail/energy/class/{}/flagged_ood"
    # class 0 (head): 0.02, 0.04 -> 0.030 ± 0.014; class 2 (tail): 0.10, 0.20 -> 0.150 ± 0.071
    for seed, (c0, c1, c2) in enumerate(((0.02, 0.05, 0.10), (0.04, 0.07, 0.20))):
        _log_seed_run(client, exp, "ml", seed, {key.format(0): c0, key.format(1): c1,
                                                key.format(2): c2,
                                                "test/energy/mean/auroc": 0.9})
    out = tmp_path / "ml.md"
    write_report([spec], "t", out, "oodlab results x")
    text = out.read_text()
    assert "| spec | class 0 | class 1 | class 2 |" in text
    assert ("| ml | 0.030 ± 0.014 (n=2) | 0.060 ± 0.014 (n=2) | 0.150 ± 0.071 (n=2) |"
            in text)
    figure = tmp_path / "ml_flagged_energy.png"
    assert figure.stat().st_size > 1000 and f"]({figure.name})" in text
    # the plain table of test_per_set_table... has no per-class rates: no section, no figure
    plain = _store_with_runs(tmp_path / "plain")
    write_report([plain], "t", tmp_path / "plain.md", "oodlab results x")
    assert "flagged OOD per class" not in (tmp_path / "plain.md").read_text()
    assert not (tmp_path / "plain_flagged_energy.png").exists()


def test_per_epoch_curves_table_and_figure(tmp_path):
    """--curves: per-epoch metric histories averaged per epoch over seeds, by step (not by
    logging order); a spec that never logged the metric is left out; no key, no section."""
    from oodlab.report.results import write_report
    from oodlab.spec import validate_spec
    from oodlab.track import tracking

    um = validate_spec(tiny_spec(tmp_path, name="um"))
    ce = validate_spec(tiny_spec(tmp_path, name="ce"))
    client = tracking.client_for(um)
    exp = tracking.ensure_experiment(client, um)
    for seed, values in enumerate(((0.2, 0.4, 0.6), (0.4, 0.6, 0.8))):
        run_id = _log_seed_run(client, exp, "um", seed, {"test/energy/mean/auroc": 0.9})
        for step in (2, 0, 1):  # logged out of order
            client.log_metric(run_id, "um/ascent_fraction", values[step], step=step)
        _log_seed_run(client, exp, "ce", seed, {"test/energy/mean/auroc": 0.8})
    out = tmp_path / "um.md"
    write_report([um, ce], "t", out, "oodlab results x", curves=["um/ascent_fraction"])
    text = out.read_text()
    assert "| spec | ep 1 | ep 2 | ep 3 |" in text
    assert "| um | 0.300 ± 0.141 | 0.500 ± 0.141 | 0.700 ± 0.141 |" in text
    assert "| ce |" not in text.split("`um/ascent_fraction`")[1].split("###")[0]
    assert (tmp_path / "um_curves.png").stat().st_size > 1000
    write_report([um, ce], "t", tmp_path / "plain.md", "oodlab results x")
    assert "### Per epoch" not in (tmp_path / "plain.md").read_text()
