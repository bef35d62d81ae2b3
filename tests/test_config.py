"""Spec validation: unknown fields, wrong types, impossible values name the field; exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from oodlab.cli.main import main
from oodlab.spec import SpecError, apply_overrides, flatten, load_spec, validate_spec
from tests.helpers import tiny_spec

ROOT = Path(__file__).resolve().parent.parent


def test_every_job_spec_in_repo_validates():
    specs = sorted((ROOT / "jobs").glob("*.yaml"))
    assert specs, "jobs/ holds no specs"
    for path in specs:
        assert load_spec(path).name


@pytest.mark.parametrize(
    ("change", "field", "hint"),
    [
        ({"train": {"epochs": -1}}, "train.epochs", "greater than or equal to 1"),
        ({"train": {"epochz": 3}}, "train.epochz", "Extra inputs are not permitted"),
        ({"train": {"lr": "fast"}}, "train.lr", "valid number"),
        ({"method": {"name": "magic"}}, "method", "'supervised'"),
        ({"method": {"name": "energy_oe", "m_in": -5, "m_out": -7}}, "method",
         "m_in (-5.0) must be below m_out"),
        ({"data": {"id": "imagenet"}}, "data.id", "unknown dataset"),
        ({"eval": {"scores": ["nope"]}}, "eval.scores", "allowed:"),
        ({"eval": {"score_params": {"nope": {}}}}, "eval.score_params", "unknown score 'nope'"),
        ({"eval": {"score_params": {"mahalanobis": {"shrink": 0.1}}}}, "eval.score_params",
         "unexpected keyword argument 'shrink'"),
        ({"eval": {"score_params": {"mahalanobis": {"shrinkage": 2}}}}, "eval.score_params",
         "mahalanobis.shrinkage must be in [0, 1]"),
        ({"data": {"test_ood": ["letters"], "val_ood": ["letters"]}}, "data", "never be used"),
        ({"resources": {"num_workers": 0}}, "resources.num_workers", "greater than or equal"),
    ],
)
def test_bad_fields_are_named(tmp_path, change, field, hint):
    with pytest.raises(SpecError) as err:
        validate_spec(tiny_spec(tmp_path, **change))
    msg = str(err.value)
    assert field in msg and hint in msg, msg


def test_unknown_method_lists_allowed_values(tmp_path):
    with pytest.raises(SpecError) as err:
        validate_spec(tiny_spec(tmp_path, method={"name": "magic"}))
    for allowed in ("supervised", "oe", "energy_oe"):
        assert f"'{allowed}'" in str(err.value)


def test_overrides_are_typed_and_nested(tmp_path):
    raw = apply_overrides(tiny_spec(tmp_path), ["train.epochs=3", "data.oe=[oe_symbols]",
                                                "method.m_in=-20"])
    spec = validate_spec(raw)
    assert spec.train.epochs == 3 and spec.data.oe == ["oe_symbols"]
    assert spec.method.m_in == -20.0
    with pytest.raises(SpecError, match="expected key=value"):
        apply_overrides(raw, ["train.epochs"])


def test_flatten_gives_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": []}) == {"a.b": 1, "a.c.d": 2, "e": []}


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cli_exits_2_before_ray_or_mlflow(tmp_path, capsys):
    import ray

    was_running = ray.is_initialized()
    path = _write(tmp_path, tiny_spec(tmp_path, train={"epochs": 0}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and "greater than or equal to 1" in err
    assert ray.is_initialized() == was_running  # no Ray started by the failed run
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run created


def test_cli_rejects_missing_file_and_non_mapping(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "spec file not found" in capsys.readouterr().err
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert main(["run", str(path)]) == 2
    assert "must be a YAML mapping" in capsys.readouterr().err


def test_help_explains_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--set" in out and "MLflow" in out


def test_pinned_spec_has_absolute_local_paths(tmp_path, monkeypatch):
    """Tune trials run in their own directory: a pinned spec must not depend on the cwd."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OODLAB_WORKDIR", raising=False)
    spec = validate_spec({"name": "p", "method": {"name": "supervised"}, "workdir": "work",
                          "storage": "s3://bucket/ckpt",
                          "data": {"cache_dir": "cache", "val_ood": [], "test_ood": []}})
    pinned = spec.pinned()
    assert pinned.workdir == str(tmp_path / "work")
    assert pinned.data.cache_dir == str(tmp_path / "cache")
    assert pinned.data.root is None and pinned.storage == "s3://bucket/ckpt"
    monkeypatch.chdir(tmp_path.parent)
    assert pinned.workdir_path == tmp_path / "work"


# ------------------------------------------------------------- grouped test sets (OpenOOD)

GROUPED = {"id": "fashion_mnist", "test_ood": [], "val_ood": ["fashion_val_blur"],
           "near_ood": ["mnist", "letters"], "far_ood": ["photos", "synth_textures", "blobs"],
           "sanity_ood": ["gaussian", "rademacher"], "oe": ["oe_textures"]}


def test_grouped_test_sets_validate(tmp_path):
    spec = validate_spec(tiny_spec(tmp_path, data=GROUPED))
    assert spec.data.grouped
    assert spec.data.test_sets() == {"near": ["mnist", "letters"],
                                     "far": ["photos", "synth_textures", "blobs"],
                                     "sanity": ["gaussian", "rademacher"]}


def test_groups_replace_the_default_test_ood(tmp_path):
    raw = {"name": "g", "method": {"name": "supervised"}, "workdir": str(tmp_path),
           "data": {"id": "fashion_mnist", "near_ood": ["mnist"], "far_ood": ["photos"]}}
    spec = validate_spec(raw)
    assert spec.data.test_ood == [] and spec.data.test_sets() == {"near": ["mnist"],
                                                                  "far": ["photos"]}
    old = validate_spec({**raw, "data": {"id": "mnist"}})  # old specs keep their default
    assert old.data.test_sets() == {"ungrouped": ["letters", "photos", "gaussian",
                                                  "rademacher", "blobs"]}


@pytest.mark.parametrize(
    ("change", "hint"),
    [
        ({"test_ood": ["blobs"], "far_ood": ["photos"]}, "cannot be mixed"),
        ({"near_ood": ["letters"], "far_ood": ["letters"]}, "listed twice"),
        ({"far_ood": ["photos"], "val_ood": ["photos"]}, "never be used for training"),
        ({"far_ood": ["photos"], "oe": ["photos"]}, "never be used for training"),
        ({"sanity_ood": ["gaussian"], "near_ood": [], "far_ood": []}, "at least one near"),
        ({"near_ood": ["fashion_mnist"]}, "cannot also be an OOD set"),
        ({"near_ood": ["emnist"]}, "data.near_ood: unknown dataset"),
        ({"imbalance_ratio": 101}, "less than or equal to 100"),
    ],
)
def test_bad_groups_are_named(tmp_path, change, hint):
    with pytest.raises(SpecError) as err:
        validate_spec(tiny_spec(tmp_path, data={**GROUPED, **change}))
    assert hint in str(err.value), str(err.value)


def test_imbalance_ratio_defaults_to_the_sets_own(tmp_path):
    assert validate_spec(tiny_spec(tmp_path)).data.imbalance_ratio is None
    spec = validate_spec(tiny_spec(tmp_path, data={"imbalance_ratio": 100}))
    assert spec.data.imbalance_ratio == 100


# ------------------------------------------------------------------------------ label guard


def test_label_scores_are_rejected_for_unsupervised_methods(tmp_path):
    for method in ({"name": "simclr"}, {"name": "ccl"}):
        with pytest.raises(SpecError) as err:
            validate_spec(tiny_spec(tmp_path, method=method,
                                    eval={"scores": ["knn", "mahalanobis"]}))
        msg = str(err.value)
        assert "eval.scores" in msg and "mahalanobis" in msg and "unsupervised" in msg
    ok = validate_spec(tiny_spec(tmp_path, method={"name": "simclr"}, eval={"scores": ["knn"]}))
    assert ok.eval.scores == ["knn"]
    sup = validate_spec(tiny_spec(tmp_path, method={"name": "supervised"},
                                  eval={"scores": ["msp", "mahalanobis"]}))
    assert sup.eval.scores == ["msp", "mahalanobis"]
