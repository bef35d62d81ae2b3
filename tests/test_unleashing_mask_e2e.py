"""pretrain -> UM (2 DDP workers) and pretrain -> UMAP on Ray, checked through MLflow."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from oodlab.data.bundle import load_bundle
from oodlab.methods import build_method
from oodlab.methods.ops.pruning import maskable_layers, num_pruned
from oodlab.methods.unleashing_mask import estimate_loss_constraint
from oodlab.spec import validate_spec
from oodlab.track.tracking import ModelReferenceError, load_detector
from oodlab.train.pipeline import run_experiment
from tests.helpers import tiny_spec

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def pretrained(ray_session, tmp_path_factory):
    """One supervised pretraining (spec ``pre``) that the tests below finetune, each
    under its own spec name in the same workdir."""
    tmp_path = tmp_path_factory.mktemp("um_e2e")
    pre = run_experiment(validate_spec(tiny_spec(
        tmp_path, name="pre", method={"name": "supervised"}, eval={"scores": ["msp"]},
        train={"epochs": 2})))
    return tmp_path, pre


def test_pretrain_then_um_and_umap(pretrained):
    tmp_path, pre = pretrained
    client = MlflowClient(pre.tracking_uri)
    pre_metrics = client.get_run(pre.run_id).data.metrics
    auroc = [m.value for m in client.get_metric_history(pre.run_id, "val/auroc")]
    assert pre_metrics["val/best_auroc"] == pytest.approx(max(auroc))
    assert pre_metrics["val/last_auroc_drop"] == pytest.approx(max(auroc) - auroc[-1])
    assert pre_metrics["val/best_auroc_epoch"] == auroc.index(max(auroc)) + 1  # 1-based
    stored = pre.report.detector.model.state_dict()

    # UM on two workers: each scores half of the training set for ℓ̂, all-reduced
    um_spec = validate_spec(tiny_spec(
        tmp_path, name="um", method={"name": "um"}, init_from="spec:pre",
        eval={"scores": ["msp"]}, resources={"num_workers": 2, "cpus_per_worker": 1}))
    um = run_experiment(um_spec)
    run = client.get_run(um.run_id)
    assert run.data.tags["oodlab.init_from"] == f"runs:/{pre.run_id}"
    model = build_method(um_spec).build(10)
    model.load_state_dict(stored)
    expected = estimate_loss_constraint(model, load_bundle(um_spec).id_train, keep=0.965,
                                        seed=0)
    assert run.data.metrics["um/loss_constraint"] == pytest.approx(expected, rel=1e-5)
    assert 0.0 <= run.data.metrics["um/ascent_fraction"] <= 1.0

    umap = run_experiment(validate_spec(tiny_spec(
        tmp_path, name="umap", method={"name": "umap", "keep_ratio": 0.75},
        init_from="spec:pre", eval={"scores": ["msp"]}, train={"epochs": 2, "lr": 0.1})))
    served = load_detector(f"runs:/{umap.run_id}", umap.tracking_uri).model
    for name, layer in maskable_layers(served):
        w, w0 = layer.weight, stored[f"{name}.weight"]
        kept = w != 0
        assert int((~kept).sum()) == num_pruned(w.numel(), 0.75), name  # exactly 25% pruned
        assert torch.equal(w[kept], w0[kept]), name  # the kept weights are the stored ones
    masked = {f"{name}.weight" for name, _ in maskable_layers(served)}
    others = [k for k in stored if k not in masked and "running" not in k
              and "num_batches" not in k]
    assert any(k.endswith("bias") for k in others)
    for key in others:  # BatchNorm affine parameters and biases are never trained
        assert torch.equal(served.state_dict()[key], stored[key]), key
    metrics = client.get_run(umap.run_id).data.metrics
    assert "umap/mask_changed_fraction" in metrics


def test_flood_at_the_training_loss_both_ascends_and_descends(pretrained):
    """ℓ̂ set to the starting model's own training CE: batch means fall on both sides of it,
    so a flood that acts takes ascent and descent steps (a fraction of exactly 0 or 1 means
    the flood never engaged or never released)."""
    tmp_path, pre = pretrained
    spec = validate_spec(tiny_spec(tmp_path, name="um_flood", method={"name": "um"},
                                   init_from="spec:pre", eval={"scores": ["msp"]},
                                   train={"epochs": 3, "lr": 0.05}))
    model = build_method(spec).build(10)
    model.load_state_dict(pre.report.detector.model.state_dict())
    ell = estimate_loss_constraint(model, load_bundle(spec).id_train, keep=1.0, seed=0)
    spec = validate_spec(tiny_spec(tmp_path, name="um_flood", init_from="spec:pre",
                                   method={"name": "um", "loss_constraint": ell},
                                   eval={"scores": ["msp"]}, train={"epochs": 3, "lr": 0.05}))
    um = run_experiment(spec)
    client = MlflowClient(um.tracking_uri)
    history = [m.value for m in client.get_metric_history(um.run_id, "um/ascent_fraction")]
    assert len(history) == 3
    overall = sum(history) / len(history)  # epochs have equal step counts
    assert 0.0 < overall < 1.0, history
    assert history[-1] < 1.0, history  # plain CE (flood: false) stays below ℓ̂: 1.0 every epoch
    assert client.get_run(um.run_id).data.metrics["um/loss_constraint"] == pytest.approx(ell)


def test_spec_reference_needs_a_run_on_the_same_training_images(pretrained):
    """``pre`` exists for seed 0, but on 256 training images: a fine-tune capped at 128
    must not start from it (nor would a full-size one), and says why before any run starts."""
    tmp_path, _ = pretrained
    capped = validate_spec(tiny_spec(tmp_path, name="um_capped", method={"name": "um"},
                                     init_from="spec:pre", data={"limit": 128}))
    with pytest.raises(ModelReferenceError, match="no finished run of spec 'pre' with seed 0 "
                                                  "on this ID training set"):
        run_experiment(capped)


def test_spec_reference_without_a_matching_run_is_an_error(ray_session, tmp_path):
    spec = validate_spec(tiny_spec(tmp_path, seed=5, method={"name": "um"},
                                   init_from="spec:never_ran"))
    with pytest.raises(ModelReferenceError, match="no finished run of spec 'never_ran' with "
                                                  "seed 5"):
        run_experiment(spec)
