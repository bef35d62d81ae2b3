"""ddpm on Ray Train -> lmd + diffusion_recon evaluation -> MLflow -> served detector."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow import MlflowClient

from oodlab.data.bundle import eval_loader, load_bundle
from oodlab.detect.diffusion.scoring import score_set
from oodlab.serve.app import forward
from oodlab.serve.registry import LoadedModel, ModelVersionRef, describe
from oodlab.spec import validate_spec
from oodlab.track.tracking import SELECTED_CHECKPOINT_TAG, load_detector
from oodlab.train.loop import CHECKPOINT_FILE
from oodlab.train.pipeline import run_experiment
from tests.helpers import tiny_spec

pytestmark = pytest.mark.ray


def test_ddpm_lmd_end_to_end(ray_session, tmp_path):
    spec = validate_spec(tiny_spec(
        tmp_path, name="lmd_tiny",
        data={"limit": 96, "batch_size": 32, "eval_batch_size": 48, "oe": []},
        method={"name": "ddpm", "channels": 8, "channel_mult": [1, 2],
                "attention_resolutions": [14], "timesteps": 100, "sample_every": 1,
                "sample_steps": 4, "val_limit": 16, "val_steps": 3, "val_attempts": 2},
        train={"epochs": 2, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
        eval={"scores": ["lmd", "diffusion_recon"], "score_params": {
            "lmd": {"steps": 4, "attempts": 2, "block_size": 4},
            "diffusion_recon": {"steps": 3, "attempts": 2, "noise_level": 0.3,
                                "distance": "ssim"}}}))
    res = run_experiment(spec)
    client = MlflowClient(res.tracking_uri)
    run = client.get_run(res.run_id)
    m = run.data.metrics
    for score in ("lmd", "diffusion_recon"):
        for ood in ("letters", "gaussian", "mean"):
            assert 0.0 <= m[f"test/{score}/{ood}/auroc"] <= 1.0
    assert "test/id_acc" not in m  # unsupervised: no ID accuracy is invented
    losses = client.get_metric_history(res.run_id, "val/denoise_loss")
    assert sorted(h.step for h in losses) == [0, 1] and all(math.isfinite(h.value)
                                                            for h in losses)
    assert 0.0 <= m["val/auroc"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(res.run_id, "samples")}
    assert artifacts == {"samples/epoch_001.png", "samples/epoch_002.png"}

    # the served model holds the EMA weights of the selected checkpoint (not the raw ones)
    payload = torch.load(f"{run.data.tags[SELECTED_CHECKPOINT_TAG]}/{CHECKPOINT_FILE}",
                         weights_only=True)["model"]
    detector = load_detector(f"runs:/{res.run_id}", res.tracking_uri)
    served = detector.model.state_dict()
    assert all(torch.equal(v, payload[f"averaged.module.{k}"]) for k, v in served.items())
    assert any(not torch.equal(v, payload[f"net.{k}"]) for k, v in served.items())

    # serving path: the loaded detector reproduces the evaluation scores (same seeds)
    bundle = load_bundle(spec)
    x = torch.stack([bundle.id_test[i][0] for i in range(48)])  # = the first eval batch
    assert torch.allclose(detector.score(x, batch_size=48),
                          res.report.scores["lmd"].id_test[:48], atol=1e-5)

    # the serving code's batch path: the same scores and the calibrated threshold
    loaded = LoadedModel(detector, ModelVersionRef("lmd", "1", None, res.run_id), {}, "cpu")
    served_scores = forward([(loaded, img) for img in x[:6]])
    expected = detector.score(x[:6])
    assert [s for s, _ in served_scores] == pytest.approx(expected.tolist(), abs=1e-5)
    assert [o for _, o in served_scores] == (expected < detector.threshold).tolist()
    assert describe(loaded)["score"] == "lmd"

    # scale: the set spread over 2 Ray tasks scores exactly as in one process
    loader = eval_loader(bundle.id_test, 48)
    seq = score_set(detector.score_fn, detector.model, loader, "cpu", workers=1)
    par = score_set(detector.score_fn, detector.model, loader, "cpu", workers=2)
    assert torch.allclose(seq, par, atol=1e-6)
    assert torch.allclose(seq, res.report.scores["lmd"].id_test, atol=1e-5)
