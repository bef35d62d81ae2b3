"""SimCLR / CCL: losses against hand-computed values, cluster positives, seeded k-means (no
empty cluster; Euclidean for SSD), one global batch and shared clusters across two gloo
workers, cluster ids by dataset index, augmentations, cluster scores and spec errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

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
# views = the images themselves (the crop samples the full image on the pixel grid)
IDENTITY = {"crop_min_scale": 1, "crop_ratio": [1, 1], "jitter_p": 0, "grayscale_p": 0}


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


def _step_data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(40, 1, 28, 28, generator=g), torch.arange(40) % 4)


def _global_step(spec, rank: int, world: int, rows: range) -> dict:
    """One ccl training step over the items ``rows`` of this worker (DDP when world > 1):
    the loss and every parameter's gradient. BatchNorm in eval mode, so a forward pass does
    not depend on how the batch is split; views are the images (identity augmentation)."""
    torch.manual_seed(0)
    method = build_method(spec)
    model = method.build(10).eval()
    data = _step_data()
    g = torch.Generator().manual_seed(5)
    state = TrainState(rank=rank, world_size=world, extra={
        CENTRES: torch.nn.functional.normalize(torch.randn(3, 128, generator=g), dim=1),
        ASSIGN: torch.arange(40) % 3})
    loader = DataLoader(data, batch_size=len(rows), sampler=list(rows))
    method.on_fit_start(model, Loaders(id_train=loader), state)  # clusters given: kept
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss = method.training_step(trained, next(iter(loader)), None, state)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.clone()
                                             for n, p in model.named_parameters()}}


def _two_worker(rank: int, path: str, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2)
    torch.manual_seed(0)  # same weights on both ranks, as train.py seeds
    spec = validate_spec(torch.load(path, weights_only=False))
    method = build_method(spec)
    model = method.build(10)
    state = TrainState(rank=rank, world_size=2)
    method.recluster(model, _step_data(), state)
    step = _global_step(spec, rank, 2, range(rank * 12, rank * 12 + 12))
    torch.save({CENTRES: state.extra[CENTRES], ASSIGN: state.extra[ASSIGN], **step},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_workers_share_clusters_and_one_global_batch(tmp_path):
    spec = _ccl_spec(tmp_path, augment=IDENTITY)
    path = tmp_path / "spec.pt"
    torch.save(spec.model_dump(mode="json"), path)
    mp.spawn(_two_worker, args=(str(path), str(tmp_path / "init"), str(tmp_path)),
             nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # k-means on rank 0, broadcast: identical clusters, equal to the single-process result
    assert torch.equal(r0[ASSIGN], r1[ASSIGN])
    assert torch.equal(r0[CENTRES], r1[CENTRES])
    assert r0[CENTRES].abs().sum() > 0  # rank 1 started from zeros: it received rank 0's
    torch.manual_seed(0)
    method = build_method(spec)
    state = TrainState()
    method.recluster(method.build(10), _step_data(), state)
    assert torch.equal(state.extra[ASSIGN], r0[ASSIGN])
    # 2 workers x 12 images = one process with the 24 concatenated images: the same loss
    # (NT-Xent + cluster term over 48 views, cluster ids gathered) on both ranks, and after
    # DDP's average the same gradient (the gather keeps the local rows' gradient)
    single = _global_step(spec, 0, 1, range(24))
    for r in (r0, r1):
        assert float(r["loss"]) == pytest.approx(float(single["loss"]), abs=1e-5)
    assert single["grads"].keys() == r0["grads"].keys()
    for name, grad in single["grads"].items():
        assert torch.allclose(r0["grads"][name], grad, atol=1e-5), name
        assert torch.allclose(r1["grads"][name], grad, atol=1e-5), name
    # one worker's 12 images alone (per-worker negatives) give another loss
    alone = _global_step(spec, 0, 1, range(12))
    assert float(alone["loss"]) != pytest.approx(float(single["loss"]), abs=1e-3)


def test_cluster_ids_come_from_the_dataset_index(tmp_path):
    # two pixel-identical images with different clusters: an image hash cannot tell them
    # apart, the sampler's index can
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    x[4] = x[1]
    data = TensorDataset(x, torch.tensor([0, 1, 2, 3, 1, 5]))
    method = build_method(_ccl_spec(tmp_path))
    assign = torch.tensor([0, 1, 2, 0, 2, 1])
    state = TrainState(extra={CENTRES: torch.eye(3, 128), ASSIGN: assign})
    loader = DataLoader(data, batch_size=3, sampler=[4, 1, 0, 5, 2, 3], drop_last=True)
    method.on_fit_start(method.build(10), Loaders(id_train=loader), state)
    got = [method.batch_indices(batch) for batch in loader]
    assert [g.tolist() for g in got] == [[4, 1, 0], [5, 2, 3]]
    assert assign[got[0]].tolist() == [2, 1, 0]  # images 4 and 1 are equal, clusters differ
    it = iter(loader)
    first = next(it)
    with pytest.raises(RuntimeError, match="not the one the training sampler yielded"):
        method.batch_indices((first[0], first[1].flip(0)))  # another order of labels
    with pytest.raises(RuntimeError, match="yielded only 0 indices"):
        method.batch_indices(first)  # taken already


def test_kmeans_leaves_no_empty_cluster_on_duplicated_points():
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]])
    x = pts.repeat_interleave(10, 0)  # 3 distinct points, 10 copies each
    for metric in ("cosine", "euclidean"):
        for k in (3, 5, 8):
            res = kmeans(x, k, seed=0, iters=10, restarts=2, metric=metric)
            kept = len(res.centres)
            assert kept <= min(k, 3)
            counts = torch.bincount(res.assignments, minlength=kept)
            assert bool((counts > 0).all()), (metric, k, counts)
            assert res.assignments.max() == kept - 1
            assert torch.isfinite(res.centres).all() and res.centres.norm(dim=1).min() > 0.5
    # many copies of one point and a few others (k-means++ can seed two equal centres)
    x = torch.cat([torch.zeros(50, 2) + torch.tensor([1.0, 0.0]), torch.randn(4, 2)])
    for seed in range(5):
        res = kmeans(x, 4, seed=seed, iters=5, metric="euclidean")
        assert bool((torch.bincount(res.assignments) > 0).all())


def test_ccl_centres_have_members_when_kmeans_drops_a_cluster(tmp_path):
    # 8 copies of 2 images, K = 3: at most 2 non-empty clusters, no zero centre kept
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(4)).repeat(4, 1, 1, 1)
    method = build_method(_ccl_spec(tmp_path))
    torch.manual_seed(0)
    state = TrainState()
    method.recluster(method.build(10), TensorDataset(x, torch.arange(8) % 2), state)
    centres, assign = state.extra[CENTRES], state.extra[ASSIGN]
    assert len(centres) == assign.unique().numel() <= 2
    assert torch.allclose(centres.norm(dim=1), torch.ones(len(centres)))


def test_euclidean_kmeans_separates_what_spherical_kmeans_cannot():
    # two groups on the same ray: identical directions, norms 1 and 10
    g = torch.Generator().manual_seed(0)
    ray = torch.tensor([1.0, 1.0])
    x = torch.cat([ray * (1 + 0.01 * torch.randn(20, 1, generator=g)),
                   ray * (10 + 0.01 * torch.randn(20, 1, generator=g))])
    euc = kmeans(x, 2, seed=0, metric="euclidean")
    assert euc.assignments[:20].unique().numel() == 1
    assert euc.assignments[20:].unique().numel() == 1
    assert euc.assignments[0] != euc.assignments[20]
    assert torch.allclose(euc.centres.norm(dim=1).sort().values,
                          torch.tensor([1.0, 10.0]) * 2**0.5, rtol=0.01)
    cos = kmeans(x, 2, seed=0, metric="cosine")  # every point has cosine 1: one cluster
    assert len(cos.centres) == 1 and cos.assignments.unique().tolist() == [0]
    with pytest.raises(ValueError, match="metric"):
        kmeans(x, 2, seed=0, metric="manhattan")


def test_ssd_score_clusters_with_euclidean_kmeans():
    # SSD's per-cluster means are those of Euclidean k-means of the standardised features
    g = torch.Generator().manual_seed(3)
    feats = torch.cat([torch.randn(40, 3, generator=g) * 0.3 + c for c in
                       (torch.tensor([2.0, 0, 0]), torch.tensor([2.0, 0.3, 0.1]),
                        torch.tensor([0, 0, 1.0]))])
    s = build_score("cluster_mahalanobis", clusters=3, seed=0)
    s.fit(feats, torch.zeros(len(feats), 1), None)
    f = torch.nn.functional.normalize(feats.double(), dim=1)
    f = (f - f.mean(0)) / f.std(0, unbiased=False)

    def member_means(metric: str) -> torch.Tensor:
        a = kmeans(f, 3, seed=0, iters=50, restarts=3, metric=metric).assignments
        return torch.stack([f[a == k].mean(0) for k in a.unique().tolist()])

    assert torch.allclose(s.means, member_means("euclidean"))
    assert s.means.shape != member_means("cosine").shape or not torch.allclose(
        s.means, member_means("cosine"), atol=1e-3)  # the spherical partition differs here


def test_cluster_weight_zero_is_simclr_and_restart_keeps_clusters(tmp_path):
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    data = TensorDataset(x, torch.zeros(8, dtype=torch.long))
    loaders = Loaders(id_train=DataLoader(data, batch_size=8))
    losses = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        method = build_method(_ccl_spec(tmp_path, cluster_weight=weight))
        model = method.build(10)
        state = TrainState(step=5)
        method.on_fit_start(model, loaders, state)  # warmup 0: clusters at once
        assert state.extra[ASSIGN].shape == (8,)
        loss = method.training_step(model, next(iter(loaders.id_train)), None, state)
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
    spec = load_spec(root / "jobs" / "fmnist_ccl.yaml")
    check_space(space, spec)
    assert set(space.params) == {"method.clusters", "method.temperature",
                                 "method.cluster_weight", "method.warmup_epochs"}
    assert space.scheduler.grace_period > max(space.params["method.warmup_epochs"].choices)
    assert "fashion_val_blur" in spec.data.val_ood  # the non-saturated validation sets
    wrong = space.model_copy(update={"objectives": [
        space.objectives[0].model_copy(update={"metric": "val/id_acc"})]})
    with pytest.raises(SpecError, match="'val/id_acc' is never reported by 'ccl'"):
        check_space(wrong, spec)
