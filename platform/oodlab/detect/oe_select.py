"""EDGE's OE-dataset selection measure (Sun et al., AAAI 2025; reference code
Yuchen-Sunflower/EDGE ``oe.py``): rank OE candidates by the distance between the top-k
singular values of ID features and of each candidate's features.

Per batch of B images, features [B, D] are L2-normalised row-wise (so the spectrum measures
the shape of the feature distribution, not the feature scale), their top-k singular values
are taken, and the vectors are averaged over batches. The dilation distance is
d = ||sigma_id^k - sigma_oe^k||_2 (the paper's ||Sigma_in^k - Sigma_out^k||_F for diagonal
Sigma). Unlike the reference ``oe.py`` there is no broadcasting bug: only the top k values
of each batch enter the average.

Selection: distances are normalised to [0, 1] over the candidates (0 = best in the chosen
``direction``); candidates within ``threshold`` of the best are mixed as the OE set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

if TYPE_CHECKING:
    from oodlab.spec import ExperimentSpec, OESelectSpec


def top_singular_values(features: Tensor, k: int) -> Tensor:
    """Top-k singular values of row-normalised features [B, D] (zero-padded to k)."""
    s = torch.linalg.svdvals(F.normalize(features.double(), dim=1))[:k]
    return F.pad(s, (0, k - len(s)))


@torch.no_grad()
def spectrum(model: nn.Module, ds: Dataset, k: int, batch_size: int, max_batches: int,
             seed: int) -> Tensor:
    """Mean over up to ``max_batches`` seeded batches of the top-k singular values."""
    model.eval()
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True)
    values = []
    for i, (x, _) in enumerate(loader):
        if i == max_batches:
            break
        values.append(top_singular_values(model(x)[1], k))
    if not values:
        raise ValueError(f"dataset of {len(ds)} images has no full batch of {batch_size}")
    return torch.stack(values).mean(0)


def dilation_distance(s_id: Tensor, s_oe: Tensor) -> float:
    return float(torch.linalg.vector_norm(s_id - s_oe))


@dataclass
class Candidate:
    name: str
    distance: float
    normalised: float
    selected: bool


def rank(distances: dict[str, float], direction: str, threshold: float) -> list[Candidate]:
    """Normalise distances to [0, 1] (0 = best), select those within ``threshold`` of it."""
    lo, hi = min(distances.values()), max(distances.values())
    span = hi - lo or 1.0
    rows = []
    for name, d in distances.items():
        norm = (d - lo) / span if direction == "smallest" else (hi - d) / span
        rows.append(Candidate(name, d, norm, norm <= threshold + 1e-12))
    return sorted(rows, key=lambda c: c.normalised)


def select(spec: ExperimentSpec, cfg: OESelectSpec, id_train: Dataset,
           candidates: dict[str, Dataset], model: nn.Module) -> list[Candidate]:
    """Rank the candidate OE sets for this spec's ID data."""
    if len(candidates) < 1:
        raise ValueError("data.oe must list at least one OE candidate to select from")
    args = dict(k=cfg.top_k, batch_size=cfg.batch_size, max_batches=cfg.max_batches,
                seed=spec.seed)
    s_id = spectrum(model, id_train, **args)
    distances = {n: dilation_distance(s_id, spectrum(model, ds, **args))
                 for n, ds in candidates.items()}
    return rank(distances, cfg.direction, cfg.threshold)


def as_table(rows: list[Candidate]) -> list[dict]:
    return [asdict(r) for r in rows]
