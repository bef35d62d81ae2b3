"""Unsupervised contrastive methods: ``simclr`` (the baseline) and ``ccl``.

CCL, "Cluster-aware Contrastive Learning for Unsupervised OOD Detection" (Chen, Gui, Fan;
arXiv 2302.02598). No code was released and the paper's body could not be consulted; its
abstract says the loss treats "both the cluster centers and the samples belonging to the
same cluster as positive samples". This is a *reconstruction* from that sentence, built from
SimCLR (NT-Xent; Chen et al., ICML 2020), SupCon (multi-positive loss with a positive mask;
Khosla et al., NeurIPS 2020, as in inspire-group/SSD ``losses.SupConLoss``) and PCL
(prototype logits, warm-up, periodic k-means; Li et al., ICLR 2021, salesforce/PCL
``pcl/builder.py``). Every choice it makes is a field of :class:`CCLParams`.

* Views: two augmentations of each image, made on the training device
  (``oodlab.methods.ops.augment``), seeded by (seed, rank, step).
* One global batch: on W workers every worker embeds its own ``data.batch_size`` images, the
  projections (and, for ``ccl``, the cluster ids) are all-gathered, and every worker computes
  the loss over the whole batch (SimCLR's cross-replica negatives; alinlab/CSI gathers the
  same way). The effective batch is B = ``data.batch_size`` x W, with 2B-1 candidates per
  anchor, so the loss does not depend on how the batch is split. The gather keeps the
  gradient of the local rows; each worker's backward sums the W identical copies of the loss
  (W x the gradient of its rows) and DDP averages over workers, which gives exactly the
  gradient of the one global loss. BatchNorm statistics stay per worker (SimCLR's global BN
  needs ``SyncBatchNorm``, which PyTorch runs on GPUs only).
* Model: the backbone of ``spec.model`` (its classifier removed) + an MLP projection head.
  ``forward`` returns ``(projection, backbone features)``: the projection takes the place of
  the logits, so the platform's evaluation and the served
  :class:`~oodlab.detect.detector.Detector` work unchanged; post-hoc scores (``knn``,
  ``cluster_cosine``, ``cluster_mahalanobis``) use the backbone features by default (SSD and
  CSI score the penultimate layer).
* ``simclr`` loss (NT-Xent as in alinlab/CSI ``training/contrastive_loss.NT_xent``): for the
  2B views z (unit norm) with anchor i and its other view i⁺,
  ℓ_i = -log exp(z_i·z_i⁺/τ) / Σ_{a≠i} exp(z_i·z_a/τ); L = mean_i ℓ_i.
* ``ccl`` loss (the reconstruction above): L = L_NT-Xent + λ · L_cluster with
  ℓ_i = -(1/|P(i)|) Σ_{p∈P(i)} log exp(z_i·v_p/τ) / Σ_{a∈A(i)} exp(z_i·v_a/τ),
  P(i) = {i⁺} ∪ {j ≠ i : y_j = y_i} ∪ {c_{y_i}}, A(i) = the 2B-1 other views ∪ {c_1..c_K}.
  y and c come from spherical k-means (as in PCL) of the ID training set's embeddings,
  run on rank 0 after ``warmup_epochs`` and then every ``recluster_every`` epochs, and
  broadcast to every worker; centres are detached (no gradient into k-means), and a cluster
  k-means left empty is dropped (K can shrink; no zero centre enters the denominator). A
  sample's cluster is looked up by its dataset index, which the method reads from the
  training loader's sampler. Before the first clustering the loss is NT-Xent only (PCL's
  warm-up).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from oodlab.detect.clustering import broadcast_from_rank0, kmeans
from oodlab.methods.base import EpochMeans, Loaders, Method, MethodParams, TrainState
from oodlab.methods.ops.augment import AugmentParams, augment, step_generator
from oodlab.registry import METHODS

if TYPE_CHECKING:
    from oodlab.spec import ExperimentSpec

CENTRES, ASSIGN, CLUSTERED_AT, PURITY = "ccl/centres", "ccl/assignments", "ccl/epoch", "ccl/purity"


# ---------------------------------------------------------------------------- the global batch


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each worker the summed gradient of its own rows (the
    ``GatherLayer`` of SimCLR/CSI ports; torch.distributed.nn.functional.all_gather does the
    same and is deprecated)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # SUM: every worker's loss touched these rows
        start = dist.get_rank() * ctx.rows
        return grad[start: start + ctx.rows]


def gather_batch(x: Tensor) -> Tensor:
    """Concatenate ``x`` [B, ...] over all workers in rank order -> [W·B, ...]; floating
    tensors keep the gradient of the local rows. Identity on one process. Every worker must
    pass the same B (the training loader drops the last partial batch)."""
    if _world() == 1:
        return x
    if x.is_floating_point() and x.requires_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ---------------------------------------------------------------------------- losses


def contrastive_loss(z: Tensor, positives: Tensor, temperature: float,
                     centres: Tensor | None = None, centre_positives: Tensor | None = None
                     ) -> Tensor:
    """Multi-positive InfoNCE (SupCon form, Khosla et al. 2020), optionally with centre logits.

    ``z`` [M, D] unit-norm embeddings; ``positives`` [M, M] bool (the diagonal is ignored);
    ``centres`` [K, D] unit-norm, ``centre_positives`` [M, K] bool. The denominator runs
    over all other rows of ``z`` and every centre; each anchor's loss is averaged over its
    positives, and the loss over the anchors.
    """
    m = len(z)
    eye = torch.eye(m, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    pos = positives & ~eye
    if centres is not None:
        if centre_positives is None:
            raise ValueError("centre logits need a centre_positives mask")
        logits = torch.cat([logits, z @ centres.T / temperature], 1)
        pos = torch.cat([pos, centre_positives], 1)
    if not bool(pos.any(1).all()):
        raise ValueError("every anchor needs at least one positive")
    log_prob = (logits - logits.logsumexp(1, keepdim=True)).masked_fill(~pos, 0.0)
    return (-log_prob.sum(1) / pos.sum(1)).mean()


def view_pairs(batch: int, device: torch.device | str = "cpu") -> Tensor:
    """[2B, 2B] mask of (i, i⁺): row i < B pairs with i + B and vice versa."""
    idx = torch.arange(2 * batch, device=device)
    return idx[:, None] == (idx[None, :] + batch) % (2 * batch)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent over two views [B, D] (normalised here), mean over the 2B anchors."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    return contrastive_loss(z, view_pairs(len(z1), z.device), temperature)


def cluster_positives(y: Tensor) -> Tensor:
    """[2B, 2B] positives of the cluster term for the views of B samples with clusters ``y``:
    every other view whose sample is in the same cluster (this includes the anchor's own
    other view, i⁺)."""
    yy = torch.cat([y, y])
    eye = torch.eye(len(yy), dtype=torch.bool, device=y.device)
    return (yy[:, None] == yy[None, :]) & ~eye


def cluster_loss(z1: Tensor, z2: Tensor, y: Tensor, centres: Tensor, temperature: float,
                 *, sample_positives: bool = True, centre_positive: bool = True) -> Tensor:
    """CCL's cluster term (as reconstructed above): positives = i⁺, the same-cluster views (switch
    ``sample_positives``) and the own centre (switch ``centre_positive``); the denominator
    holds the 2B-1 other views and all K centres."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    pos = cluster_positives(y) if sample_positives else view_pairs(len(y), z.device)
    yy = torch.cat([y, y])
    c_pos = F.one_hot(yy, len(centres)).bool() & centre_positive
    return contrastive_loss(z, pos, temperature, F.normalize(centres.to(z), dim=1), c_pos)


# ---------------------------------------------------------------------------- model


class ProjectionNet(nn.Module):
    """Backbone (classifier removed) + MLP head; ``forward(x) -> (projection, features)``."""

    def __init__(self, backbone: nn.Module, hidden: int | None, out_dim: int) -> None:
        super().__init__()
        if not isinstance(getattr(backbone, "fc", None), nn.Linear):
            raise ValueError(f"{type(backbone).__name__} has no linear classifier `fc` to "
                             "replace by a projection head")
        dim = backbone.fc.in_features
        backbone.fc = nn.Identity()  # unused parameters would break DDP
        self.backbone = backbone
        hidden = hidden or dim
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, out_dim))
        self.feature_dim, self.proj_dim = dim, out_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.backbone(x)[1]
        return self.head(feats), feats


# ---------------------------------------------------------------------------- methods


class SimCLRParams(MethodParams):
    """SimCLR: two views, NT-Xent, projection head (τ = 0.5 as in SSD and CSI)."""

    name: Literal["simclr"] = "simclr"
    temperature: float = Field(0.5, gt=0, le=10, description="τ of NT-Xent (SSD/CSI: 0.5)")
    proj_dim: int = Field(128, ge=2, le=4096, description="projection output size (SimCLR: "
                          "128)")
    proj_hidden: int | None = Field(None, ge=2, le=8192, description="hidden width of the "
                                    "2-layer MLP head (null = the backbone's feature size)")
    augment: AugmentParams = Field(default_factory=AugmentParams,
                                   description="the two-view augmentation")


class CCLParams(SimCLRParams):
    """CCL = SimCLR + the cluster term, re-clustered as in PCL; cluster_weight 0 = SimCLR."""

    name: Literal["ccl"] = "ccl"  # type: ignore[assignment]
    clusters: int = Field(10, ge=2, le=10_000, description="K of k-means (try 10-100)")
    cluster_weight: float = Field(1.0, ge=0, description="λ of the cluster term")
    warmup_epochs: int = Field(2, ge=0, description="epochs of plain NT-Xent before the first "
                               "clustering (PCL: 10% of training)")
    recluster_every: int = Field(1, ge=1, description="re-run k-means every n epochs after "
                                 "the warm-up (PCL: 1)")
    kmeans_iters: int = Field(20, ge=1, le=1000, description="Lloyd iterations (PCL: 20)")
    kmeans_restarts: int = Field(3, ge=1, le=20, description="k-means restarts, best kept "
                                 "(PCL nredo: 5)")
    cluster_features: Literal["projection", "backbone"] = Field(
        "projection", description="embeddings k-means runs on; the loss's centres are always "
        "the re-normalised mean projections of each cluster's members")
    sample_positives: bool = Field(True, description="same-cluster in-batch views are "
                                   "positives (off = ablation: centre positive only)")
    centre_positive: bool = Field(True, description="the own cluster centre is a positive "
                                  "(off = ablation: same-cluster samples only)")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class IndexTap:
    """Wraps a training loader's sampler and remembers the dataset indices it yields, in
    order, so a training step can take the indices of its batch (the loader itself yields
    only ``(image, label)``). Each new epoch (a new pass over the sampler) starts afresh, so
    the tail that ``drop_last`` discards is forgotten."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.queue: deque[int] = deque()

    def __iter__(self) -> Iterator[int]:
        self.queue.clear()
        for i in self.sampler:
            self.queue.append(int(i))
            yield i

    def __len__(self) -> int:
        return len(self.sampler)

    def take(self, n: int) -> Tensor:
        if len(self.queue) < n:
            raise RuntimeError(f"ccl: the batch has {n} images but the sampler yielded only "
                               f"{len(self.queue)} indices not yet used (the batch does not "
                               "come from the training loader given to on_fit_start)")
        return torch.tensor([self.queue.popleft() for _ in range(n)], dtype=torch.long)

    @classmethod
    def install(cls, loader: DataLoader) -> IndexTap:
        """Tap ``loader``'s sampler (once; a second call returns the same tap)."""
        batches = loader.batch_sampler
        if batches is None or not hasattr(batches, "sampler"):
            raise ValueError("ccl needs a training loader with a batch sampler (batch_size set)")
        if not isinstance(batches.sampler, cls):
            batches.sampler = cls(batches.sampler)
        return batches.sampler


def dataset_labels(dataset: Dataset) -> Tensor:
    """The hidden labels of every item (``.labels`` when the dataset has them); used only to
    check that a batch is the one the tapped indices name, and for cluster purity."""
    labels = getattr(dataset, "labels", None)
    if labels is not None and len(labels) == len(dataset):
        return torch.as_tensor(labels, dtype=torch.long)
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))]).long()


@METHODS.register
class SimCLR(Method):
    """``simclr``: NT-Xent on two augmented views; labels are never used."""

    name = "simclr"
    Params = SimCLRParams
    kind = "unsupervised"

    def build(self, num_classes: int) -> nn.Module:
        from oodlab.models import build_model

        backbone = build_model(self.spec.model, num_classes=1,
                               in_channels=self.spec.data.channels)
        return ProjectionNet(backbone, self.params.proj_hidden, self.params.proj_dim)

    def views(self, x: Tensor, state: TrainState) -> tuple[Tensor, Tensor]:
        """Two augmented views of the batch, seeded by (seed, rank, step)."""
        g = step_generator(x.device, self.spec.seed, state.rank, state.step)
        return augment(x, self.params.augment, g), augment(x, self.params.augment, g)

    def embed_views(self, model: nn.Module, x: Tensor, state: TrainState
                    ) -> tuple[Tensor, Tensor]:
        v1, v2 = self.views(x, state)
        z = model(torch.cat([v1, v2]))[0].float()
        return z[: len(x)], z[len(x):]

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      oe_batch: tuple[Tensor, Tensor] | None, state: TrainState) -> Tensor:
        """NT-Xent over the global batch (the views of every worker; see the module doc)."""
        z1, z2 = self.embed_views(model, batch[0], state)
        return nt_xent(gather_batch(z1), gather_batch(z2), self.params.temperature)


@METHODS.register
class CCL(SimCLR):
    """``ccl``: SimCLR + λ · cluster-aware term with k-means pseudo-labels (see module doc)."""

    name = "ccl"
    Params = CCLParams

    def __init__(self, spec: ExperimentSpec) -> None:
        super().__init__(spec)
        p = self.params
        if p.warmup_epochs >= spec.train.epochs and p.cluster_weight > 0:
            raise ValueError(f"method.warmup_epochs ({p.warmup_epochs}) must be below "
                             f"train.epochs ({spec.train.epochs}), or the cluster term never "
                             "runs")
        self._tap: IndexTap | None = None
        self._labels = torch.empty(0, dtype=torch.long)
        self._means = EpochMeans()

    def on_fit_start(self, model: nn.Module, loaders: Loaders, state: TrainState) -> None:
        """Tap the training loader's sampler (each batch's dataset indices give its clusters);
        cluster at once when there is no warm-up. A restart keeps the stored clusters."""
        dataset = loaders.id_train.dataset
        self._tap = IndexTap.install(loaders.id_train)
        self._labels = dataset_labels(dataset)
        if self.params.warmup_epochs == 0 and CENTRES not in state.extra:
            self.recluster(model, dataset, state)

    def due(self, epoch: int) -> bool:
        """Cluster after epoch ``epoch`` (0-based)? After the warm-up, every n epochs."""
        done = epoch + 1 - self.params.warmup_epochs
        return done >= 0 and done % self.params.recluster_every == 0

    def on_epoch_end(self, model: nn.Module, loaders: Loaders, state: TrainState) -> None:
        if self.due(state.epoch) and state.epoch + 1 < self.spec.train.epochs:
            self.recluster(model, loaders.id_train.dataset, state)

    @torch.no_grad()
    def recluster(self, model: nn.Module, dataset: Dataset, state: TrainState) -> None:
        """k-means of the whole ID training set on rank 0, broadcast to every worker; stores
        centres [K, proj_dim], assignments [N] and the purity in ``state.extra``."""
        from oodlab.data.bundle import eval_loader
        from oodlab.detect.outputs import collect_outputs

        p, n = self.params, len(dataset)
        if p.clusters > n:
            raise ValueError(f"method.clusters ({p.clusters}) exceeds the {n} ID training "
                             "images")
        net = _unwrap(model)
        centres = torch.zeros(p.clusters, net.proj_dim)
        assign = torch.zeros(n, dtype=torch.long)
        meta = torch.zeros(2)  # purity, clusters kept
        if state.rank == 0:
            out = collect_outputs(net, eval_loader(dataset, self.spec.data.eval_batch_size),
                                  state.device)
            z = F.normalize(out.logits, dim=1)
            space = z if p.cluster_features == "projection" else out.features
            res = kmeans(space, p.clusters, seed=self.spec.seed * 1_000 + state.epoch,
                         iters=p.kmeans_iters, restarts=p.kmeans_restarts)
            assign, kept = res.assignments, len(res.centres)  # empty clusters are dropped
            centres[:kept] = F.normalize(torch.zeros(kept, z.shape[1]).index_add_(0, assign, z),
                                         dim=1)
            meta[0], meta[1] = cluster_purity(assign, out.labels), kept
        centres, assign, meta = broadcast_from_rank0([centres, assign, meta], state.device)
        state.extra.update({CENTRES: centres[: int(meta[1])], ASSIGN: assign,
                            CLUSTERED_AT: state.epoch, PURITY: float(meta[0])})

    def batch_indices(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The dataset indices of this batch's images, from the tapped sampler; the batch's
        labels must match theirs (a cheap check that loader and tap are in step)."""
        if self._tap is None:
            raise RuntimeError("ccl: training_step before on_fit_start")
        idx = self._tap.take(len(batch[0]))
        if not torch.equal(self._labels[idx], batch[1].detach().cpu().long()):
            raise RuntimeError("ccl: the batch is not the one the training sampler yielded "
                               "(the loader must yield its dataset's items in sampler order)")
        return idx

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      oe_batch: tuple[Tensor, Tensor] | None, state: TrainState) -> Tensor:
        """NT-Xent + λ · cluster term, both over the global batch (see the module doc)."""
        p, x = self.params, batch[0]
        idx = self.batch_indices(batch)
        z1, z2 = self.embed_views(model, x, state)
        z1, z2 = gather_batch(z1), gather_batch(z2)
        loss = nt_xent(z1, z2, p.temperature)
        active = CENTRES in state.extra and p.cluster_weight > 0
        self._means.add(active=float(active))
        if active:
            y = gather_batch(state.extra[ASSIGN][idx].to(x.device))
            loss = loss + p.cluster_weight * cluster_loss(
                z1, z2, y, state.extra[CENTRES].detach(), p.temperature,
                sample_positives=p.sample_positives, centre_positive=p.centre_positive)
        return loss

    @classmethod
    def reported_metrics(cls, spec) -> set[str]:
        return super().reported_metrics(spec) | {"ccl/active", "ccl/purity",
                                                 "ccl/nonempty_clusters"}

    def epoch_metrics(self, model: nn.Module, state: TrainState) -> dict[str, float]:
        """``ccl/active``: fraction of this epoch's steps with the cluster term; then the
        current clusters in use and their purity vs the hidden labels (a diagnostic only)."""
        out = {"ccl/active": self._means.pop(("active",))["active"]}
        if CENTRES in state.extra:
            out |= {"ccl/purity": float(state.extra[PURITY]),
                    "ccl/nonempty_clusters": float(state.extra[ASSIGN].unique().numel())}
        return out


def cluster_purity(assign: Tensor, labels: Tensor) -> float:
    """Fraction of samples whose cluster's majority hidden label is their own (nan without
    single labels)."""
    if labels.ndim != 1 or bool((labels < 0).any()):
        return float("nan")
    hits = sum(int(torch.bincount(labels[assign == k]).max())
               for k in assign.unique().tolist())
    return hits / len(assign)
