"""bench/lmd_gpu.py: the plain-PyTorch train/score/report path used on the accelerator machine.

The report's numbers are checked on hand-made similarities (known separations, known best
setting); the run is checked end to end on the CPU with a tiny U-Net, with a second run that
scores the first one's checkpoint and a report that merges both.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "lmd_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("lmd_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


GROUPS = {"near": ["near_set"], "far": ["far_set"], "sanity": ["noise"]}


def _facts(passes: list[dict], sweep: list[int]) -> dict:
    return {"spec": "jobs/lmd.yaml", "overrides": [], "device": "test", "torch": "x",
            "argv": ["run"], "groups": GROUPS, "batch": 4, "attempts": 10, "passes": passes,
            "sweep_steps": sweep, "lmd_steps": 100,
            "train": {"optimizer_steps": 7, "spec_steps": 100, "batch_size": 2, "epochs": 0.1,
                      "train_images": 100, "wall_s": 1.0, "images_per_s": 14.0,
                      "log_every": 1, "loss": [1.0, 0.5], "precision": "float32",
                      "ema_decay": 0.999}}


def _write(folder: Path, facts: dict, scores: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    (folder / "lmd_gpu.json").write_text(json.dumps(facts))
    np.savez(folder / "scores.npz", **scores)
    return folder


def test_report_reads_aurocs_and_picks_the_cheapest_setting_near_the_reference(tmp_path):
    """ID similarities 0..1, near-OOD below ID (AUROC 1) for every setting but 5 steps with
    one attempt (where near-OOD equals ID: AUROC 0.5): the cheapest setting within 0.01 of the
    reference is 5 steps x 2 attempts, 40x fewer calls than 20 x 10."""
    rng = np.random.default_rng(0)
    scores = {}
    n = 40
    for steps in (20, 5):
        idn = rng.uniform(0.5, 1.0, (n, 10)).astype(np.float32)
        for name, v in (("id_test", idn), ("near_set", idn - 1.0), ("far_set", idn - 2.0),
                        ("noise", idn - 3.0)):
            v = v.copy()
            if steps == 5 and name == "near_set":
                v[:, 0] = idn[:, 0]  # attempt 1 alone cannot tell near-OOD from ID
            for dist in ("mse", "ssim"):
                scores[f"ddpm/lmd/{dist}/{steps}/0/{name}"] = v
    facts = _facts([dict(model="ddpm", score="lmd", steps=s, batch=0, images=4 * n,
                         calls_per_image=10 * s, wall_s=1.0, unet_calls_per_s=1.0)
                    for s in (20, 5)], [20, 5])
    src = _write(tmp_path / "run", facts, scores)
    out = tmp_path / "doc" / "lmd_gpu.md"
    _bench().main(["report", str(src), "--out", str(out), "--boot", "20"])
    text = out.read_text()
    assert "reference 20 steps x 10 attempts = 200 calls, near+far AUROC 1.000" in text
    assert "Fewest calls within 0.01 of it: 5 x 2 = 10 calls, AUROC 1.000" in text
    assert "| mse | 5 | 0.750 | 1.000 |" in text  # near 0.5, far 1.0 -> mean 0.75
    assert (tmp_path / "doc" / "lmd_gpu_cost.png").stat().st_size > 0
    assert "reconstruction baseline, MSE | not run" in text
    assert "published, LMD" in text  # the paper's Fashion-MNIST -> MNIST number has a row
    # notes after the marker survive a regeneration
    out.write_text(text + "hand-written note\n")
    _bench().main(["report", str(src), "--out", str(out), "--boot", "20"])
    assert out.read_text().endswith("hand-written note\n")


def test_report_needs_the_training_run_first(tmp_path):
    facts = _facts([], [20])
    del facts["train"]
    src = _write(tmp_path / "run", facts, {"ddpm/lmd/mse/20/0/id_test": np.zeros((2, 10))})
    with pytest.raises(SystemExit, match="first folder must be the run that trained"):
        _bench().main(["report", str(src), "--out", str(tmp_path / "x.md")])


def _tiny_data(path: Path) -> None:
    """Bright squares as ID, dark noise as OOD: anything trained at all separates them."""
    rng = np.random.default_rng(0)
    train = np.zeros((96, 1, 28, 28), np.uint8)
    train[:, :, 6:22, 6:22] = 200
    ood = rng.integers(0, 60, (8, 1, 28, 28), dtype=np.uint8)
    np.savez(path, train=train, spec="jobs/lmd.yaml", **{"set/id_test": train[:8],
             "set/mnist": ood, "set/photos": ood[::-1].copy()},
             groups=json.dumps({"near": ["mnist"], "far": ["photos"], "sanity": []}))


@pytest.mark.slow
def test_run_trains_scores_and_a_second_run_scores_its_checkpoint(tmp_path):
    data = tmp_path / "data.npz"
    _tiny_data(data)
    small = ["--set", "method.channels=8", "method.num_res_blocks=1", "data.batch_size=16",
             "method.sample_steps=3", "eval.score_params.lmd.steps=3",
             "eval.score_params.diffusion_recon.steps=3"]
    common = ["--data", str(data), "--device", "cpu", *small, "--sweep-steps", "4", "2",
              "--batch", "4", "--max-batches", "2", "--exact-train", "16", "--margin", "0"]
    env_cmd = [sys.executable, str(SCRIPT), "run"]
    first = tmp_path / "run1"
    subprocess.run([*env_cmd, *common, "--out", str(first), "--train-seconds", "3",
                    "--probe-steps", "5", "--log-every", "2", "--deadline", "120",
                    "--skip", "ddpm/diffusion_recon/3/1"], check=True, cwd=ROOT, timeout=300)
    facts = json.loads((first / "lmd_gpu.json").read_text())
    assert facts["train"]["optimizer_steps"] >= 5 and facts["train"]["loss"]
    assert (first / "samples.png").stat().st_size > 0 and (first / "ema_bf16.pt").is_file()
    done = {(p["model"], p["score"], p["steps"], p["batch"]) for p in facts["passes"]
            if not p.get("skipped")}
    assert ("ddpm", "lmd", 3, 0) in done and ("ddpm", "lmd", 4, 0) in done
    assert ("ddpm", "diffusion_recon", 3, 1) not in done  # --skip
    second = tmp_path / "run2"
    subprocess.run([*env_cmd, *common, "--out", str(second), "--checkpoint",
                    str(first / "ema_bf16.pt"), "--deadline", "120", "--skip",
                    *[f"{m}/{s}/{t}/{b}" for m, s, t, b in done]],
                   check=True, cwd=ROOT, timeout=300)
    facts2 = json.loads((second / "lmd_gpu.json").read_text())
    assert [(p["model"], p["score"], p["batch"]) for p in facts2["passes"]] == [
        ("ddpm", "diffusion_recon", 1)]
    out = tmp_path / "lmd_gpu.md"
    _bench().main(["report", str(first), str(second), "--out", str(out), "--boot", "20"])
    text = out.read_text()
    assert "| reconstruction baseline, MSE | 8 |" in text  # batches 0 and 1 of 4 images
    assert "| LMD, MSE | 8 |" in text and "LMD − reconstruction baseline, MSE" in text
    assert (tmp_path / "lmd_gpu_samples.png").is_file()
