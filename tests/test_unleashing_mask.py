"""Unleashing Mask: the flooded loss, the ℓ̂ estimate, popup masks and the DenseNet-BC."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from oodlab.methods import TrainState, build_method
from oodlab.methods import unleashing_mask as um_module
from oodlab.methods.ops.pruning import (
    add_popup_masks,
    bake_popup_masks,
    maskable_layers,
    num_pruned,
    popup_masks,
    random_masked_copy,
)
from oodlab.methods.unleashing_mask import (
    LOSS_CONSTRAINT,
    estimate_loss_constraint,
    flood_loss,
    pad_crop_flip,
)
from oodlab.models import DenseNetBC, SmallCNN
from oodlab.spec import SpecError, validate_spec
from tests.helpers import tiny_spec

LN3 = math.log(3.0)
RUN = "runs:/0123abcd"


def test_flood_loss_value_and_gradient_sign():
    w = torch.tensor(2.0, requires_grad=True)
    loss = w**2  # 4 > ell = 1: |4 - 1| + 1 = 4 and the gradient is +dL/dw = 2w = 4 (descent)
    out = flood_loss(loss, 1.0)
    out.backward()
    assert out.item() == pytest.approx(4.0) and w.grad.item() == pytest.approx(4.0)
    w = torch.tensor(0.5, requires_grad=True)
    loss = w**2  # 0.25 < ell = 1: |0.25 - 1| + 1 = 1.75 and the gradient is -2w = -1 (ascent)
    out = flood_loss(loss, 1.0)
    out.backward()
    assert out.item() == pytest.approx(1.75) and w.grad.item() == pytest.approx(-1.0)


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x), x


def _method(tmp_path, **method):
    return build_method(validate_spec(tiny_spec(tmp_path, method=method, init_from=RUN)))


def test_um_step_floods_the_id_term_only(tmp_path):
    x, y, x_oe = torch.randn(2, 4), torch.tensor([0, 2]), torch.randn(2, 4)
    state = TrainState(extra={LOSS_CONSTRAINT: 2 * LN3})
    um = _method(tmp_path, name="um")
    assert not um.uses_oe
    # zero logits: CE = ln3 < ell = 2 ln3, so |ln3 - 2 ln3| + 2 ln3 = 3 ln3
    assert um.training_step(_Linear(), (x, y), None, state).item() == pytest.approx(3 * LN3)
    um_oe = _method(tmp_path, name="um", outlier={"name": "oe", "weight": 0.5})
    assert um_oe.uses_oe
    # + 0.5 * uniform CE of zero OE logits (= ln3), not flooded
    got = um_oe.training_step(_Linear(), (x, y), (x_oe, -torch.ones(2)), state).item()
    assert got == pytest.approx(3.5 * LN3)
    metrics = um_oe.epoch_metrics(_Linear(), state)
    assert metrics == {"um/loss_constraint": 2 * LN3, "um/ascent_fraction": 1.0,
                       "um/train_ce": pytest.approx(LN3)}


def test_um_given_constraint_is_used_and_a_restart_keeps_the_stored_one(tmp_path):
    um = _method(tmp_path, name="um", loss_constraint=0.3)
    state = TrainState()
    um.on_fit_start(_Linear(), None, state)
    assert state.extra[LOSS_CONSTRAINT] == 0.3
    state.extra[LOSS_CONSTRAINT] = 0.7  # as restored from a checkpoint
    um.on_fit_start(_Linear(), None, state)
    assert state.extra[LOSS_CONSTRAINT] == 0.7


def test_random_mask_zeroes_the_stated_fraction_of_every_layer():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_channels=1, width=8)
    masked = random_masked_copy(model, keep=0.965, seed=3)
    layers = maskable_layers(masked)
    assert len(layers) == 7  # 6 convs (first included) + the classifier
    for (name, layer), (_, orig) in zip(layers, maskable_layers(model), strict=True):
        zeros = int((layer.weight == 0).sum())
        assert zeros == num_pruned(layer.weight.numel(), 0.965) > 0, name
        kept = layer.weight != 0
        assert torch.equal(layer.weight[kept], orig.weight[kept])  # the rest is untouched
        assert torch.equal(layer.bias, orig.bias) if layer.bias is not None else True
    assert all(int((m.weight == 0).sum()) == 0 for _, m in maskable_layers(model))  # a copy


def _data(n=40):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,),
                                                                             generator=g))


def test_loss_constraint_estimate_is_seeded_and_matches_a_hand_computation():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_channels=1, width=8)
    data = _data()
    a = estimate_loss_constraint(model, data, keep=0.965, seed=7, batch_size=16)
    assert a == estimate_loss_constraint(model, data, keep=0.965, seed=7, batch_size=16)
    assert a != estimate_loss_constraint(model, data, keep=0.965, seed=8, batch_size=16)
    masked = random_masked_copy(model, 0.965, 7).eval()
    x, y = data.tensors
    with torch.no_grad():
        by_hand = F.cross_entropy(masked(x)[0], y).item()
    assert a == pytest.approx(by_hand, rel=1e-5)
    assert model.training  # the model itself is neither masked nor switched to eval
    # two workers score disjoint halves; their weighted mean is the full-set mean
    halves = [estimate_loss_constraint(model, data, keep=0.965, seed=7, rank=r, world_size=2)
              for r in (0, 1)]
    assert (halves[0] + halves[1]) / 2 == pytest.approx(a, rel=1e-5)


def test_popup_masks_keep_the_stated_fraction_and_never_touch_the_weights():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_channels=1, width=8)
    original = copy.deepcopy(model.state_dict())
    wrapped = add_popup_masks(model, keep=0.8, seed=0)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scores") for n in trainable)
    first = {k: m.clone() for k, m in popup_masks(wrapped).items()}
    for name, mask in first.items():
        assert int(mask.sum()) == mask.numel() - num_pruned(mask.numel(), 0.8), name
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=5.0)
    x, y = _data(32).tensors
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(wrapped(x)[0], y).backward()
        opt.step()
    after = popup_masks(wrapped)
    assert any(not torch.equal(after[k], first[k]) for k in after)  # the mask did learn
    for name, mask in after.items():
        assert int(mask.sum()) == mask.numel() - num_pruned(mask.numel(), 0.8), name
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(x)[0]
    served = bake_popup_masks(wrapped)
    assert set(served.state_dict()) == set(original)  # plain backbone keys again
    for name, layer in maskable_layers(served):
        assert torch.equal(layer.weight, original[f"{name}.weight"] * after[name])
    for key, value in original.items():
        if key.endswith("weight") and any(key == f"{n}.weight" for n in after):
            continue
        if "running" in key or "num_batches" in key:
            continue  # BatchNorm statistics are re-estimated under the mask, like the reference
        assert torch.equal(served.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.allclose(served(x)[0], expected, atol=1e-6)


def test_popup_scores_get_the_straight_through_gradient():
    layer = nn.Linear(3, 2, bias=False)
    add_popup_masks(layer, keep=0.5, seed=0)
    scores = layer.parametrizations.weight[0].scores
    w = layer.parametrizations.weight.original
    x = torch.tensor([[1.0, 2.0, 3.0]])
    layer(x).sum().backward()
    # dL/dW_eff[i, j] = x[j]; dL/dS = dL/dW_eff * W * sign(S)
    expected = x.expand(2, 3) * w.detach() * scores.detach().sign()
    assert torch.allclose(scores.grad, expected)
    assert w.grad is None


def test_unleashing_specs_are_checked(tmp_path):
    with pytest.raises(SpecError, match="init_from"):
        validate_spec(tiny_spec(tmp_path, method={"name": "um"}))
    with pytest.raises(SpecError, match="data.oe"):
        validate_spec(tiny_spec(tmp_path, method={"name": "umap", "outlier": {"name": "oe"}},
                                data={"oe": []}, init_from=RUN))
    with pytest.raises(SpecError, match="keep_ratio"):
        validate_spec(tiny_spec(tmp_path, method={"name": "umap", "keep_ratio": 1.5},
                                init_from=RUN))
    with pytest.raises(SpecError, match="outlier"):
        validate_spec(tiny_spec(tmp_path, method={"name": "um", "outlier": {"name": "edge"}},
                                init_from=RUN))
    with pytest.raises(SpecError, match="model.depth"):
        validate_spec(tiny_spec(tmp_path, model={"arch": "densenet", "depth": 50}))
    ok = validate_spec(tiny_spec(tmp_path, init_from="spec:um_pretrain",
                                 method={"name": "um", "outlier": {"name": "energy_oe"}}))
    assert ok.method.outlier.m_in == -25.0 and ok.method.keep == 0.965


def test_densenet_bc_shapes_and_size():
    net = DenseNetBC(num_classes=10, in_channels=3, depth=100, growth=12)
    assert net.feature_dim == 342  # 24 + 16*12 -> 108 -> 300 -> 150 -> 342 (DenseNet3 code)
    n_params = sum(p.numel() for p in net.parameters())
    assert 0.75e6 < n_params < 0.8e6  # DenseNet-BC (L=100, k=12): 0.8M parameters
    small = DenseNetBC(num_classes=4, in_channels=1, depth=10, growth=4).eval()
    logits, feats = small(torch.rand(2, 1, 28, 28))
    assert logits.shape == (2, 4) and feats.shape == (2, small.feature_dim)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        DenseNetBC(num_classes=10, depth=50)


def test_loss_constraint_averages_over_several_masks():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_channels=1, width=8)
    data = _data()
    each = [estimate_loss_constraint(model, data, keep=0.9, seed=s) for s in (3, 3 + 100_003)]
    both = estimate_loss_constraint(model, data, keep=0.9, seed=3, masks=2)
    assert both == pytest.approx(sum(each) / 2, rel=1e-6)


def _grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return [g.clone() for g in torch.autograd.grad(loss, list(model.parameters()))]


def _random_linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _Linear()
    nn.init.normal_(model.fc.weight)
    return model


@pytest.mark.parametrize("with_oe", [False, True])
def test_training_step_gradient_is_minus_grad_ce_below_the_constraint(tmp_path, with_oe):
    """Backpropagating through ``training_step``: the ID part of the gradient is -dCE below ℓ̂
    and +dCE above it; the OE term is added unflooded. A detached or sign-flipped ID term fails.
    """
    g = torch.Generator().manual_seed(3)
    x, y, x_oe = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g), \
        torch.randn(8, 4, generator=g)
    params = {"name": "um"} | ({"outlier": {"name": "oe", "weight": 0.5}} if with_oe else {})
    um = _method(tmp_path, **params)
    oe_batch = (x_oe, -torch.ones(8)) if with_oe else None
    model = _random_linear()
    ce = F.cross_entropy(model(x)[0], y)
    d_ce = _grads(model, ce)
    d_oe = [torch.zeros_like(p) for p in model.parameters()]
    if with_oe:
        logits = model(torch.cat([x, x_oe]))[0]
        d_oe = _grads(model, 0.5 * (-logits[8:].log_softmax(1).mean(1)).mean())
    for ell, sign in ((ce.item() + 1.0, -1.0), (ce.item() - 0.5, 1.0)):
        state = TrainState(extra={LOSS_CONSTRAINT: ell})
        got = _grads(model, um.training_step(model, (x, y), oe_batch, state))
        for g_got, g_ce, g_oe in zip(got, d_ce, d_oe, strict=True):
            assert g_ce.abs().max() > 1e-3
            assert torch.allclose(g_got, sign * g_ce + g_oe, atol=1e-6)
    assert um.epoch_metrics(model, state)["um/ascent_fraction"] == 0.5  # 1 of 2 steps ascended


def test_plain_ce_control_differs_only_by_the_flood(tmp_path):
    """``flood: false`` is plain CE: its gradient is +dCE even below ℓ̂."""
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    model = _random_linear()
    ce = F.cross_entropy(model(x)[0], y)
    control = _method(tmp_path, name="um", flood=False)
    state = TrainState(extra={LOSS_CONSTRAINT: ce.item() + 1.0})
    loss = control.training_step(model, (x, y), None, state)
    assert loss.item() == pytest.approx(ce.item())
    for g_got, g_ce in zip(_grads(model, loss), _grads(model, ce), strict=True):
        assert torch.allclose(g_got, g_ce, atol=1e-6)
    assert control.epoch_metrics(model, state)["um/ascent_fraction"] == 1.0  # would have


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))

    def forward(self, x):
        return self.net(x), x


def _finetune(method, model, ell, steps=60, lr=0.1):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 16, generator=g), torch.randint(0, 5, (32,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    state = TrainState(extra={LOSS_CONSTRAINT: ell})
    ces = []
    for step in range(steps):
        state.step = step
        loss = method.training_step(model, (x, y), None, state)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            ces.append(F.cross_entropy(model(x)[0], y).item())
    return ces, method.epoch_metrics(model, state)


def test_um_holds_the_training_loss_at_the_constraint_where_plain_ce_descends(tmp_path):
    """A finetune with UM and with plain CE from the same model on the same batch: plain CE
    drives the loss towards 0; UM stops it at ℓ̂ (ascent below, descent above), and with ℓ̂
    below every loss it sees UM *is* plain CE, step for step."""
    torch.manual_seed(0)
    start = _MLP()
    plain, _ = _finetune(_method(tmp_path, name="um", flood=False), copy.deepcopy(start), 0.5)
    flooded, metrics = _finetune(_method(tmp_path, name="um"), copy.deepcopy(start), 0.5)
    assert plain[-1] < 0.1 < 1.0 < plain[0]  # plain CE memorises the batch
    assert abs(sum(flooded[-20:]) / 20 - 0.5) < 0.15  # UM hovers around ℓ̂ = 0.5
    assert min(flooded[-20:]) > 2 * plain[-1]
    assert 0.0 < metrics["um/ascent_fraction"] < 1.0
    same, _ = _finetune(_method(tmp_path, name="um"), copy.deepcopy(start), 1e-6, steps=10)
    ref, _ = _finetune(_method(tmp_path, name="um", flood=False), copy.deepcopy(start), 1e-6,
                       steps=10)
    assert same == pytest.approx(ref, rel=1e-5)


class _FakeDist:
    """A two-worker process group whose other worker's batch CE is ``other``."""

    def __init__(self, other: float) -> None:
        self.other = other

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def all_reduce(self, t: torch.Tensor) -> None:
        t += self.other


def test_ddp_floods_the_global_batch_mean(tmp_path, monkeypatch):
    """Under DDP the sign comes from the CE averaged over workers, not this worker's batch:
    here this worker's CE is below ℓ̂ but the global mean is above, so it descends."""
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    model = _random_linear()
    ce = F.cross_entropy(model(x)[0], y)
    ell = ce.item() + 0.5
    monkeypatch.setattr(um_module, "dist", _FakeDist(other=ce.item() + 2.0))  # mean = ce + 1
    um = _method(tmp_path, name="um")
    state = TrainState(extra={LOSS_CONSTRAINT: ell})
    loss = um.training_step(model, (x, y), None, state)
    assert loss.item() == pytest.approx(abs(ce.item() + 1.0 - ell) + ell)  # global value
    for g_got, g_ce in zip(_grads(model, loss), _grads(model, ce), strict=True):
        assert torch.allclose(g_got, g_ce, atol=1e-6)  # descent, though local CE < ℓ̂
    metrics = um.epoch_metrics(model, state)
    assert metrics["um/ascent_fraction"] == 0.0
    assert metrics["um/train_ce"] == pytest.approx(ce.item() + 1.0)
    # one process: flood_loss with the global mean equal to the local one is the plain flood
    w = torch.tensor(0.5, requires_grad=True)
    a, b = flood_loss(w**2, 1.0), flood_loss(w**2, 1.0, (w**2).detach())
    assert a.item() == pytest.approx(b.item())
    assert torch.autograd.grad(a, w)[0] == pytest.approx(torch.autograd.grad(b, w)[0].item())


def test_pad_crop_flip_is_a_shifted_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 2, 7, 5, generator=g)
    assert torch.equal(pad_crop_flip(x, 0, False, g), x)
    out = pad_crop_flip(x, 2, False, torch.Generator().manual_seed(1))
    padded = F.pad(x, (2, 2, 2, 2))
    windows = {(i, j) for i in range(5) for j in range(5)}
    for n in range(16):
        hits = [(i, j) for i, j in windows if torch.equal(out[n], padded[n, :, i:i + 7, j:j + 5])]
        assert hits, n
    assert not torch.equal(out, x)  # some image moved
    flipped = pad_crop_flip(x, 0, True, torch.Generator().manual_seed(2))
    same = [torch.equal(flipped[n], x[n]) for n in range(16)]
    assert all(s or torch.equal(flipped[n], x[n].flip(-1)) for n, s in enumerate(same))
    assert 0 < sum(same) < 16
    a = pad_crop_flip(x, 2, True, torch.Generator().manual_seed(4))
    assert torch.equal(a, pad_crop_flip(x, 2, True, torch.Generator().manual_seed(4)))


def test_um_pretrain_is_ce_on_augmented_images(tmp_path):
    pre = build_method(validate_spec(tiny_spec(
        tmp_path, method={"name": "um_pretrain", "crop_padding": 2, "hflip": True})))
    model = SmallCNN(num_classes=10, in_channels=1, width=4).eval()
    x, y = _data(8).tensors
    state = TrainState(step=3)
    aug = pad_crop_flip(x, 2, True, um_module.step_generator("cpu", 0, 0, 3))
    got = pre.training_step(model, (x, y), None, state)
    assert got.item() == pytest.approx(F.cross_entropy(model(aug)[0], y).item(), rel=1e-6)
    assert got.item() != pytest.approx(F.cross_entropy(model(x)[0], y).item(), rel=1e-6)
