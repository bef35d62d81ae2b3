"""LMD with the exact denoiser of a finite training set: the denoiser by hand, and the whole
Lift-Map-Detect pipeline separating ID from far-OOD when the model is not the bottleneck."""

from __future__ import annotations

import math

import pytest
import torch

from oodlab.data.registry import get_dataset
from oodlab.detect.diffusion import scoring
from oodlab.detect.diffusion.exact import ExactDenoiser
from oodlab.detect.diffusion.masks import alternating_masks
from oodlab.detect.diffusion.schedule import alphas_cumprod, q_sample
from oodlab.detect.diffusion.scoring import LMD
from oodlab.detect.metrics import ood_metrics
from tests.helpers import DATA_CACHE

ABAR = alphas_cumprod("linear", 1000)


# --- the denoiser by hand ----------------------------------------------------------------

def test_one_training_image_gives_back_the_true_noise():
    y = torch.rand(1, 1, 6, 6) * 2 - 1
    model = ExactDenoiser(y, ABAR)
    noise = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 400, 999])
    x_t = q_sample(y.expand(3, -1, -1, -1), t, noise, ABAR)
    assert torch.allclose(model.posterior_mean(x_t, t).float(), y.expand(3, -1, -1, -1),
                          atol=1e-6)
    assert torch.allclose(model(x_t, t), noise, atol=1e-4)


def test_two_images_posterior_weights_by_hand():
    y = torch.stack([torch.full((1, 2, 2), -0.5), torch.full((1, 2, 2), 0.5)])
    model = ExactDenoiser(y, ABAR)
    t = 300
    ab = float(model.alphas_cumprod[t])
    x = torch.full((1, 1, 2, 2), 0.1, dtype=torch.float64)
    d2 = [4 * (0.1 - math.sqrt(ab) * v) ** 2 for v in (-0.5, 0.5)]
    logits = [-d / (2 * (1 - ab)) for d in d2]
    w1 = 1 / (1 + math.exp(logits[0] - logits[1]))
    expected_x0 = -0.5 * (1 - w1) + 0.5 * w1
    out = model.posterior_mean(x, torch.tensor([t]))
    assert out.flatten().tolist() == pytest.approx([expected_x0] * 4, rel=1e-9)
    eps = model(x, torch.tensor([t]))
    assert eps.flatten().tolist() == pytest.approx(
        [(0.1 - math.sqrt(ab) * expected_x0) / math.sqrt(1 - ab)] * 4, rel=1e-5)


def test_chunking_does_not_change_the_result():
    g = torch.Generator().manual_seed(1)
    y = torch.rand(37, 1, 5, 5, generator=g) * 2 - 1
    x = torch.randn(4, 1, 5, 5, generator=g)
    t = torch.tensor([5, 50, 500, 990])
    whole = ExactDenoiser(y, ABAR, chunk=1000)(x, t)
    for chunk in (1, 7, 36):
        assert torch.allclose(ExactDenoiser(y, ABAR, chunk=chunk)(x, t), whole, atol=1e-5)


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="images"):
        ExactDenoiser(torch.zeros(0, 1, 4, 4), ABAR)
    with pytest.raises(ValueError, match="chunk"):
        ExactDenoiser(torch.zeros(2, 1, 4, 4), ABAR, chunk=0)


# --- the whole pipeline ------------------------------------------------------------------

def _images(name: str, split: str, n: int) -> torch.Tensor:
    ds = get_dataset(name, split=split, cache_dir=str(DATA_CACHE), seed=0, limit=n)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


@pytest.fixture(scope="module")
def sets() -> dict[str, torch.Tensor]:
    """300 MNIST training digits (the denoiser's data), 100 test digits, 100 photo patches
    and 100 binary blobs (far-OOD), all 28 x 28."""
    return {"train": _images("mnist", "train", 300), "id": _images("mnist", "test", 100),
            "photos": _images("photos", "test", 100), "blobs": _images("blobs", "test", 100)}


def _auroc(score: LMD, model: ExactDenoiser, sets: dict, ood: str, sign: float = 1.0) -> float:
    return ood_metrics(sign * score.score_batch(model, sets["id"]),
                       sign * score.score_batch(model, sets[ood]))["auroc"]


@pytest.mark.parametrize(("distance", "ood"), [("ssim", "photos"), ("mse", "blobs"),
                                               ("ssim", "blobs")])
def test_lmd_with_the_exact_denoiser_separates_far_ood(sets, distance, ood):
    torch.set_num_threads(1)
    model = ExactDenoiser.from_unit_images(sets["train"], ABAR)
    score = LMD(steps=5, attempts=2, block_size=4, distance=distance)
    assert _auroc(score, model, sets, ood) > 0.9
    # the sign matters: the same scores negated (higher = more OOD) are inverted
    assert _auroc(score, model, sets, ood, sign=-1.0) < 0.1


def test_a_mask_that_lifts_nothing_cannot_detect(sets, monkeypatch):
    """With every pixel known the reconstruction is the input: all scores tie (AUROC 0.5),
    so the separation above comes from the inpainted pixels."""
    model = ExactDenoiser.from_unit_images(sets["train"], ABAR)
    monkeypatch.setattr(scoring, "alternating_masks",
                        lambda size, block, r: torch.ones(r, 1, size, size))
    score = LMD(steps=5, attempts=2, block_size=4, distance="ssim")
    assert _auroc(score, model, sets, "photos") == pytest.approx(0.5)


@pytest.mark.parametrize(("size", "block"), [(28, 4), (28, 13), (32, 16), (8, 1)])
def test_valid_block_sizes_mask_some_but_not_all_pixels(size, block):
    for m in alternating_masks(size, block, 2):
        assert 0 < m.mean() < 1


# --- the ceiling benchmark ---------------------------------------------------------------

def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "lmd_ceiling.py"
    spec = importlib.util.spec_from_file_location("lmd_ceiling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mean_fill_control_by_hand():
    x = torch.zeros(1, 1, 8, 8)
    x[..., :4, :] = 1.0  # top half white: attempt 0 keeps 2 of 4 white and 2 of 4 black blocks
    s = _bench().mean_fill_scores(x, attempts=2, block=2)
    # both attempts: the holes (half the image) get the kept mean 0.5, each off by 0.5
    assert s["mse"].item() == pytest.approx(-0.5 * 0.25)  # similarity = -MSE
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert _bench().mean_fill_scores(flat, attempts=2, block=2)["mse"].item() == pytest.approx(
        0.0, abs=1e-12)


def test_ceiling_bench_writes_its_tables(tmp_path):
    out = tmp_path / "ceiling.md"
    _bench().main(["--id", "mnist", "--train-n", "60", "--n", "12", "--near", "letters",
                   "--far", "blobs", "--sanity", "--settings", "2x2", "--batch", "8",
                   "--cache-dir", str(DATA_CACHE), "--out", str(out), "--figure", ""])
    text = out.read_text()
    for row in ("| exact, mse |", "| exact, ssim |", "| mean-fill, mse |", "| mean-fill, ssim |"):
        assert row in text
    assert "2 steps × 2 attempts (4 denoiser calls per image" in text
