"""Published numbers with the same ID → OOD pair as an oodlab benchmark, so a report row can
show its difference from the paper. Only numbers read from the cited table are listed; a row
without an entry here has no verified published counterpart, and the report says so."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    method: str  # oodlab method name (spec method.name)
    score: str  # the score the row reports
    benchmark: str  # oodlab benchmark (data.id, uncapped)
    ood_set: str  # oodlab test OOD set
    metric: str  # per-set metric key suffix: "auroc", "fpr95"
    value: float
    source: str  # paper and table
    note: str = ""  # where the protocols differ


PUBLISHED: tuple[Published, ...] = (
    Published("ddpm", "lmd", "fashion_mnist", "mnist", "auroc", 0.992,
              "Liu et al. 2023, Unsupervised OOD Detection with Diffusion Inpainting (LMD), "
              "Table 1, FashionMNIST → MNIST",
              "paper: full MNIST test split (10,000 images), 10 attempts × 1,000 sampling "
              "steps; oodlab: the built-in 5,000 MNIST test digits and the spec's budget"),
)


def counterparts(method: str, score: str, benchmark: str) -> list[Published]:
    """The published entries a row (method, score, benchmark) can be compared with."""
    return [p for p in PUBLISHED
            if (p.method, p.score, p.benchmark) == (method, score, benchmark)]
