"""Seeded k-means on L2-normalised embeddings (spherical k-means), and its broadcast.

Used by CCL (Chen et al., arXiv 2302.02598: pseudo-labels y_i and centres c_k = re-normalised
mean of the members, re-clustered periodically as in PCL, Li et al. ICLR 2021, salesforce/PCL
``main_pcl.py``) and by the cluster scores (centre cosine, and SSD's per-cluster Mahalanobis,
Sehwag et al. ICLR 2021, inspire-group/SSD ``eval_ssd.py``). Deterministic for a seed: k-means++
seeding
and every restart draw from one CPU generator; the computation runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


@dataclass
class KMeansResult:
    """Unit-norm centres [K, D], assignments [N] (long) and the mean cosine to the centre."""

    centres: Tensor
    assignments: Tensor
    objective: float


def _kmeanspp(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """k-means++ seeding with cosine distance 1 - x·c (x unit-norm)."""
    n = len(x)
    idx = [int(torch.randint(n, (1,), generator=g))]
    d = (1 - x @ x[idx[0]]).clamp(min=0)
    for _ in range(1, k):
        if float(d.sum()) <= 0:  # fewer distinct points than k: take any unused point
            unused = torch.ones(n, dtype=torch.bool)
            unused[idx] = False
            idx.append(int(unused.nonzero()[0]) if unused.any() else idx[-1])
        else:
            idx.append(int(torch.multinomial(d, 1, generator=g)))
        d = torch.minimum(d, (1 - x @ x[idx[-1]]).clamp(min=0))
    return x[idx].clone()


def _lloyd(x: Tensor, centres: Tensor, iters: int) -> KMeansResult:
    assign = (x @ centres.T).argmax(1)
    for _ in range(iters):
        sums = F.one_hot(assign, len(centres)).to(x.dtype).T @ x  # faster than index_add_
        counts = torch.bincount(assign, minlength=len(centres))
        empty = counts == 0
        if empty.any():  # re-seed empty clusters with the points farthest from their centre
            sim = (x * centres[assign]).sum(1)
            far = sim.argsort()[: int(empty.sum())]
            sums[empty] = x[far]
        new = F.normalize(sums, dim=1)
        new_assign = (x @ new.T).argmax(1)
        centres = new
        if torch.equal(new_assign, assign) and not empty.any():
            break
        assign = new_assign
    sim = (x * centres[assign]).sum(1)
    return KMeansResult(centres, assign, float(sim.mean()))


def kmeans(x: Tensor, k: int, *, seed: int, iters: int = 20, restarts: int = 1
           ) -> KMeansResult:
    """Spherical k-means of the rows of ``x`` (normalised here) into ``k`` clusters.

    Returns the restart with the highest mean cosine to the assigned centre (faiss ``nredo``).
    Results are float32 centres and long assignments on the CPU.
    """
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"kmeans expects a non-empty [N, D] matrix, got {list(x.shape)}")
    if not 1 <= k <= len(x):
        raise ValueError(f"kmeans: clusters (k={k}) must be in [1, {len(x)}] (the number of "
                         "points)")
    if iters < 1 or restarts < 1:
        raise ValueError(f"kmeans: iters ({iters}) and restarts ({restarts}) must be >= 1")
    x = F.normalize(x.detach().float().cpu(), dim=1)
    g = torch.Generator().manual_seed(int(seed))
    best: KMeansResult | None = None
    for _ in range(restarts):
        res = _lloyd(x, _kmeanspp(x, k, g), iters)
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
