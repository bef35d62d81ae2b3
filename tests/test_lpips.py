"""LPIPS by path: equal to the reference ``lpips`` package with the same weights, never
downloaded, and clear errors for missing or wrong weight files."""

from __future__ import annotations

from pathlib import Path

import lpips as lpips_ref  # the reference package (a dev dependency; ships alex.pth)
import pytest
import torch

from oodlab.detect.diffusion.distances import similarity
from oodlab.detect.diffusion.lpips import LPIPS
from oodlab.detect.scores import build_score


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """A seeded random AlexNet (no real weights can be downloaded here) and lpips' own
    v0.1 linear calibration weights, as files."""
    from torchvision.models import alexnet

    root = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    backbone = root / "alexnet.pth"
    torch.save(alexnet(weights=None).state_dict(), backbone)
    linear = Path(lpips_ref.__file__).parent / "weights" / "v0.1" / "alex.pth"
    return {"backbone": str(backbone), "linear": str(linear)}


def reference(weights: dict[str, str]):
    net = lpips_ref.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(weights["backbone"], weights_only=True)
    for slice_ in (net.net.slice1, net.net.slice2, net.net.slice3, net.net.slice4,
                   net.net.slice5):  # the slices name their layers by AlexNet's indices
        slice_.load_state_dict({k: state[f"features.{k}"] for k in slice_.state_dict()})
    return net.eval()


def test_lpips_equals_the_reference_package(weights):
    torch.manual_seed(1)
    a, b = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    ours = LPIPS.from_paths(weights)(a, b)
    ref = reference(weights)(a, b, normalize=True).flatten()
    assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)
    assert torch.equal(LPIPS.from_paths(weights)(a, a), torch.zeros(4))
    assert (ours > 0).all()


def test_grayscale_28px_is_repeated_and_resized_like_lmd(weights):
    torch.manual_seed(2)
    a, b = torch.rand(3, 1, 28, 28), torch.rand(3, 1, 28, 28)
    up = torch.nn.functional.interpolate
    a3 = up(a.repeat(1, 3, 1, 1), size=(32, 32), mode="bilinear", align_corners=False)
    b3 = up(b.repeat(1, 3, 1, 1), size=(32, 32), mode="bilinear", align_corners=False)
    ref = reference(weights)(a3, b3, normalize=True).flatten()
    assert torch.allclose(LPIPS.from_paths(weights)(a, b), ref, atol=1e-5)
    assert torch.allclose(similarity("lpips", a, b, weights), -ref, atol=1e-5)


def test_lmd_score_with_lpips_weights_and_clear_errors(weights, tmp_path):
    score = build_score("lmd", distance="lpips", lpips_weights=weights, steps=2, attempts=2)
    assert score.config()["lpips_weights"] == weights  # travels with the served detector
    with pytest.raises(ValueError, match="lpips_weights.backbone: no file at"):
        build_score("lmd", distance="lpips",
                    lpips_weights=weights | {"backbone": str(tmp_path / "none.pth")})
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a torch weights file"):
        build_score("lmd", distance="lpips", lpips_weights=weights | {"backbone": str(bad)})
    wrong = tmp_path / "wrong.pth"
    torch.save({"lin0.model.1.weight": torch.ones(1, 3, 1, 1)}, wrong)
    with pytest.raises(ValueError, match="lin0.model.1.weight of shape"):
        build_score("lmd", distance="lpips", lpips_weights=weights | {"linear": str(wrong)})
    with pytest.raises(ValueError, match="missing \\['linear'\\]"):
        build_score("lmd", distance="lpips", lpips_weights={"backbone": weights["backbone"]})
