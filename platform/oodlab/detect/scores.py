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

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodlab.detect.stats import Chunk, Moments, Reservoir, chunks_of, reiterable
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
    # re-applies the model's last linear layer (logits = W f + b) to modified features
    needs_head: ClassVar[bool] = False

    def fit(self, features: Tensor, logits: Tensor, labels: Tensor | None) -> None:
        """Fit state on ID training outputs (no-op for unfitted scores)."""

    def fit_chunks(self, chunks: Iterable[Chunk]) -> None:
        """Fit on ID-train outputs given as re-iterable ``(features, logits, labels)`` chunks
        (cache shards). Scores with bounded-memory statistics override this; the default
        concatenates the chunks and calls :meth:`fit`."""
        parts = list(reiterable(chunks))
        labels = None if parts[0][2] is None else torch.cat([c[2] for c in parts])
        self.fit(torch.cat([c[0] for c in parts]), torch.cat([c[1] for c in parts]), labels)

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
    ID-train feature). A query that is itself in the bank is not excluded.

    The bank holds at most ``bank_size`` ID-train features, a seeded uniform sample
    (:class:`oodlab.detect.stats.Reservoir`; the paper samples 1 % of ImageNet the same way),
    so fitting and the saved detector stay bounded; ``bank_size=None`` keeps every row."""

    name = "knn"
    needs_fit = True

    def __init__(self, k: int = 50, chunk: int = 1024, bank_size: int | None = 100_000,
                 seed: int = 0) -> None:
        self.k, self.chunk = int(k), int(chunk)
        self.bank_size = None if bank_size is None else int(bank_size)
        self.seed = int(seed)
        self.bank = torch.empty(0)

    def fit(self, features: Tensor, logits: Tensor, labels: Tensor | None) -> None:
        self.fit_chunks(chunks_of(features, logits, labels, 8192))

    def fit_chunks(self, chunks: Iterable[Chunk]) -> None:
        bank = Reservoir(self.bank_size, self.seed)
        for features, _, _ in reiterable(chunks):
            bank.update(F.normalize(features.float(), dim=1))
        self.bank = bank.rows

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
        return {"k": self.k, "bank_size": self.bank_size, "seed": self.seed}


@SCORES.register
class Mahalanobis(PostHocScore):
    """Lee et al. 2018 (Eq. 2, penultimate layer, no input noise): class means and one tied
    covariance from ID train; score = -min_c (f - mu_c)^T Sigma^+ (f - mu_c).

    ``shrinkage`` a in [0, 1] replaces Sigma by (1 - a) Sigma + a (tr Sigma / D) I, the
    shrunk covariance of Ledoit & Wolf 2004 (scikit-learn's ``shrunk_covariance``). a = 0,
    the default, is the paper's estimator; a = 1 ranks by Euclidean distance to the nearest
    class mean. Shrinkage pulls the eigenvalues towards their mean. The exact estimator fails
    in two ways it repairs: it over-weights directions in which ID-train features barely vary
    (ID test features that move a little along them look far), and when ID features vary most
    along their class means, i.e. in norm, it calls a feature near the origin (where outlier
    exposure puts OOD features) a weak member of the nearest class."""

    name = "mahalanobis"
    needs_fit = True
    needs_labels = True

    def __init__(self, shrinkage: float = 0.0) -> None:
        if not 0.0 <= float(shrinkage) <= 1.0:
            raise ValueError(f"mahalanobis.shrinkage must be in [0, 1], got {shrinkage}")
        self.shrinkage = float(shrinkage)
        self.means = torch.empty(0)
        self.precision = torch.empty(0)

    def fit(self, features: Tensor, logits: Tensor, labels: Tensor | None) -> None:
        self.fit_chunks(chunks_of(features, logits, labels, 8192))

    def fit_chunks(self, chunks: Iterable[Chunk]) -> None:
        """One pass of running class sums and outer products (:class:`Moments`): memory
        O(D^2 + C*D) whatever the number of rows."""
        moments = Moments()
        for features, _, labels in reiterable(chunks):
            if labels is None:
                raise ValueError("mahalanobis needs class labels of the ID training set")
            moments.update(features, labels)
        self.fit_moments(moments)

    def fit_moments(self, moments: Moments) -> None:
        """Fit from class-labelled running moments (one pass over ID train serves any number
        of shrinkage values)."""
        _, means = moments.class_means()
        cov = moments.tied_covariance()
        if self.shrinkage > 0:
            from sklearn.covariance import shrunk_covariance  # here: scikit-learn costs a
            # process about 1.5 s to import, and only this fit needs it

            cov = torch.from_numpy(shrunk_covariance(cov.numpy(), self.shrinkage))
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

    def config(self) -> dict[str, Any]:
        return {"shrinkage": self.shrinkage}


class _ClusterScore(PostHocScore):
    """Base of the k-means scores of CCL (Chen et al. 2023): seeded k-means
    (``oodlab.detect.clustering``; spherical for the centre cosine, Euclidean for SSD) on
    ID-train features; ``space`` picks the backbone ``features``
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
    mean/std, Euclidean k-means (SSD's faiss default), then per cluster its mean and biased
    covariance (pseudo-inverse); score = -min_k (f - mu_k)^T Sigma_k^+ (f - mu_k).
    ``clusters=1`` is SSD's default."""

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
                        restarts=self.restarts, metric="euclidean").assignments
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


class _HeadScore(PostHocScore):
    """Base of the scores that modify the penultimate features and re-apply the model's last
    linear layer, ``logits = W f + b``. The layer is copied into the score
    (:meth:`set_head`, from :class:`oodlab.detect.outputs.Outputs` or a feature cache), so
    cached features suffice and the fitted score is saved with the detector."""

    needs_fit = True
    needs_head = True

    def __init__(self) -> None:
        self.weight = self.bias = torch.empty(0)

    def set_head(self, weight: Tensor, bias: Tensor) -> None:
        self.weight, self.bias = weight.detach().float().cpu(), bias.detach().float().cpu()

    def head(self, features: Tensor) -> Tensor:
        if self.weight.numel() == 0:
            raise RuntimeError(f"{self.name} score used before set_head()/fit()")
        return F.linear(features.float(), self.weight.to(features.device),
                        self.bias.to(features.device))

    def check_head(self, features: Tensor, logits: Tensor) -> None:
        """The stored layer must reproduce the model's logits from its features."""
        err = (self.head(features) - logits.float()).abs().max().item()
        if err > 1e-3 * (1.0 + logits.abs().max().item()):
            raise ValueError(f"score {self.name!r} needs logits = W f + b of the model's last "
                             f"linear layer; the stored layer is off by {err:.3g}")

    def fit(self, features: Tensor, logits: Tensor, labels: Tensor | None) -> None:
        self.fit_chunks(chunks_of(features, logits, labels, 8192))

    def fit_chunks(self, chunks: Iterable[Chunk]) -> None:
        for features, logits, _ in reiterable(chunks):
            self.check_head(features, logits)
            break

    def state_dict(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "bias": self.bias}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.weight, self.bias = state["weight"], state["bias"]


@SCORES.register
class ReAct(_HeadScore):
    """ReAct, Sun et al. 2021 (Eq. 1-2): clip the penultimate activations at c, the
    ``percentile``-th percentile of ID-train activations (all units pooled; the paper's 90),
    re-apply the last layer and take the energy logsumexp(W min(f, c) + b). The percentile is
    taken over a seeded sample of at most ``sample`` ID-train rows (all of them when fewer)."""

    name = "react"

    def __init__(self, percentile: float = 90.0, sample: int = 100_000, seed: int = 0) -> None:
        super().__init__()
        if not 0 < percentile <= 100:
            raise ValueError(f"react.percentile must be in (0, 100], got {percentile}")
        self.percentile, self.sample, self.seed = float(percentile), int(sample), int(seed)
        self.clip = torch.empty(0)

    def fit_chunks(self, chunks: Iterable[Chunk]) -> None:
        super().fit_chunks(chunks)
        rows = Reservoir(self.sample, self.seed)
        for features, _, _ in reiterable(chunks):
            rows.update(features.float())
        values = rows.rows.flatten().double().numpy()
        self.clip = torch.tensor(float(np.percentile(values, self.percentile)))

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        if self.clip.numel() == 0:
            raise RuntimeError("react score used before fit()")
        clipped = features.float().clamp(max=float(self.clip))
        return torch.logsumexp(self.head(clipped), 1)

    def state_dict(self) -> dict[str, Tensor]:
        return super().state_dict() | {"clip": self.clip}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self.clip = state["clip"]

    def config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "sample": self.sample, "seed": self.seed}


def ash(features: Tensor, percentile: float, variant: str = "s") -> Tensor:
    """Activation shaping, Djurisic et al. 2023 (Alg. 1), on [N, D] penultimate features
    (after pooling, as OpenOOD applies it): keep each row's top k = D - round(D * p / 100)
    activations and zero the rest; ``p`` (ASH-P) stops there, ``b`` sets the kept ones to
    s1 / k, ``s`` scales the pruned row by exp(s1 / s2); s1, s2: row sums before/after."""
    f = features.float()
    d = f.shape[1]
    k = max(1, d - int(round(d * percentile / 100.0)))
    top = f.topk(k, dim=1)
    s1 = f.sum(1, keepdim=True)
    if variant == "b":
        return torch.zeros_like(f).scatter(1, top.indices, (s1 / k).expand(-1, k))
    pruned = torch.zeros_like(f).scatter(1, top.indices, top.values)
    if variant == "p":
        return pruned
    s2 = pruned.sum(1, keepdim=True).clamp(min=1e-12)
    return pruned * torch.exp(s1 / s2)


@SCORES.register
class ASH(_HeadScore):
    """ASH (Djurisic et al. 2023): :func:`ash` on the penultimate features, then the energy
    logsumexp of the re-applied last layer. Defaults: ASH-S at the 90th percentile."""

    name = "ash"

    def __init__(self, percentile: float = 90.0, variant: str = "s") -> None:
        super().__init__()
        if not 0 <= percentile < 100:
            raise ValueError(f"ash.percentile must be in [0, 100), got {percentile}")
        if variant not in ("s", "p", "b"):
            raise ValueError(f"ash.variant must be 's', 'p' or 'b', got {variant!r}")
        self.percentile, self.variant = float(percentile), variant

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        return torch.logsumexp(self.head(ash(features, self.percentile, self.variant)), 1)

    def config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "variant": self.variant}


@SCORES.register
class ViM(_HeadScore):
    """ViM, Wang et al. 2022 (Eq. 5-9, the authors' reference code): origin
    u = -W^+ b; the principal space is spanned by the top ``dim`` eigenvectors of the
    second moment of (f - u) over ID train, R its orthogonal complement; virtual logit
    alpha * ||R^T (f - u)|| with alpha = mean max-logit / mean ||R^T (f - u)|| on ID train;
    score = logsumexp(logits) - alpha * ||R^T (f - u)||. ``dim=None``: half the feature
    dimension (OpenOOD's 256 of 512 for ResNet-18). Two passes of running moments."""

    name = "vim"

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        if dim is not None and int(dim) < 1:
            raise ValueError(f"vim.dim must be >= 1, got {dim}")
        self.dim = None if dim is None else int(dim)
        self.origin = self.residual = self.alpha = torch.empty(0)

    def fit_chunks(self, chunks: Iterable[Chunk]) -> None:
        super().fit_chunks(chunks)
        self.origin = -(torch.linalg.pinv(self.weight.double()) @ self.bias.double())
        moments = Moments()
        for features, _, _ in reiterable(chunks):
            moments.update(features)
        d = len(self.origin)
        dim = d // 2 if self.dim is None else self.dim
        if dim >= d:
            raise ValueError(f"vim.dim must be below the feature dimension {d}, got {dim}")
        _, vecs = torch.linalg.eigh(moments.second_moment(about=self.origin))  # ascending
        self.residual = vecs[:, : d - dim].float()
        vnorm, maxlogit = 0.0, 0.0
        for features, logits, _ in reiterable(chunks):
            vnorm += self._residual_norm(features).sum().item()
            maxlogit += logits.float().max(1).values.sum().item()
        self.alpha = torch.tensor(maxlogit / max(vnorm, 1e-12))

    def _residual_norm(self, features: Tensor) -> Tensor:
        f = features.float() - self.origin.float().to(features.device)
        return (f @ self.residual.to(features.device)).norm(dim=1)

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        if self.residual.numel() == 0:
            raise RuntimeError("vim score used before fit()")
        virtual = self.alpha.to(features.device) * self._residual_norm(features)
        return torch.logsumexp(self.head(features), 1) - virtual

    def state_dict(self) -> dict[str, Tensor]:
        return super().state_dict() | {"origin": self.origin, "residual": self.residual,
                                       "alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self.origin, self.residual, self.alpha = state["origin"], state["residual"], state["alpha"]

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim}


def generalized_entropy(logits: Tensor, gamma: float = 0.1, top: int = 100) -> Tensor:
    """GEN, Liu et al. 2023 (Eq. 5): -sum over the ``top`` largest softmax probabilities of
    p^gamma (1 - p)^gamma, in float64."""
    p = logits.double().softmax(1)
    p = p.topk(min(int(top), p.shape[1]), dim=1).values
    return -(p.pow(gamma) * (1 - p).pow(gamma)).sum(1)


@SCORES.register
class GEN(PostHocScore):
    """GEN, Liu et al. 2023: :func:`generalized_entropy` with the paper's gamma = 0.1 and
    M = 100 (all classes when fewer)."""

    name = "gen"

    def __init__(self, gamma: float = 0.1, top: int = 100) -> None:
        if not 0 < gamma <= 1:
            raise ValueError(f"gen.gamma must be in (0, 1], got {gamma}")
        if int(top) < 1:
            raise ValueError(f"gen.top must be >= 1, got {top}")
        self.gamma, self.top = float(gamma), int(top)

    def score(self, logits: Tensor, features: Tensor) -> Tensor:
        return generalized_entropy(logits, self.gamma, self.top)

    def config(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "top": self.top}


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
