"""Post-hoc OOD scores on a trained model's logits and features. Higher = more ID.

Logit scores are plain functions; scores with fitted state (kNN bank, Mahalanobis means)
are small classes with one API, :class:`PostHocScore`, whose state is tensors only so a
detector can be saved with ``torch.save`` and loaded with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def msp(logits: Tensor) -> Tensor:
    """Maximum softmax probability, Hendrycks & Gimpel 2017 (one softmax, not two)."""
    return logits.softmax(1).max(1).values


def max_logit(logits: Tensor) -> Tensor:
    """Maximum logit, Hendrycks et al. 2022."""
    return logits.max(1).values


def energy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy T * logsumexp(f / T), Liu et al. 2020, Eq. 7."""
    return temperature * torch.logsumexp(logits / temperature, 1)


def joint_energy(logits: Tensor) -> Tensor:
    """JointEnergy sum_c softplus(f_c), Wang et al. 2021 (multi-label)."""
    return F.softplus(logits).sum(1)


def max_sigmoid(logits: Tensor) -> Tensor:
    """Largest per-label probability of a multi-label model."""
    return logits.sigmoid().max(1).values


class PostHocScore:
    """One score: optional ``fit`` on ID-train outputs, then ``score`` on logits/features."""

    name: ClassVar[str]
    needs_fit: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False

    def fit(self, features: Tensor, logits: Tensor, labels: Tensor | None) -> None:
        """Fit state on ID training outputs (no-op for unfitted scores)."""

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score_model(self, model: nn.Module, x: Tensor) -> Tensor:
        """Run the model (eval mode) on a batch of [0, 1] images and score it."""
        model.eval()
        logits, features = model(x)
        return self.score(logits.float(), features.float())

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore fitted state (no-op for unfitted scores)."""

    def config(self) -> dict[str, Any]:
        return {}


class _LogitScore(PostHocScore):
    fn: ClassVar[Any]

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        return type(self).fn(logits)


class MSP(_LogitScore):
    name, fn = "msp", staticmethod(msp)


class MaxLogit(_LogitScore):
    name, fn = "max_logit", staticmethod(max_logit)


class JointEnergy(_LogitScore):
    name, fn = "joint_energy", staticmethod(joint_energy)


class MaxSigmoid(_LogitScore):
    name, fn = "max_sigmoid", staticmethod(max_sigmoid)


class Energy(PostHocScore):
    """Energy score with temperature T (default 1)."""

    name = "energy"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = float(temperature)

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        return energy(logits, self.temperature)

    def config(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


class ODIN(PostHocScore):
    """ODIN, Liang et al. 2018: temperature scaling + input perturbation (Eq. 2).

    x~ = x - eps * sign(-grad_x log max softmax(f(x)/T)); score = max softmax(f(x~)/T).
    oodlab models normalise inside the model, so the perturbation is in [0, 1] pixel space
    (as in the Unleashing-Mask code; the original ODIN divides by the data std).
    """

    name = "odin"
    needs_model = True

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014) -> None:
        self.temperature, self.epsilon = float(temperature), float(epsilon)

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        return msp(logits / self.temperature)

    def score_model(self, model: nn.Module, x: Tensor) -> Tensor:
        model.eval()
        if self.epsilon == 0:
            return super().score_model(model, x)
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)[0].float() / self.temperature
            loss = -torch.log_softmax(logits, 1).max(1).values.sum()
            (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x_tilde = x - self.epsilon * grad.sign()
            return msp(model(x_tilde)[0].float() / self.temperature)

    def config(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "epsilon": self.epsilon}


class KNN(PostHocScore):
    """Deep nearest neighbours, Sun et al. 2022: -(distance to the k-th nearest normalised
    ID-train feature). A query that is itself in the bank is not excluded."""

    name = "knn"
    needs_fit = True

    def __init__(self, k: int = 50, chunk: int = 1024) -> None:
        self.k, self.chunk = int(k), int(chunk)
        self.bank = torch.empty(0)

    def fit(self, features: Tensor, logits: Tensor, labels: Tensor | None) -> None:
        self.bank = F.normalize(features.float(), dim=1)

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        if self.bank.numel() == 0:
            raise RuntimeError("knn score used before fit()")
        bank = self.bank.to(features.device)
        k = min(self.k, len(bank))
        q = F.normalize(features.float(), dim=1)
        out = [torch.cdist(q[i:i + self.chunk], bank).topk(k, largest=False).values[:, -1]
               for i in range(0, len(q), self.chunk)]
        return -torch.cat(out)

    def state_dict(self) -> dict[str, Tensor]:
        return {"bank": self.bank}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.bank = state["bank"]

    def config(self) -> dict[str, Any]:
        return {"k": self.k}


class Mahalanobis(PostHocScore):
    """Lee et al. 2018 (Eq. 2, penultimate layer, no input noise): class means and one tied
    covariance from ID train; score = -min_c (f - mu_c)^T Sigma^+ (f - mu_c)."""

    name = "mahalanobis"
    needs_fit = True

    def __init__(self) -> None:
        self.means = torch.empty(0)
        self.precision = torch.empty(0)

    def fit(self, features: Tensor, logits: Tensor, labels: Tensor | None) -> None:
        if labels is None:
            raise ValueError("mahalanobis needs class labels of the ID training set")
        f = features.double()
        classes = labels.unique(sorted=True)
        means = torch.stack([f[labels == c].mean(0) for c in classes])
        centred = f - means[torch.searchsorted(classes, labels)]
        cov = centred.T @ centred / len(f)
        self.means = means.float()
        self.precision = torch.linalg.pinv(cov, hermitian=True).float()

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        if self.means.numel() == 0:
            raise RuntimeError("mahalanobis score used before fit()")
        means, prec = self.means.to(features.device), self.precision.to(features.device)
        d = features.float()[:, None, :] - means[None]  # [N, C, D]
        dist = torch.einsum("ncd,de,nce->nc", d, prec, d)
        return -dist.min(1).values

    def state_dict(self) -> dict[str, Tensor]:
        return {"means": self.means, "precision": self.precision}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.means, self.precision = state["means"], state["precision"]


class _DiffusionScore(PostHocScore):
    """Reconstruction scores of a diffusion model (``oodlab.diffusion``): median over
    ``attempts`` of the similarity of image and reconstruction (higher = more ID).

    Brief A.1/A.5; ``steps`` strided sampler steps (1000 with ``eta=1`` = the paper's
    sampler), ``workers > 1`` spreads a set's batches over Ray tasks.
    """

    needs_model = True
    masked: ClassVar[bool]

    def __init__(self, steps: int = 1000, attempts: int = 10, block_size: int = 4,
                 eta: float = 1.0, noise_level: float = 0.5, distance: str = "mse",
                 lpips_weights: dict[str, str] | None = None, seed: int = 0,
                 workers: int = 1) -> None:
        from oodlab.diffusion.distances import check_distance

        for key, value, low in (("steps", steps, 1), ("attempts", attempts, 1),
                                ("block_size", block_size, 1), ("workers", workers, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{self.name}.{key} must be an integer >= {low}, got {value!r}")
        if not 0 <= eta <= 1:
            raise ValueError(f"{self.name}.eta must be in [0, 1], got {eta!r}")
        if not 0 < noise_level <= 1:
            raise ValueError(f"{self.name}.noise_level must be in (0, 1], got {noise_level!r}")
        check_distance(distance, lpips_weights)
        self.steps, self.attempts, self.block_size = int(steps), int(attempts), int(block_size)
        self.eta, self.noise_level, self.distance = float(eta), float(noise_level), distance
        self.seed, self.workers = int(seed), int(workers)
        self.lpips_weights = dict(lpips_weights) if lpips_weights else None

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        raise TypeError(f"{self.name} scores images with the diffusion model, not logits")

    def score_batch(self, model: nn.Module, x: Tensor, batch: int = 0) -> Tensor:
        """Scores of one batch of [0, 1] images; its noise is seeded with ``seed + batch``."""
        from oodlab.diffusion.scoring import score_batch

        return score_batch(model, x, masked=self.masked, steps=self.steps,
                           attempts=self.attempts, block_size=self.block_size, eta=self.eta,
                           noise_level=self.noise_level, distance=self.distance,
                           lpips_weights=self.lpips_weights, seed=self.seed + batch)

    def score_model(self, model: nn.Module, x: Tensor) -> Tensor:
        return self.score_batch(model, x)

    def score_loader(self, model: nn.Module, loader, device: torch.device | str) -> Tensor:
        """A whole set, in parallel over Ray when ``workers > 1`` (progress printed)."""
        from oodlab.diffusion.scoring import score_set

        return score_set(self, model, loader, device, self.workers)

    def network_calls(self, num_timesteps: int) -> int:
        """U-Net evaluations per image."""
        from oodlab.diffusion.sampler import network_calls

        t_start = num_timesteps - 1 if self.masked else round(
            self.noise_level * (num_timesteps - 1))
        return self.attempts * network_calls(t_start, self.steps)

    def config(self) -> dict[str, Any]:
        return {"steps": self.steps, "attempts": self.attempts, "block_size": self.block_size,
                "eta": self.eta, "noise_level": self.noise_level, "distance": self.distance,
                "lpips_weights": self.lpips_weights, "seed": self.seed, "workers": self.workers}


class LMD(_DiffusionScore):
    """Lift, Map, Detect (Liu et al. 2023): inpaint alternating checkerboards of
    ``block_size`` px from pure noise, keep the rest by replacement (brief A.3-A.4)."""

    name, masked = "lmd", True


class DiffusionRecon(_DiffusionScore):
    """Baseline: noise the whole image to ``noise_level``·T and denoise it, no mask."""

    name, masked = "diffusion_recon", False


class _ClusterScore(PostHocScore):
    """Base of the k-means scores of CCL (brief B.5): seeded spherical k-means
    (``oodlab.clustering``) on ID-train features; ``space`` picks the backbone ``features``
    or the model's first output (``projection`` for contrastive models)."""

    needs_fit = True

    def __init__(self, clusters: int = 10, seed: int = 0, iters: int = 50, restarts: int = 3,
                 space: str = "features") -> None:
        if space not in ("features", "projection"):
            raise ValueError(f"{self.name}.space must be 'features' or 'projection', "
                             f"got {space!r}")
        for key, value in (("clusters", clusters), ("iters", iters), ("restarts", restarts)):
            if int(value) != value or value < 1:
                raise ValueError(f"{self.name}.{key} must be an integer >= 1, got {value!r}")
        self.clusters, self.seed, self.iters = int(clusters), int(seed), int(iters)
        self.restarts, self.space = int(restarts), space

    def pick(self, logits: Tensor, features: Tensor) -> Tensor:
        return (features if self.space == "features" else logits).float()

    def config(self) -> dict[str, Any]:
        return {"clusters": self.clusters, "seed": self.seed, "iters": self.iters,
                "restarts": self.restarts, "space": self.space}


class ClusterCosine(_ClusterScore):
    """Cosine to the nearest k-means centre: max_k cos(f(x), c_k) (brief B.5 item 3)."""

    name = "cluster_cosine"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.centres = torch.empty(0)

    def fit(self, features: Tensor, logits: Tensor, labels: Tensor | None) -> None:
        from oodlab.clustering import kmeans

        self.centres = kmeans(self.pick(logits, features), self.clusters, seed=self.seed,
                              iters=self.iters, restarts=self.restarts).centres

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        if self.centres.numel() == 0:
            raise RuntimeError("cluster_cosine score used before fit()")
        f = F.normalize(self.pick(logits, features), dim=1)
        return (f @ self.centres.to(f.device).T).max(1).values

    def state_dict(self) -> dict[str, Tensor]:
        return {"centres": self.centres}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.centres = state["centres"]


class ClusterMahalanobis(_ClusterScore):
    """SSD (Sehwag et al. 2021, brief B.5 item 2): L2-normalise, standardise with the train
    mean/std, k-means, then per cluster its mean and biased covariance (pseudo-inverse);
    score = -min_k (f - mu_k)^T Sigma_k^+ (f - mu_k). ``clusters=1`` is SSD's default."""

    name = "cluster_mahalanobis"

    def __init__(self, clusters: int = 1, **kwargs: Any) -> None:
        super().__init__(clusters=clusters, **kwargs)
        self.mean = self.std = self.means = self.precisions = torch.empty(0)

    def _standardise(self, logits: Tensor, features: Tensor) -> Tensor:
        f = F.normalize(self.pick(logits, features), dim=1).double()
        return (f - self.mean.to(f)) / self.std.to(f)

    def fit(self, features: Tensor, logits: Tensor, labels: Tensor | None) -> None:
        from oodlab.clustering import kmeans

        f = F.normalize(self.pick(logits, features), dim=1).double()
        self.mean, self.std = f.mean(0), f.std(0, unbiased=False).clamp(min=1e-8)
        f = (f - self.mean) / self.std
        assign = kmeans(f, self.clusters, seed=self.seed, iters=self.iters,
                        restarts=self.restarts).assignments
        means, precs = [], []
        for k in assign.unique().tolist():
            members = f[assign == k]
            mu = members.mean(0)
            cov = (members - mu).T @ (members - mu) / len(members)
            means.append(mu)
            precs.append(torch.linalg.pinv(cov, hermitian=True))
        self.means, self.precisions = torch.stack(means), torch.stack(precs)

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        if self.means.numel() == 0:
            raise RuntimeError("cluster_mahalanobis score used before fit()")
        f = self._standardise(logits, features)
        d = f[:, None, :] - self.means.to(f.device)[None]  # [N, K, D]
        dist = torch.einsum("nkd,kde,nke->nk", d, self.precisions.to(f.device), d)
        return -dist.min(1).values.float()

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "std": self.std, "means": self.means,
                "precisions": self.precisions}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mean, self.std = state["mean"], state["std"]
        self.means, self.precisions = state["means"], state["precisions"]


SCORES: dict[str, type[PostHocScore]] = {
    s.name: s for s in (MSP, MaxLogit, Energy, JointEnergy, MaxSigmoid, ODIN, KNN, Mahalanobis,
                        LMD, DiffusionRecon, ClusterCosine, ClusterMahalanobis)
}


def build_score(name: str, **params: Any) -> PostHocScore:
    """Instantiate a score by name; an unknown name or parameter is a ValueError."""
    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; allowed: {sorted(SCORES)}")
    try:
        return SCORES[name](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for score {name!r}: {params} ({err})") from None


def score_from_state(name: str, config: dict[str, Any], state: dict[str, Tensor]
                     ) -> PostHocScore:
    """Rebuild a fitted score from :meth:`PostHocScore.config` and ``state_dict``."""
    score = build_score(name, **config)
    score.load_state_dict(state)
    return score
