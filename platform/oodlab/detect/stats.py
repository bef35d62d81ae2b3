"""Statistics fitted in bounded memory: running moments and a seeded reservoir.

A post-hoc score that needs ID-train statistics reads them chunk by chunk, so fitting costs
O(D^2 + C*D) (moments) or O(bank * D) (reservoir) memory, whatever the size of the set:

- :class:`Moments`: per-class counts and sums plus one sum of outer products, in float64.
  The tied covariance of Lee et al. (2018) is then
  ``Sigma = (sum_i f_i f_i^T - sum_c n_c mu_c mu_c^T) / N`` and the second moment about any
  point ``u`` (ViM, Wang et al. 2022) is ``E[(f - u)(f - u)^T]``.
- :class:`Reservoir`: a uniform sample without replacement of at most ``size`` rows, kept as
  the rows with the ``size`` largest seeded random keys (Efraimidis & Spirakis 2006 with equal
  weights), so the bank of kNN (Sun et al. 2022 subsample the ImageNet bank the same way) or
  the activations ReAct takes a percentile of stay bounded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

Chunk = tuple[Tensor, Tensor, "Tensor | None"]  # (features, logits, labels)


def chunks_of(features: Tensor, logits: Tensor, labels: Tensor | None, size: int
              ) -> list[Chunk]:
    """Views of in-memory outputs as chunks of ``size`` rows (no copy)."""
    return [(features[i:i + size], logits[i:i + size],
             None if labels is None else labels[i:i + size])
            for i in range(0, len(features), size)]


def reiterable(chunks: Iterable[Chunk]) -> Iterable[Chunk]:
    """``chunks`` itself if it can be iterated again (a list, a cache's shard reader); a
    one-shot iterator is an error, since some scores read the chunks twice."""
    if isinstance(chunks, Iterator):
        raise TypeError("fit_chunks needs a re-iterable collection of chunks (a list or a "
                        "feature cache), not a one-shot iterator")
    return chunks


class Moments:
    """Running count, sums per class and sum of outer products of float64 rows."""

    def __init__(self) -> None:
        self.n = 0
        self.total = torch.empty(0, dtype=torch.float64)
        self.outer = torch.empty(0, dtype=torch.float64)
        self.class_n: dict[int, int] = {}
        self.class_sum: dict[int, Tensor] = {}

    def update(self, f: Tensor, labels: Tensor | None = None) -> None:
        f = f.double()
        if self.n == 0:
            d = f.shape[1]
            self.total = torch.zeros(d, dtype=torch.float64)
            self.outer = torch.zeros(d, d, dtype=torch.float64)
        self.n += len(f)
        self.total += f.sum(0)
        self.outer += f.T @ f
        if labels is not None:
            for c in labels.unique().tolist():
                rows = f[labels == c]
                self.class_n[c] = self.class_n.get(c, 0) + len(rows)
                self.class_sum[c] = self.class_sum.get(c, 0) + rows.sum(0)

    @property
    def mean(self) -> Tensor:
        return self.total / self.n

    def second_moment(self, about: Tensor | None = None) -> Tensor:
        """E[(f - u)(f - u)^T] about ``u`` (default the mean: the biased covariance)."""
        m = self.mean
        u = m if about is None else about.double()
        return self.outer / self.n - torch.outer(u, m) - torch.outer(m, u) + torch.outer(u, u)

    def class_means(self) -> tuple[Tensor, Tensor]:
        """(sorted class ids, their means)."""
        classes = sorted(self.class_n)
        means = torch.stack([self.class_sum[c] / self.class_n[c] for c in classes])
        return torch.tensor(classes), means

    def tied_covariance(self) -> Tensor:
        """Shared within-class covariance (Lee et al. 2018), biased (divided by N)."""
        _, means = self.class_means()
        counts = torch.tensor([self.class_n[c] for c in sorted(self.class_n)],
                              dtype=torch.float64)
        between = (means.T * counts) @ means
        return (self.outer - between) / self.n


class Reservoir:
    """At most ``size`` rows, a seeded uniform sample without replacement of all rows seen."""

    def __init__(self, size: int | None, seed: int = 0) -> None:
        if size is not None and size < 1:
            raise ValueError(f"bank size must be >= 1 or None (all rows), got {size}")
        self.size = size
        self.gen = torch.Generator().manual_seed(int(seed))
        self.rows = torch.empty(0)
        self.keys = torch.empty(0)
        self.seen = 0

    def update(self, rows: Tensor) -> None:
        self.seen += len(rows)
        keys = torch.rand(len(rows), generator=self.gen)
        if self.rows.numel() == 0:
            self.rows, self.keys = rows[:0].clone(), keys[:0]
        rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if self.size is not None and len(rows) > self.size:
            top = keys.topk(self.size).indices.sort().values
            rows, keys = rows[top], keys[top]
        self.rows, self.keys = rows.clone(), keys
