"""Post-hoc OOD scores on a trained model's logits and features. Higher = more ID.

Logit scores are plain functions; scores with fitted state (kNN bank, Mahalanobis means)
are small classes with one API, :class:`PostHocScore`, whose state is tensors only so a
detector can be saved with ``torch.save`` and loaded with ``weights_only=True``.

Exactness at large logit gaps. The registered ``msp`` and ``odin`` scores are computed in log
space, as the log-odds of the maximum softmax probability p = max softmax(f),

    log(p / (1 - p)) = -logsumexp_{i != argmax} (f_i - f_max)     (float64),

a strictly increasing function of p, so AUROC, AUPR and FPR@95 are those of MSP (Hendrycks &
Gimpel 2017) and ODIN (Liang et al. 2018) while the values never saturate: in float32, p
rounds to exactly 1.0 once the gap f_max - f_2nd exceeds about 17, so a confident ID image
(gap 40) and a confident OOD image (gap 30) would tie and perfectly separable logits would get
AUROC 0.5. The log-odds keep them apart at any gap (40 - log 9 vs 30 - log 9 for ten classes).
Thresholds (and served scores) are on the log-odds scale; p = sigmoid(score) recovers MSP.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodlab.registry import SCORES


def msp(logits: Tensor) -> Tensor:
    """Maximum softmax probability, Hendrycks & Gimpel 2017 (one softmax, not two).

    It saturates at 1.0 for logit gaps above ~17 (float32); the registered ``msp`` score is
    :func:`msp_logodds`, the same ranking without saturation."""
    return logits.softmax(1).max(1).values


def msp_logodds(logits: Tensor) -> Tensor:
    """Log-odds of the maximum softmax probability, log(p / (1 - p)) with p = max softmax,
    computed as -logsumexp_{i != argmax}(f_i - f_max) in float64: strictly increasing in p,
    exact at any logit gap (see the module docstring). One class: +inf."""
    z = logits.double()
    top = z.max(1, keepdim=True)
    others = z.scatter(1, top.indices, float("-inf")) - top.values
    return -torch.logsumexp(others, 1)


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
    # fitted with ID class labels: only for models trained with labels (not "unsupervised")
    needs_labels: ClassVar[bool] = False

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

    def score_loader(self, model: nn.Module, loader, device: torch.device | str) -> Tensor:
        """Scores of a whole set, batch by batch through the model; scores that batch or
        parallelise a set themselves (``lmd``) override this."""
        return torch.cat([self.score_model(model, x.to(device)).cpu() for x, _ in loader])

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


@SCORES.register
class MSP(_LogitScore):
    """MSP (Hendrycks & Gimpel 2017) as its log-odds, :func:`msp_logodds` (exact ranking)."""

    name, fn = "msp", staticmethod(msp_logodds)


@SCORES.register
class MaxLogit(_LogitScore):
    name, fn = "max_logit", staticmethod(max_logit)


@SCORES.register
class JointEnergy(_LogitScore):
    name, fn = "joint_energy", staticmethod(joint_energy)


@SCORES.register
class MaxSigmoid(_LogitScore):
    name, fn = "max_sigmoid", staticmethod(max_sigmoid)


@SCORES.register
class Energy(PostHocScore):
    """Energy score with temperature T (default 1)."""

    name = "energy"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = float(temperature)

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        return energy(logits, self.temperature)

    def config(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


@SCORES.register
class ODIN(PostHocScore):
    """ODIN, Liang et al. 2018: temperature scaling + input perturbation (Eq. 2).

    x~ = x - eps * sign(-grad_x log max softmax(f(x)/T)); score = max softmax(f(x~)/T),
    returned as its log-odds (:func:`msp_logodds` of f(x~)/T, float64), the same ranking
    with no saturation or float32 rounding of probabilities near 1/C at T = 1000.
    oodlab models normalise inside the model, so the perturbation is in [0, 1] pixel space
    (as in the Unleashing-Mask code; the original ODIN divides by the data std).
    """

    name = "odin"
    needs_model = True

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014) -> None:
        self.temperature, self.epsilon = float(temperature), float(epsilon)

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        return msp_logodds(logits.double() / self.temperature)

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
            return msp_logodds(model(x_tilde)[0].double() / self.temperature)

    def config(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "epsilon": self.epsilon}


@SCORES.register
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


@SCORES.register
class Mahalanobis(PostHocScore):
    """Lee et al. 2018 (Eq. 2, penultimate layer, no input noise): class means and one tied
    covariance from ID train; score = -min_c (f - mu_c)^T Sigma^+ (f - mu_c)."""

    name = "mahalanobis"
    needs_fit = True
    needs_labels = True

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


class _ClusterScore(PostHocScore):
    """Base of the k-means scores of CCL (Chen et al. 2023): seeded spherical k-means
    (``oodlab.detect.clustering``) on ID-train features; ``space`` picks the backbone ``features``
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


@SCORES.register
class ClusterCosine(_ClusterScore):
    """Cosine to the nearest k-means centre: max_k cos(f(x), c_k) (CCL's cluster-based score)."""

    name = "cluster_cosine"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.centres = torch.empty(0)

    def fit(self, features: Tensor, logits: Tensor, labels: Tensor | None) -> None:
        from oodlab.detect.clustering import kmeans

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


@SCORES.register
class ClusterMahalanobis(_ClusterScore):
    """SSD (Sehwag et al. 2021): L2-normalise, standardise with the train
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
        from oodlab.detect.clustering import kmeans

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
