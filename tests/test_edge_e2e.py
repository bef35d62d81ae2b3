"""A short end-to-end EDGE run with OE (and automatic OE selection) on CPU."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from oodlab.cli.main import main
from oodlab.errors import ModelReferenceError
from oodlab.spec import validate_spec
from oodlab.train.pipeline import run_experiment
from tests.helpers import DATA_CACHE

pytestmark = pytest.mark.ray


def mosaic_spec(workdir, **method) -> dict:
    return {
        "name": "edge-tiny", "seed": 0, "workdir": str(workdir),
        "data": {"id": "mnist_mosaic", "image_size": 28, "limit": 256, "batch_size": 64,
                 "oe_batch_size": 64, "val_ood": ["mosaic_val_letters"],
                 "test_ood": ["mosaic_holdout", "mosaic_letters"],
                 "oe": ["mosaic_oe_textures", "mosaic_oe_noise"],
                 "oe_select": {"threshold": 0.0, "top_k": 8, "batch_size": 32,
                               "max_batches": 2},
                 "cache_dir": str(DATA_CACHE)},
        "model": {"arch": "small_cnn", "width": 8},
        "method": {"name": "edge", "k": 8, "gap_start_epoch": 1, **method},
        "train": {"epochs": 2, "lr": 0.05},
        "eval": {"scores": ["joint_energy", "max_logit"], "epoch_val_limit": 128},
        "tracking": {"experiment": "tests-edge"},
    }


def test_edge_run_with_oe_selection_and_head_tail(ray_session, tmp_path):
    # the selection's default backbone is this seed's trained bce run on the same training set
    raw = mosaic_spec(tmp_path)
    with pytest.raises(ModelReferenceError, match="no finished bce run with seed 0"):
        run_experiment(validate_spec(raw))
    bce = mosaic_spec(tmp_path) | {"name": "edge-tiny-bce", "method": {"name": "bce"}}
    bce["data"] = bce["data"] | {"oe": [], "oe_select": None}
    bce_run = run_experiment(validate_spec(bce)).run_id
    result = run_experiment(validate_spec(raw))
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["oodlab.oe_select.backbone"] == f"runs:/{bce_run}"
    m = run.data.metrics
    assert 0.0 <= m["test/id_map"] <= 1.0
    for key in ("headtail/joint_energy/all/mean/auroc", "headtail/joint_energy/head/mean/fpr95",
                "headtail/num_head_classes", "test/joint_energy/mosaic_holdout/fpr95"):
        assert key in m, key
    assert m["headtail/joint_energy/all/count"] == 256  # every ID test mosaic is in "all"
    # exactly one OE set chosen (threshold 0) and the ranking logged
    chosen = run.data.params["data.oe_selected"].split(",")
    assert len(chosen) == 1 and chosen[0] in {"mosaic_oe_textures", "mosaic_oe_noise"}
    paths = {f.path for f in client.list_artifacts(result.run_id)}
    assert "oe_selection.json" in paths
    plots = {f.path for f in client.list_artifacts(result.run_id, "plots")}
    assert "plots/headtail_joint_energy.png" in plots
    # the per-epoch view logs validation mAP, and L_gap switched on at epoch 1 without error
    assert [h.step for h in client.get_metric_history(result.run_id, "val/id_map")] == [0, 1]


def test_oe_select_command_writes_the_choice(tmp_path, capsys):
    import yaml

    path = tmp_path / "spec.yaml"
    raw = mosaic_spec(tmp_path)
    raw["data"]["oe_select"]["threshold"] = 1.0  # keep every candidate
    raw["data"]["oe_select"]["backbone"] = "random"  # EDGE's code: the seeded initial network
    path.write_text(yaml.safe_dump(raw))
    assert main(["oe-select", str(path)]) == 0
    out = json.loads((tmp_path / "oe_select" / "edge-tiny.json").read_text())
    assert sorted(out["selected"]) == ["mosaic_oe_noise", "mosaic_oe_textures"]
    assert [r["normalised"] for r in out["ranking"]] == sorted(r["normalised"]
                                                               for r in out["ranking"])
    assert out["backbone"] == "random"
    assert "distance" in capsys.readouterr().out
