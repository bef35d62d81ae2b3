"""SimCLR / CCL: losses against hand-computed values, cluster positives, seeded k-means (also
across two gloo workers), augmentations, cluster scores and spec errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from oodlab.detect.clustering import kmeans
from oodlab.detect.scores import build_score
from oodlab.methods import Loaders, TrainState, build_method
from oodlab.methods.contrastive import (
    ASSIGN,
    CENTRES,
    cluster_loss,
    cluster_positives,
    nt_xent,
)
from oodlab.methods.ops.augment import AugmentParams, augment, step_generator
from oodlab.spec import SpecError, validate_spec
from oodlab.spec.search_space import reported_metrics
from tests.helpers import tiny_spec

E = math.exp
# two samples, two views each (unit vectors): view 1 = a, view 2 = b; tau = 0.5, so every
# logit is 2 * cosine. Cosines: a1.a2 = 0, a1.b1 = .6, a1.b2 = .8, a2.b1 = .8, a2.b2 = .6,
# b1.b2 = .96.
A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
B = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
CENTRE = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # c0, c1


def _ccl_spec(tmp_path, **method):
    return validate_spec(tiny_spec(
        tmp_path, method={"name": "ccl", "clusters": 3, "warmup_epochs": 0, **method},
        data={"oe": [], "batch_size": 16}, train={"epochs": 2},
        eval={"scores": ["knn", "cluster_cosine", "cluster_mahalanobis"]}))


def test_nt_xent_matches_hand_computation():
    # anchor a1: positive b1 (1.2) over {a2: 0, b1: 1.2, b2: 1.6}; a2 is symmetric to a1
    l_a = -math.log(E(1.2) / (E(0) + E(1.2) + E(1.6)))
    # anchor b1: positive a1 (1.2) over {a1: 1.2, a2: 1.6, b2: 1.92}; b2 is symmetric to b1
    l_b = -math.log(E(1.2) / (E(1.2) + E(1.6) + E(1.92)))
    expected = (2 * l_a + 2 * l_b) / 4
    assert expected == pytest.approx(1.2707138, abs=1e-6)
    assert float(nt_xent(A, B, 0.5)) == pytest.approx(expected, abs=1e-6)
    assert float(nt_xent(3 * A, 2 * B, 0.5)) == pytest.approx(expected, abs=1e-6)  # normalised


def test_cluster_term_matches_hand_computation_for_different_clusters():
    # y = [0, 1]: positives of a1 = {b1 (1.2), c0 (2.0)}, denominator over
    # {a2: 0, b1: 1.2, b2: 1.6, c0: 2.0, c1: 0}; a2 mirrors a1.
    z_a = math.log(1 + E(1.2) + E(1.6) + E(2.0) + 1)
    l_a = -((1.2 - z_a) + (2.0 - z_a)) / 2
    # b1: positives {a1: 1.2, c0: 1.2} over {a1 1.2, a2 1.6, b2 1.92, c0 1.2, c1 1.6}
    z_b = math.log(2 * E(1.2) + 2 * E(1.6) + E(1.92))
    l_b = -((1.2 - z_b) + (1.2 - z_b)) / 2
    got = cluster_loss(A, B, torch.tensor([0, 1]), CENTRE, 0.5)
    assert float(got) == pytest.approx((2 * l_a + 2 * l_b) / 4, abs=1e-6)


def test_cluster_term_matches_hand_computation_for_one_cluster():
    # y = [0, 0]: every other view is a positive, plus c0
    z_a = math.log(1 + E(1.2) + E(1.6) + E(2.0) + 1)
    z_b = math.log(2 * E(1.2) + 2 * E(1.6) + E(1.92))
    l_a1 = -(0 + 1.2 + 1.6 + 2.0 - 4 * z_a) / 4  # a2, b1, b2, c0
    l_a2 = -(0 + 1.6 + 1.2 + 0 - 4 * z_a) / 4  # a1, b1, b2, c0
    l_b1 = -(1.2 + 1.6 + 1.92 + 1.2 - 4 * z_b) / 4
    l_b2 = -(1.6 + 1.2 + 1.92 + 1.6 - 4 * z_b) / 4
    got = cluster_loss(A, B, torch.tensor([0, 0]), CENTRE, 0.5)
    assert float(got) == pytest.approx((l_a1 + l_a2 + l_b1 + l_b2) / 4, abs=1e-6)


def test_ablation_switches_change_the_positive_set():
    y = torch.tensor([0, 0])
    # no sample positives, no centre positive: the cluster term is NT-Xent over views+centres
    only_views = cluster_loss(A, B, y, CENTRE, 0.5, sample_positives=False,
                              centre_positive=False)
    z_a = math.log(1 + E(1.2) + E(1.6) + E(2.0) + 1)
    z_b = math.log(2 * E(1.2) + 2 * E(1.6) + E(1.92))
    expected = (2 * -(1.2 - z_a) + 2 * -(1.2 - z_b)) / 4
    assert float(only_views) == pytest.approx(expected, abs=1e-6)
    full = cluster_loss(A, B, y, CENTRE, 0.5)
    assert float(full) != pytest.approx(expected, abs=1e-3)


def test_cluster_positives_are_exactly_the_same_cluster_samples():
    y = torch.tensor([0, 1, 0])
    pos = cluster_positives(y)  # views: rows 0-2 view 1, rows 3-5 view 2 of samples 0, 1, 2
    expected = torch.tensor([
        [0, 0, 1, 1, 0, 1],
        [0, 0, 0, 0, 1, 0],
        [1, 0, 0, 1, 0, 1],
        [1, 0, 1, 0, 0, 1],
        [0, 1, 0, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(pos, expected)


def test_kmeans_is_deterministic_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    dirs = torch.eye(4)[:3] * 5
    x = torch.cat([d + 0.1 * torch.randn(30, 4, generator=g) for d in dirs])
    r1, r2 = kmeans(x, 3, seed=7, restarts=2), kmeans(x, 3, seed=7, restarts=2)
    assert torch.equal(r1.assignments, r2.assignments)
    assert torch.equal(r1.centres, r2.centres)
    truth = torch.arange(3).repeat_interleave(30)
    # the partition equals the true one up to renaming
    for k in range(3):
        assert r1.assignments[truth == k].unique().numel() == 1
    assert r1.assignments.unique().numel() == 3
    assert torch.allclose(r1.centres.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match=r"clusters \(k=100\)"):
        kmeans(x, 100, seed=0)


def _recluster_worker(rank: int, path: str, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2)
    torch.manual_seed(0)  # same weights on both ranks, as train.py seeds
    spec = validate_spec(torch.load(path, weights_only=False))
    method = build_method(spec)
    model = method.build(10)
    data = TensorDataset(torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(1)),
                         torch.arange(40) % 4)
    state = TrainState(rank=rank, world_size=2)
    method.recluster(model, data, state)
    torch.save({CENTRES: state.extra[CENTRES], ASSIGN: state.extra[ASSIGN]},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_recluster_on_two_gloo_workers_gives_identical_clusters(tmp_path):
    spec = _ccl_spec(tmp_path)
    path = tmp_path / "spec.pt"
    torch.save(spec.model_dump(mode="json"), path)
    mp.spawn(_recluster_worker, args=(str(path), str(tmp_path / "init"), str(tmp_path)),
             nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0[ASSIGN], r1[ASSIGN])
    assert torch.equal(r0[CENTRES], r1[CENTRES])
    assert r0[CENTRES].abs().sum() > 0  # rank 1 started from zeros: it received rank 0's
    # and they are the single-process result for the same model and seed
    torch.manual_seed(0)
    method = build_method(spec)
    model = method.build(10)
    data = TensorDataset(torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(1)),
                         torch.arange(40) % 4)
    state = TrainState()
    method.recluster(model, data, state)
    assert torch.equal(state.extra[ASSIGN], r0[ASSIGN])


def test_cluster_weight_zero_is_simclr_and_restart_keeps_clusters(tmp_path):
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    data = TensorDataset(x, torch.zeros(8, dtype=torch.long))
    loaders = Loaders(id_train=torch.utils.data.DataLoader(data, batch_size=8))
    losses = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        method = build_method(_ccl_spec(tmp_path, cluster_weight=weight))
        model = method.build(10)
        state = TrainState(step=5)
        method.on_fit_start(model, loaders, state)  # warmup 0: clusters at once
        assert state.extra[ASSIGN].shape == (8,)
        loss = method.training_step(model, (x, data.tensors[1]), None, state)
        losses[weight] = float(loss.detach())
        # the same loss from NT-Xent on the same two views, computed outside the method
        with torch.no_grad():
            z1, z2 = method.embed_views(model, x, state)
        if weight == 0.0:
            assert losses[weight] == pytest.approx(float(nt_xent(z1, z2, 0.5)), abs=1e-6)
        # a restart (extra restored from a checkpoint) keeps the stored clusters
        saved = {k: v for k, v in state.extra.items()}
        path = tmp_path / "extra.pt"
        torch.save(saved, path)
        restored = TrainState(step=5, extra=torch.load(path, weights_only=True))
        restored.extra[CENTRES] = restored.extra[CENTRES] + 0  # a distinct tensor
        before = restored.extra[CENTRES].clone()
        method.on_fit_start(model, loaders, restored)
        assert torch.equal(restored.extra[CENTRES], before)
    assert losses[1.0] > losses[0.0]  # the cluster term adds a positive loss


def test_augment_is_seeded_and_exact_in_the_identity_case():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    p = AugmentParams(hflip_p=0.5)
    v1 = augment(x, p, step_generator("cpu", 0, 0, 3))
    assert torch.equal(v1, augment(x, p, step_generator("cpu", 0, 0, 3)))
    assert not torch.equal(v1, augment(x, p, step_generator("cpu", 0, 0, 4)))  # next step
    assert not torch.equal(v1, augment(x, p, step_generator("cpu", 0, 1, 3)))  # other rank
    assert v1.shape == x.shape and v1.min() >= 0 and v1.max() <= 1
    ident = AugmentParams(crop_min_scale=1, crop_ratio=(1, 1), jitter_p=0, grayscale_p=0)
    assert torch.allclose(augment(x, ident, step_generator("cpu", 0, 0, 0)), x, atol=1e-6)
    flip = ident.model_copy(update={"hflip_p": 1.0})
    assert torch.allclose(augment(x, flip, step_generator("cpu", 0, 0, 0)), x.flip(3),
                          atol=1e-6)
    gray = ident.model_copy(update={"grayscale_p": 1.0})
    g = augment(x, gray, step_generator("cpu", 0, 0, 0))
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(g[:, 1], luma, atol=1e-6) and torch.allclose(g[:, 0], g[:, 2])


def test_cluster_cosine_score_by_hand():
    feats = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    s = build_score("cluster_cosine", clusters=2)
    s.fit(feats, torch.zeros(4, 1), None)
    q = torch.tensor([[3.0, 4.0], [-1.0, 0.0], [0.0, 5.0]])
    assert torch.allclose(s.score(torch.zeros(3, 1), q), torch.tensor([0.8, 0.0, 1.0]))
    # the projection space is used when asked (here: the "logits" slot)
    sp = build_score("cluster_cosine", clusters=2, space="projection")
    sp.fit(torch.zeros(4, 3), feats, None)
    assert torch.allclose(sp.score(q, torch.zeros(3, 3)), torch.tensor([0.8, 0.0, 1.0]))


def test_cluster_mahalanobis_score_by_hand():
    # unit features: mean 0, std sqrt(.5) per dim, standardised = (+-sqrt2, 0), (0, +-sqrt2),
    # covariance = I; a unit query u standardises to sqrt2 * u: distance 2, score -2
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    s = build_score("cluster_mahalanobis", clusters=1)
    s.fit(feats, torch.zeros(4, 1), None)
    q = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    assert torch.allclose(s.score(torch.zeros(2, 1), q), torch.tensor([-2.0, -2.0]), atol=1e-5)
    # an anisotropic set: x-std = 1/sqrt2 of unit points along x only -> y has no spread
    feats2 = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    s2 = build_score("cluster_mahalanobis", clusters=1)
    s2.fit(feats2, torch.zeros(4, 1), None)
    # query (1, 0): standardised (1, 0) (std 1), covariance diag(1, 0) -> pinv diag(1, 0)
    assert float(s2.score(torch.zeros(1, 1), torch.tensor([[1.0, 0.0]]))) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="cluster_mahalanobis.space"):
        build_score("cluster_mahalanobis", space="pixels")


def test_bad_specs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"method.warmup_epochs \(2\) must be below "
                                         r"train.epochs \(2\)"):
        build_method(_ccl_spec(tmp_path, warmup_epochs=2))
    with pytest.raises(SpecError, match=r"method.augment.*crop_min_scale \(0.9\)"):
        _ccl_spec(tmp_path, augment={"crop_min_scale": 0.9, "crop_max_scale": 0.5})
    with pytest.raises(SpecError, match="method.clusters"):
        _ccl_spec(tmp_path, clusters=1)
    method = build_method(_ccl_spec(tmp_path, clusters=50))
    data = TensorDataset(torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"method.clusters \(50\) exceeds the 8"):
        method.recluster(method.build(10), data, TrainState())


def test_unsupervised_methods_report_no_id_accuracy(tmp_path):
    spec = _ccl_spec(tmp_path)
    known = reported_metrics(spec)
    assert "val/id_acc" not in known and "val/auroc" in known
    model = build_method(spec).build(10)
    proj, feats = model(torch.rand(2, 1, 28, 28))
    assert proj.shape == (2, 128) and feats.shape == (2, 32)  # width 8 -> 4 * 8 features


def test_shipped_search_space_fits_the_ccl_job():
    from pathlib import Path

    from oodlab.spec import load_spec
    from oodlab.spec.search_space import check_space, load_space

    root = Path(__file__).resolve().parent.parent
    space = load_space(root / "search_spaces" / "ccl.yaml")
    spec = load_spec(root / "jobs" / "ccl.yaml")
    check_space(space, spec)
    assert set(space.params) == {"method.clusters", "method.temperature",
                                 "method.cluster_weight", "method.recluster_every"}
    wrong = space.model_copy(update={"objectives": [
        space.objectives[0].model_copy(update={"metric": "val/id_acc"})]})
    with pytest.raises(SpecError, match="'val/id_acc' is never reported by 'ccl'"):
        check_space(wrong, spec)
