"""LMD pieces against hand-computed values: masks, schedule, sampler, distances, median, EMA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from torch import Tensor, nn

from oodlab.detect.diffusion.distances import median, mse, similarity, ssim
from oodlab.detect.diffusion.masks import alternating_masks, checkerboard
from oodlab.detect.diffusion.sampler import inpaint, network_calls, timesteps
from oodlab.detect.diffusion.schedule import alphas_cumprod, betas, q_sample
from oodlab.detect.diffusion.scoring import LMD, reconstruct
from oodlab.detect.scores import build_score
from oodlab.methods.ddpm import EMAModel
from oodlab.models.unet import DiffusionModel, UNet
from oodlab.spec import SpecError, validate_spec
from tests.helpers import tiny_spec


def tiny_model(timesteps: int = 20, seed: int = 0) -> DiffusionModel:
    torch.manual_seed(seed)
    unet = UNet(in_channels=1, image_size=8, channels=8, channel_mult=[1, 2],
                attention_resolutions=[4], dropout=0.0)
    return DiffusionModel(unet, alphas_cumprod("linear", timesteps)).eval()


class ConstantEps(nn.Module):
    """ε_θ ≡ 0 with a given ᾱ, counting its calls and their batch sizes."""

    def __init__(self, abar: list[float]) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", torch.tensor(abar))
        self.calls: list[int] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls.append(len(x))
        return torch.zeros_like(x)


# --- masks -------------------------------------------------------------------------------

def test_checkerboard_by_hand_and_complement_covers_every_pixel():
    expected = torch.tensor([[1, 1, 0, 0],
                             [1, 1, 0, 0],
                             [0, 0, 1, 1],
                             [0, 0, 1, 1]], dtype=torch.float)
    assert torch.equal(checkerboard(4, 2), expected)
    for size, block in ((4, 2), (28, 4), (28, 8), (32, 4), (7, 3)):
        m, c = checkerboard(size, block), checkerboard(size, block, complement=True)
        assert torch.equal(m + c, torch.ones(size, size)), (size, block)  # disjoint, complete
    assert checkerboard(32, 4).mean() == 0.5  # 8x8 blocks: exactly half inpainted


def test_alternating_masks_switch_to_the_complement_on_odd_attempts():
    ms = alternating_masks(8, 2, 5)
    assert ms.shape == (5, 1, 8, 8)
    for r in range(5):
        assert torch.equal(ms[r, 0], checkerboard(8, 2, complement=r % 2 == 1))
    assert torch.equal(ms[0] + ms[1], torch.ones(1, 8, 8))


def test_bad_block_size_is_an_error():
    with pytest.raises(ValueError, match="block_size"):
        checkerboard(8, 0)


# --- schedule ----------------------------------------------------------------------------

def test_linear_schedule_by_hand():
    b = betas("linear", 3)
    assert b.tolist() == pytest.approx([1e-4, 0.01005, 0.02])
    ab = alphas_cumprod("linear", 3)
    assert ab.tolist() == pytest.approx([0.9999, 0.9999 * 0.98995, 0.9999 * 0.98995 * 0.98])


def test_cosine_schedule_by_hand():
    # T = 2: f(u) = cos²((u + s)/(1 + s)·π/2); β_1 = 1 - f(1/2)/f(0); β_2 = 1 - f(1)/f(1/2)
    s = 0.008
    f = [math.cos((u + s) / (1 + s) * math.pi / 2) ** 2 for u in (0, 0.5, 1)]
    b = betas("cosine", 2)
    assert b[0].item() == pytest.approx(1 - f[1] / f[0])
    assert b[1].item() == pytest.approx(0.999)  # f(1) = 0, clipped


def test_q_sample_by_hand():
    abar = torch.tensor([0.64, 0.36])
    x0, noise = torch.full((2, 1, 1, 1), 1.0), torch.full((2, 1, 1, 1), 2.0)
    out = q_sample(x0, torch.tensor([0, 1]), noise, abar)
    assert out.flatten().tolist() == pytest.approx([0.8 + 0.6 * 2, 0.6 + 0.8 * 2])
    assert torch.equal(q_sample(x0, -1, noise, abar), x0)  # t = -1: the clean image


def test_strided_timesteps():
    assert timesteps(999, 1000) == list(range(999, -1, -1))  # the paper's 1000 steps
    assert timesteps(999, 4) == [999, 666, 333, 0]
    assert timesteps(3, 10) == [3, 2, 1, 0]
    assert network_calls(999, 100) == 100


# --- the inpainter -----------------------------------------------------------------------

def test_known_pixels_equal_the_renoised_original_at_every_step():
    model = tiny_model()
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    known = checkerboard(8, 2)
    seen: list[int] = []

    def check(t_prev: int, x: Tensor, noise: Tensor) -> None:
        seen.append(t_prev)
        ab = 1.0 if t_prev < 0 else float(model.alphas_cumprod[t_prev])
        expected = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise
        assert torch.allclose(x * known, expected * known, atol=1e-6), t_prev

    out = inpaint(model, x0, known, t_start=19, steps=5, generator=torch.Generator()
                  .manual_seed(0), on_step=check)
    assert seen == [14, 10, 5, 0, -1]
    assert torch.equal(out * known, x0 * known)
    assert not torch.allclose(out * (1 - known), x0 * (1 - known))  # the rest was inpainted


def test_nothing_masked_reconstructs_the_input_exactly():
    model = tiny_model()
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    out = inpaint(model, x0, torch.ones(1), t_start=19, steps=4,
                  generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, x0)


def test_deterministic_step_by_hand():
    # ε ≡ 0, η = 0, ᾱ = (0.81, 0.25), start at t = 1, nothing known:
    # x_1 = 0.5·x0 + sqrt(0.75)·z;  x̂0 = clip(x_1/0.5);  x_0 = 0.9·x̂0;  then x̂0 again.
    model = ConstantEps([0.81, 0.25])
    x0 = torch.full((1, 1, 2, 2), 0.5)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    out = inpaint(model, x0, torch.zeros(1), t_start=1, steps=2, eta=0.0,
                  generator=torch.Generator().manual_seed(3))
    expected = ((0.25 + math.sqrt(0.75) * z) / 0.5).clamp(-1, 1)
    assert torch.allclose(out, expected, atol=1e-6)


def test_all_attempts_of_a_batch_run_as_one_pass():
    model = ConstantEps(alphas_cumprod("linear", 50).tolist())
    x = torch.rand(3, 1, 8, 8)
    rec = reconstruct(model, x, masked=True, steps=7, attempts=4, block_size=2, eta=1.0,
                      noise_level=0.5, seed=0)
    assert rec.shape == (4, 3, 1, 8, 8)
    assert model.calls == [12] * 7  # 7 network calls, each on 3 images x 4 attempts
    for r in range(4):  # attempt r keeps the (complemented) checkerboard of x
        known = checkerboard(8, 2, complement=r % 2 == 1)
        assert torch.allclose(rec[r] * known, x * known, atol=1e-6)


# --- distances and aggregation -----------------------------------------------------------

def test_median_over_attempts_like_numpy():
    d = torch.tensor([[1.0, 2.0, 3.0, 10.0], [4.0, 4.0, 0.0, 1.0]])
    assert median(d).tolist() == [2.5, 2.5]  # even count: mean of the two middle values
    assert median(torch.tensor([[3.0, 1.0, 2.0]])).tolist() == [2.0]


def test_mse_by_hand():
    a, b = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    assert mse(a, b).item() == pytest.approx((1 + 0.25) / 4)


def test_ssim_by_hand_and_against_skimage():
    a, b = torch.full((1, 1, 7, 7), 0.2), torch.full((1, 1, 7, 7), 0.4)
    c1 = 0.01 ** 2  # constant images: the structure term is c2/c2
    assert ssim(a, b).item() == pytest.approx((2 * 0.2 * 0.4 + c1) / (0.04 + 0.16 + c1), rel=1e-6)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 1, 12, 12, generator=g), torch.rand(2, 1, 12, 12, generator=g)
    ours = ssim(x, y)
    for i in range(2):
        ref = structural_similarity(x[i, 0].numpy().astype(np.float64),
                                    y[i, 0].numpy().astype(np.float64), data_range=1.0)
        assert ours[i].item() == pytest.approx(ref, abs=1e-5)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0])


# --- scores ------------------------------------------------------------------------------

def test_lmd_score_is_higher_for_better_reconstructions():
    model = ConstantEps(alphas_cumprod("linear", 50).tolist())
    x = torch.rand(4, 1, 8, 8)
    score = LMD(steps=3, attempts=3, block_size=2)
    s = score.score_batch(model, x)
    rec = reconstruct(model, x, masked=True, steps=3, attempts=3, block_size=2, eta=1.0,
                      noise_level=0.5, seed=0)
    per_attempt = torch.stack([-mse(x, r) for r in rec], 1)
    assert torch.allclose(s, per_attempt.median(1).values)  # odd count: the middle one
    assert (s <= 0).all()
    assert score.network_calls(50) == 9


def test_score_params_are_checked_with_clear_errors():
    with pytest.raises(ValueError, match="lpips"):
        build_score("lmd", distance="lpips", lpips_weights="/models/alex.pth")
    with pytest.raises(ValueError, match="lmd.attempts"):
        build_score("lmd", attempts=0)
    with pytest.raises(ValueError, match="noise_level"):
        build_score("diffusion_recon", noise_level=0)
    with pytest.raises(ValueError, match="bad parameters"):
        build_score("lmd", stepz=3)


# --- method ------------------------------------------------------------------------------

def test_ema_update_by_hand():
    """TF-style warm-up d = min(decay, (1 + n) / (10 + n)); the first update copies."""
    net = nn.Linear(1, 1, bias=False)
    ema = EMAModel(net, decay=0.999)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(0)  # first update: the average is the network
    assert ema.ema.weight.item() == pytest.approx(1.0)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema.update(0)  # the same step again: no-op
    assert ema.ema.weight.item() == pytest.approx(1.0)
    ema.update(1)  # n = 1: d = 2/11, so 2/11 · 1 + 9/11 · 0
    assert ema.ema.weight.item() == pytest.approx(2 / 11)
    assert not ema.ema.weight.requires_grad


def ddpm_spec(tmp_path, **kw) -> dict:
    base = {"method": {"name": "ddpm", "channels": 8, "channel_mult": [1, 2]},
            "eval": {"scores": ["lmd"]}}
    return tiny_spec(tmp_path, **(base | kw))


def test_ddpm_spec_errors_name_the_field(tmp_path):
    with pytest.raises(SpecError, match="eval.scores"):
        validate_spec(tiny_spec(tmp_path, method={"name": "ddpm"}, eval={"scores": ["msp"]}))
    with pytest.raises(SpecError, match="image_size"):
        validate_spec(ddpm_spec(tmp_path, data={"image_size": 27}))
    with pytest.raises(SpecError, match="lpips"):
        validate_spec(ddpm_spec(tmp_path, eval={"scores": ["lmd"], "score_params": {
            "lmd": {"distance": "lpips"}}}))
    with pytest.raises(SpecError, match="beta_end"):
        validate_spec(tiny_spec(tmp_path, method={"name": "ddpm", "beta_end": 1e-5},
                                eval={"scores": ["lmd"]}))


def test_a_block_covering_the_whole_image_is_a_spec_error(tmp_path):
    for block in (28, 40):
        with pytest.raises(SpecError, match=r"eval.score_params.lmd.block_size"):
            validate_spec(ddpm_spec(tmp_path, eval={"scores": ["lmd"], "score_params": {
                "lmd": {"block_size": block}}}))
    validate_spec(ddpm_spec(tmp_path, eval={"scores": ["lmd"], "score_params": {
        "lmd": {"block_size": 14}}}))  # 2 x 2 blocks: half the image is lifted
    # the baseline has no mask: its block_size is unused and not checked
    validate_spec(ddpm_spec(tmp_path, eval={"scores": ["diffusion_recon"], "score_params": {
        "diffusion_recon": {"block_size": 28}}}))
    with pytest.raises(ValueError, match="block_size"):  # outside a spec: at scoring time
        LMD(steps=2, attempts=2, block_size=8).score_batch(
            ConstantEps(alphas_cumprod("linear", 10).tolist()), torch.rand(2, 1, 8, 8))


def test_similarity_signs_identical_is_most_id_corrupted_is_more_ood():
    """similarity() is 'higher = more ID' for every distance: the identical image scores
    highest (SSIM 1, -MSE 0); a corrupted reconstruction scores lower, more so when worse."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=g)
    noise = torch.rand(3, 1, 16, 16, generator=g) - 0.5
    slight, heavy = (x + 0.1 * noise).clamp(0, 1), (x + 0.8 * noise).clamp(0, 1)
    for distance in ("ssim", "mse"):
        same = similarity(distance, x, x)
        a, b = similarity(distance, x, slight), similarity(distance, x, heavy)
        assert same.tolist() == pytest.approx([1.0 if distance == "ssim" else 0.0] * 3)
        assert (same > a).all() and (a > b).all(), distance


class RecordingEps(nn.Module):
    """ε_θ ≡ 0 that records the (x_t, t) it is called with."""

    def __init__(self, abar: Tensor) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", abar.float())
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.seen.append((x.clone(), t.clone()))
        return torch.zeros_like(x) + 0 * self.weight


def test_ddp_ranks_draw_their_own_timesteps_and_noise(tmp_path):
    """Every rank of one step draws different t and ε (the loop seeds the global RNG the same
    on all ranks); the same (rank, step) draws the same, whatever the global RNG state."""
    from oodlab.methods.base import TrainState
    from oodlab.registry import METHODS

    method = METHODS.get("ddpm")(validate_spec(ddpm_spec(tmp_path)))
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def draw(rank: int, step: int) -> tuple[Tensor, Tensor]:
        torch.manual_seed(123)  # what train_fn_per_worker does on every rank
        net = RecordingEps(alphas_cumprod("linear", 1000))
        method.training_step(EMAModel(net, 0.9), (x, torch.zeros(16)), None,
                             TrainState(rank=rank, world_size=2, step=step))
        return net.seen[0]

    (x0, t0), (x1, t1) = draw(0, 5), draw(1, 5)
    assert not torch.equal(t0, t1) and not torch.allclose(x0, x1)
    again_x, again_t = draw(1, 5)
    assert torch.equal(again_t, t1) and torch.equal(again_x, x1)
    later_x, later_t = draw(1, 6)
    assert not torch.equal(later_t, t1)  # a fresh draw every optimizer step
