"""ReAct, ASH, ViM and GEN against hand computations on a tiny model; bounded-memory fitting
(Mahalanobis from running moments, the seeded kNN bank)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oodlab.detect.outputs import collect_outputs, fit_score
from oodlab.detect.scores import ash, build_score, score_from_state
from oodlab.detect.stats import chunks_of


class Tiny(nn.Module):
    """features = the input itself (a 'backbone' of identity), logits = fc(features)."""

    def __init__(self, weight: list[list[float]], bias: list[float] | None = None) -> None:
        super().__init__()
        w = torch.tensor(weight)
        self.fc = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(w)
            self.fc.bias.copy_(torch.tensor(bias) if bias else torch.zeros(w.shape[0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x


def outputs_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None):
    y = torch.zeros(len(x), dtype=torch.long) if y is None else y
    return collect_outputs(model, DataLoader(TensorDataset(x, y), batch_size=2))


def fitted(name: str, model: nn.Module, train_x: torch.Tensor, **params):
    return fit_score(name, params, outputs_of(model, train_x), supervised=True)


def both_paths(score, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The score from cached features equals the score through the model."""
    out = outputs_of(model, x)
    cached = score.score(out.logits, out.features)
    torch.testing.assert_close(cached, score.score_model(model, x))
    return cached


def test_react_clips_at_the_train_percentile_and_reapplies_the_layer() -> None:
    model = Tiny([[1, 0, 0, 0], [0, 1, 0, 0]])
    train = torch.arange(8.0).reshape(2, 4)  # activations 0..7: 50th percentile = 3.5
    score = fitted("react", model, train, percentile=50)
    assert float(score.clip) == pytest.approx(3.5)
    s = both_paths(score, model, torch.tensor([[1.0, 10.0, 0.0, 5.0]]))
    # clipped [1, 3.5, 0, 3.5] -> logits [1, 3.5] -> energy
    assert s.item() == pytest.approx(math.log(math.exp(1) + math.exp(3.5)), rel=1e-6)
    plain = fitted("react", model, train, percentile=100)  # clip at the max 7: no effect on 5
    s = plain.score(torch.tensor([[1.0, 5.0]]), torch.tensor([[1.0, 5.0, 0.0, 0.0]]))
    assert s.item() == pytest.approx(math.log(math.exp(1) + math.exp(5)), rel=1e-6)


def test_ash_variants_by_hand() -> None:
    f = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # p = 50: keep the top k = 2
    e = math.exp(10 / 7)  # s1 = 10, s2 = 3 + 4
    torch.testing.assert_close(ash(f, 50, "p"), torch.tensor([[0, 0, 3.0, 4.0]]))
    torch.testing.assert_close(ash(f, 50, "b"), torch.tensor([[0, 0, 5.0, 5.0]]))
    torch.testing.assert_close(ash(f, 50, "s"), torch.tensor([[0, 0, 3 * e, 4 * e]]))
    model = Tiny([[0, 0, 1, 0], [0, 1, 0, 0]], bias=[0.5, -0.5])
    score = fitted("ash", model, torch.rand(6, 4), percentile=50)
    s = both_paths(score, model, f)
    # logits of the shaped row: [3e + 0.5, 0 - 0.5]
    assert s.item() == pytest.approx(math.log(math.exp(3 * e + 0.5) + math.exp(-0.5)), rel=1e-6)


def test_vim_virtual_logit_by_hand() -> None:
    model = Tiny([[1, 0, 0], [0, 1, 0]])  # b = 0: origin u = 0
    train = torch.tensor([[2, 0, 0], [-2, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 0.1]])
    score = fitted("vim", model, train, dim=2)  # principal space e1, e2; residual e3
    # alpha = mean max-logit (2 + 0 + 1 + 0 + 0) / 5 over mean |f_3| (0.1 / 5) = 30
    assert float(score.alpha) == pytest.approx(30.0, rel=1e-5)
    s = both_paths(score, model, torch.tensor([[1.0, 1.0, 0.5]]))
    assert s.item() == pytest.approx(1 + math.log(2) - 30 * 0.5, rel=1e-5)
    shifted = fitted("vim", Tiny([[1, 0, 0], [0, 1, 0]], bias=[1.0, -2.0]), train, dim=2)
    torch.testing.assert_close(shifted.origin.float(), torch.tensor([-1.0, 2.0, 0.0]))


def test_gen_by_hand() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    score = build_score("gen", gamma=0.5, top=2)
    want = -(math.sqrt(0.5 * 0.5) + math.sqrt(0.3 * 0.7))
    assert score.score(logits, torch.zeros(1, 1)).item() == pytest.approx(want, rel=1e-9)
    full = build_score("gen", gamma=0.5, top=100)  # M above C: every class
    want += -math.sqrt(0.2 * 0.8)
    assert full.score(logits, torch.zeros(1, 1)).item() == pytest.approx(want, rel=1e-9)


def test_head_scores_refuse_a_layer_that_does_not_give_the_logits() -> None:
    class Scaled(Tiny):
        def forward(self, x):
            return 2 * self.fc(x), x

    with pytest.raises(ValueError, match="W f \\+ b"):
        fitted("react", Scaled([[1.0, 0.0], [0.0, 1.0]]), torch.rand(5, 2))

    class NoHead(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(ValueError, match="last linear layer"):
        fitted("ash", NoHead(), torch.rand(5, 2))


@pytest.mark.parametrize("name,params", [("react", {"percentile": 80}),
                                         ("ash", {"percentile": 60, "variant": "b"}),
                                         ("vim", {"dim": 3}), ("gen", {"gamma": 0.3}),
                                         ("knn", {"k": 3, "bank_size": 10}),
                                         ("mahalanobis", {}), ("mahalanobis", {"shrinkage": 0.3})])
def test_fitted_state_round_trips(name: str, params: dict) -> None:
    torch.manual_seed(0)
    model = Tiny(torch.randn(3, 6).tolist(), torch.randn(3).tolist())
    x, y = torch.randn(40, 6), torch.arange(40) % 3
    score = fit_score(name, params, outputs_of(model, x, y), supervised=True)
    again = score_from_state(name, score.config(), score.state_dict())
    q = torch.randn(7, 6)
    torch.testing.assert_close(again.score_model(model, q), score.score_model(model, q))


def test_mahalanobis_from_chunks_matches_the_direct_fit() -> None:
    torch.manual_seed(1)
    f, labels = torch.randn(300, 5) * 3 + 1, torch.arange(300) % 4
    means = torch.stack([f[labels == c].double().mean(0) for c in range(4)])
    centred = f.double() - means[labels]
    precision = torch.linalg.pinv(centred.T @ centred / 300, hermitian=True)
    q = torch.randn(9, 5)
    d = q.double()[:, None] - means[None]
    want = -torch.einsum("ncd,de,nce->nc", d, precision, d).min(1).values
    for size in (7, 300):
        score = build_score("mahalanobis")
        score.fit_chunks(chunks_of(f, torch.zeros(300, 4), labels, size))
        torch.testing.assert_close(score.score(torch.zeros(9, 4), q).double(), want,
                                   rtol=1e-4, atol=1e-4)


def test_knn_bank_is_bounded_seeded_and_a_uniform_sample() -> None:
    f = torch.randn(1000, 4)
    small = build_score("knn", k=1, bank_size=100, seed=3)
    small.fit_chunks(chunks_of(f, f, None, 64))
    assert small.bank.shape == (100, 4)
    again = build_score("knn", k=1, bank_size=100, seed=3)
    again.fit_chunks(chunks_of(f, f, None, 64))
    torch.testing.assert_close(again.bank, small.bank)
    other = build_score("knn", k=1, bank_size=100, seed=4)
    other.fit_chunks(chunks_of(f, f, None, 64))
    assert not torch.equal(other.bank, small.bank)
    full = build_score("knn", k=1, bank_size=None)
    full.fit(f, f, None)
    assert len(full.bank) == 1000
    torch.testing.assert_close(full.score(f, f), torch.zeros(1000), atol=1e-3, rtol=0)
    with pytest.raises(TypeError, match="re-iterable"):
        small.fit_chunks(iter(chunks_of(f, f, None, 64)))


def test_mahalanobis_shrinkage_is_sklearns_shrunk_covariance() -> None:
    """shrinkage a: precision of (1 - a) Sigma + a tr(Sigma)/D I, scikit-learn's
    ShrunkCovariance on the class-centred rows; a = 1 ranks by Euclidean distance."""
    from sklearn.covariance import ShrunkCovariance

    torch.manual_seed(2)
    f = torch.randn(400, 6) * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1, 0.01]) + 1
    labels = torch.arange(400) % 4
    means = torch.stack([f[labels == c].double().mean(0) for c in range(4)])
    centred = (f.double() - means[labels]).numpy()
    q = torch.randn(11, 6)
    d = q.double()[:, None] - means[None]
    for a in (0.1, 0.7):
        prec = torch.from_numpy(ShrunkCovariance(shrinkage=a, assume_centered=True)
                                .fit(centred).precision_)
        want = -torch.einsum("ncd,de,nce->nc", d, prec, d).min(1).values
        score = build_score("mahalanobis", shrinkage=a)
        score.fit_chunks(chunks_of(f, torch.zeros(400, 4), labels, 64))
        torch.testing.assert_close(score.score(None, q).double(), want, rtol=1e-4, atol=1e-4)
    euclid = build_score("mahalanobis", shrinkage=1.0)
    euclid.fit(f, torch.zeros(400, 4), labels)
    nearest = -(d ** 2).sum(-1).min(1).values
    assert torch.equal(euclid.score(None, q).argsort(), nearest.argsort())
    exact = build_score("mahalanobis")
    exact.fit(f, torch.zeros(400, 4), labels)
    assert not torch.equal(exact.score(None, q).argsort(), nearest.argsort())
    with pytest.raises(ValueError, match="mahalanobis.shrinkage must be in"):
        build_score("mahalanobis", shrinkage=1.5)


def test_shrinkage_rescues_a_covariance_that_trusts_a_direction_id_train_barely_uses() -> None:
    """The failure shrinkage exists for: ID-train features hardly vary along one direction,
    ID test images vary a little more along it (a generalisation gap), and OOD features sit
    near the origin, far from every class mean in the directions that do vary. The exact
    precision ranks ID test below OOD; shrunk, the ranking is right."""
    from oodlab.detect.metrics import auroc

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[6.0, 0.0], [-6.0, 0.0], [0.0, 6.0], [0.0, -6.0]])

    def id_rows(n: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 4
        wide = centres[y] + torch.randn(n, 2, generator=g)
        thin = torch.randn(n, 1, generator=g) * spread
        return torch.cat([wide, thin], 1), y

    train, y = id_rows(2000, 0.01)
    test, _ = id_rows(500, 0.2)
    ood = torch.cat([torch.randn(500, 2, generator=g), torch.zeros(500, 1)], 1)
    result = {}
    for a in (0.0, 0.1):
        score = build_score("mahalanobis", shrinkage=a)
        score.fit(train, torch.zeros(2000, 4), y)
        result[a] = auroc(score.score(None, test), score.score(None, ood))
    assert result[0.0] < 0.6 < 0.95 < result[0.1], result
