"""Seeded k-means, spherical (cosine) or Euclidean, and its broadcast.

Used by CCL (Chen et al., arXiv 2302.02598: pseudo-labels y_i and centres c_k = re-normalised
mean of the members, re-clustered periodically as in PCL, Li et al. ICLR 2021, salesforce/PCL
``main_pcl.py``, which runs spherical k-means), by the centre-cosine score (spherical) and by
SSD's per-cluster Mahalanobis score (Sehwag et al. ICLR 2021, inspire-group/SSD
``eval_ssd.py``: ``faiss.Kmeans`` with its default Euclidean metric on the normalised,
standardised features). Deterministic for a seed: k-means++ seeding and every restart draw
from one CPU generator; the computation runs on the CPU.

No cluster is left empty: during Lloyd's iterations an empty cluster is re-seeded with the
point farthest from its centre, and a cluster still empty at the end (fewer distinct points
than k, e.g. duplicated points) is dropped, so ``len(centres)`` may be below ``k`` and every
id in ``assignments`` has members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

Metric = Literal["cosine", "euclidean"]


@dataclass
class KMeansResult:
    """Centres [K', D] (unit-norm for ``cosine``) of the K' <= k non-empty clusters,
    assignments [N] (long, in 0..K'-1) and the objective (higher is better): the mean cosine
    to the own centre (``cosine``) or minus the mean squared distance (``euclidean``)."""

    centres: Tensor
    assignments: Tensor
    objective: float


def _closeness(x: Tensor, centres: Tensor, metric: Metric) -> Tensor:
    """[N, K], higher = closer: cosine, or minus the squared distance."""
    if metric == "cosine":
        return x @ centres.T
    return -torch.cdist(x, centres).square()


def _kmeanspp(x: Tensor, k: int, g: torch.Generator, metric: Metric) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) with the distance of ``metric``
    (1 - cosine, or the squared Euclidean distance)."""
    n = len(x)
    top = 1.0 if metric == "cosine" else 0.0

    def dist_to(i: int) -> Tensor:
        return (top - _closeness(x, x[i: i + 1], metric)[:, 0]).clamp(min=0)

    idx = [int(torch.randint(n, (1,), generator=g))]
    d = dist_to(idx[0])
    for _ in range(1, k):
        if float(d.sum()) <= 0:  # fewer distinct points than k: take any unused point
            unused = torch.ones(n, dtype=torch.bool)
            unused[idx] = False
            idx.append(int(unused.nonzero()[0]) if unused.any() else idx[-1])
        else:
            idx.append(int(torch.multinomial(d, 1, generator=g)))
        d = torch.minimum(d, dist_to(idx[-1]))
    return x[idx].clone()


def _update(x: Tensor, assign: Tensor, k: int, metric: Metric) -> tuple[Tensor, Tensor]:
    """Member sums turned into centres (mean, or re-normalised mean), and the counts."""
    sums = F.one_hot(assign, k).to(x.dtype).T @ x  # faster than index_add_
    counts = torch.bincount(assign, minlength=k)
    if metric == "cosine":
        return F.normalize(sums, dim=1), counts
    return sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype), counts


def _lloyd(x: Tensor, centres: Tensor, iters: int, metric: Metric) -> KMeansResult:
    k = len(centres)
    assign = _closeness(x, centres, metric).argmax(1)
    for _ in range(iters):
        new, counts = _update(x, assign, k, metric)
        empty = counts == 0
        if empty.any():  # re-seed empty clusters with the points farthest from their centre
            own = _closeness(x, centres, metric).gather(1, assign[:, None])[:, 0]
            new[empty] = x[own.argsort()[: int(empty.sum())]]
        centres = new
        new_assign = _closeness(x, centres, metric).argmax(1)
        if torch.equal(new_assign, assign) and not empty.any():
            break
        assign = new_assign
    centres, counts = _update(x, assign, k, metric)
    keep = counts > 0  # still empty (duplicated points): drop, renumber the rest
    if not bool(keep.all()):
        assign = (keep.cumsum(0) - 1)[assign]
        centres = centres[keep]
    own = _closeness(x, centres, metric).gather(1, assign[:, None])[:, 0]
    return KMeansResult(centres, assign, float(own.mean()))


def kmeans(x: Tensor, k: int, *, seed: int, iters: int = 20, restarts: int = 1,
           metric: Metric = "cosine") -> KMeansResult:
    """k-means of the rows of ``x`` into at most ``k`` non-empty clusters.

    ``cosine``: spherical k-means, rows and centres L2-normalised (PCL); ``euclidean``: plain
    Lloyd on the rows as given (faiss ``Kmeans`` default, as SSD). Returns the restart with
    the best objective (faiss ``nredo``); float32 centres and long assignments on the CPU.
    """
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"kmeans expects a non-empty [N, D] matrix, got {list(x.shape)}")
    if not 1 <= k <= len(x):
        raise ValueError(f"kmeans: clusters (k={k}) must be in [1, {len(x)}] (the number of "
                         "points)")
    if iters < 1 or restarts < 1:
        raise ValueError(f"kmeans: iters ({iters}) and restarts ({restarts}) must be >= 1")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"kmeans: metric must be 'cosine' or 'euclidean', got {metric!r}")
    x = x.detach().float().cpu()
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    g = torch.Generator().manual_seed(int(seed))
    best: KMeansResult | None = None
    for _ in range(restarts):
        res = _lloyd(x, _kmeanspp(x, k, g, metric), iters, metric)
        if best is None or res.objective > best.objective:
            best = res
    assert best is not None
    return KMeansResult(best.centres.float(), best.assignments.long(), best.objective)


def broadcast_from_rank0(tensors: list[Tensor], device: torch.device | str) -> list[Tensor]:
    """Send rank 0's tensors to every worker (a no-op without torch.distributed).

    Every rank must pass tensors of the same shapes and dtypes; non-zero ranks' values are
    overwritten. Gloo and NCCL both work (tensors are moved to ``device`` for the call).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    out = []
    for t in tensors:
        buf = t.to(device).contiguous()
        dist.broadcast(buf, src=0)
        out.append(buf.to(t.device))
    return out
