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
    for auroc_letters, auroc_gauss in ((0.6, 0.9), (0.8, 1.0)):
        run = client.create_run(exp, tags={RESULTS_TAG: "t", "mlflow.runName": spec.name})
        for k, v in {"test/energy/letters/auroc": auroc_letters,
                     "test/energy/gaussian/auroc": auroc_gauss,
                     "test/energy/mean/auroc": (auroc_letters + auroc_gauss) / 2}.items():
            client.log_metric(run.info.run_id, k, v)
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
