"""EDGE's OE-selection measure on synthetic features with known singular values."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from oodlab.detect.oe_select import dilation_distance, rank, spectrum, top_singular_values


def test_top_singular_values_known_cases():
    # orthogonal rows of any length normalise to an orthonormal set -> all ones
    s = top_singular_values(torch.tensor([[3.0, 0.0], [0.0, 4.0]]), k=2)
    assert s.tolist() == pytest.approx([1.0, 1.0])
    # two identical directions: rank one, sigma_1 = sqrt(2); k larger than rank is zero-padded
    s = top_singular_values(torch.tensor([[2.0, 0.0], [5.0, 0.0]]), k=3)
    assert s.tolist() == pytest.approx([math.sqrt(2), 0.0, 0.0])
    # only the top k are kept (no broadcasting of the full spectrum as in the reference code)
    assert top_singular_values(torch.eye(5), k=2).tolist() == pytest.approx([1.0, 1.0])


def test_dilation_distance_by_hand():
    d = dilation_distance(torch.tensor([math.sqrt(2), 0.0]), torch.tensor([1.0, 1.0]))
    assert d == pytest.approx(math.sqrt((math.sqrt(2) - 1) ** 2 + 1))


class _Features(torch.nn.Module):
    def forward(self, x):
        return x, x


def test_spectrum_averages_batches():
    # every 2-row batch of parallel rows has spectrum [sqrt 2, 0], whatever the shuffle
    feats = torch.tensor([[1.0, 0.0], [2.0, 0.0], [5.0, 0.0], [3.0, 0.0]])
    s = spectrum(_Features(), TensorDataset(feats, torch.zeros(4)), k=2, batch_size=2,
                 max_batches=10, seed=0)
    assert s.tolist() == pytest.approx([math.sqrt(2), 0.0])
    full = spectrum(_Features(), TensorDataset(torch.eye(4), torch.zeros(4)), k=2,
                    batch_size=4, max_batches=1, seed=0)
    assert full.tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="no full batch"):
        spectrum(_Features(), TensorDataset(torch.eye(3), torch.zeros(3)), k=2, batch_size=4,
                 max_batches=1, seed=0)


def test_rank_direction_and_threshold():
    d = {"a": 1.0, "b": 2.0, "c": 3.0}
    rows = rank(d, "smallest", threshold=0.5)
    assert [r.name for r in rows] == ["a", "b", "c"]
    assert [r.selected for r in rows] == [True, True, False]
    assert [r.normalised for r in rows] == pytest.approx([0.0, 0.5, 1.0])
    largest = rank(d, "largest", threshold=0.0)
    assert [r.name for r in largest if r.selected] == ["c"]
    assert [r.name for r in rank(d, "smallest", 1.0) if r.selected] == ["a", "b", "c"]


def _mosaic_spec(tmp_path, **oe_select):
    from oodlab.spec import validate_spec

    return validate_spec({
        "name": "edge-sel", "seed": 3, "workdir": str(tmp_path),
        "data": {"id": "mnist_mosaic", "oe": ["mosaic_oe_textures", "mosaic_oe_noise"],
                 "test_ood": ["mosaic_holdout"], "oe_select": oe_select},
        "model": {"arch": "small_cnn", "width": 8}, "method": {"name": "edge"},
        "tracking": {"experiment": "sel"}})


def test_default_backbone_is_this_seeds_bce_run_on_the_same_training_set(tmp_path, monkeypatch):
    from mlflow.entities import RunStatus

    from oodlab.errors import ModelReferenceError
    from oodlab.track import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = _mosaic_spec(tmp_path)
    assert spec.data.oe_select.backbone == "method:bce"  # trained, not random, by default
    with pytest.raises(ModelReferenceError, match=r"no finished bce run with seed 3.*'random'"):
        tracking.resolve_oe_backbone(spec, "hash-a")

    client = tracking.client_for(spec)
    exp = tracking.ensure_experiment(client, spec)

    clock = iter(range(1_000, 2_000))  # distinct start times: "newest" is well defined

    def run(method, seed, split, status="FINISHED"):
        tags = {"oodlab.method": method, "oodlab.seed": str(seed),
                "oodlab.provenance.split.id_train": split}
        r = client.create_run(exp, start_time=next(clock), tags=tags)
        client.set_terminated(r.info.run_id, status=RunStatus.to_string(
            getattr(RunStatus, status)))
        return r.info.run_id

    wanted = run("bce", 3, "hash-a")
    run("bce", 4, "hash-a")              # another seed
    run("bce", 3, "hash-b")              # another training set (e.g. another imbalance ratio)
    run("bce_oe", 3, "hash-a")           # another method
    run("bce", 3, "hash-a", "FAILED")    # newer, but failed
    assert tracking.resolve_oe_backbone(spec, "hash-a") == f"runs:/{wanted}"
    newer = run("bce", 3, "hash-a")
    assert tracking.resolve_oe_backbone(spec, "hash-a") == f"runs:/{newer}"
    # explicit choices pass through; spec:<name> is found by run name
    assert tracking.resolve_oe_backbone(_mosaic_spec(tmp_path, backbone="random"), "x") == "random"
    with pytest.raises(ModelReferenceError, match="no finished run of spec 'edge_bce'"):
        tracking.resolve_oe_backbone(_mosaic_spec(tmp_path, backbone="spec:edge_bce"), "x")
