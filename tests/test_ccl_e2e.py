"""CCL end to end on Ray: 2 DDP workers (rank 0 clusters, rank 1 receives the broadcast),
warm-up then the cluster term, the three post-hoc scores, and the served detector."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from oodlab.methods import detector_from_state
from oodlab.spec import validate_spec
from oodlab.track.tracking import load_detector
from oodlab.train.pipeline import run_experiment
from tests.helpers import tiny_spec

pytestmark = pytest.mark.ray


def test_ccl_two_workers_end_to_end(ray_session, tmp_path):
    spec = validate_spec(tiny_spec(
        tmp_path, name="ccl", data={"oe": [], "batch_size": 32},
        method={"name": "ccl", "clusters": 4, "warmup_epochs": 1, "proj_dim": 16},
        train={"epochs": 2, "optimizer": "adam", "lr": 0.002},
        eval={"scores": ["knn", "cluster_cosine", "cluster_mahalanobis"],
              "score_params": {"knn": {"k": 5}, "cluster_cosine": {"clusters": 4}}},
        resources={"num_workers": 2, "cpus_per_worker": 1}))
    res = run_experiment(spec)
    client = MlflowClient(res.tracking_uri)
    metrics = client.get_run(res.run_id).data.metrics
    active = [m.value for m in client.get_metric_history(res.run_id, "ccl/active")]
    assert active == [0.0, 1.0]  # plain NT-Xent in the warm-up, the cluster term after
    assert 0.1 <= metrics["ccl/purity"] <= 1.0  # 10 hidden labels: purity >= 0.1
    assert len(client.get_metric_history(res.run_id, "val/auroc")) == 2
    assert not any("id_acc" in k for k in metrics)  # unsupervised: no ID accuracy
    for score in spec.eval.scores:
        for set_name in ("letters", "gaussian"):
            assert 0.0 <= metrics[f"test/{score}/{set_name}/auroc"] <= 1.0
            assert 0.0 <= metrics[f"test/{score}/{set_name}/fpr95"] <= 1.0

    # the served detector (knn on backbone features) scores through the normal path
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = res.report.detector.score(x)
    served = load_detector(f"runs:/{res.run_id}", res.tracking_uri)
    assert torch.allclose(served.score(x), expected, atol=1e-5)
    again = detector_from_state(res.report.detector.state())
    assert torch.allclose(again.score(x), expected, atol=1e-5)
    # every score is a function of the stored model's outputs
    proj, feats = served.model(x)
    assert proj.shape == (6, 16) and torch.allclose(served.score_fn.score(proj, feats), expected,
                                                    atol=1e-5)
