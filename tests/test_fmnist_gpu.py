"""bench/fmnist_gpu.py: the Fashion-MNIST baselines trained without Ray, recorded into MLflow.

The accelerator path must train on the same batches as the platform's loader, rebuild every
split of the export bit for bit (split hashes), fine-tune ``init_from`` specs from the same
seed's run, and come back as an ``oodlab results`` table. Run here on the CPU at toy size.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from oodlab.data.bundle import set_epoch, train_loader
from oodlab.data.types import ImageDataset
from tests.test_fashion_mnist import write_fashion

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "fmnist_gpu.py"


def _bench():
    """The script as the module ``fmnist_gpu`` (importable by name: its seed processes are
    spawned, and a spawned child imports the function it runs)."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    return importlib.import_module("fmnist_gpu")


def test_device_batches_are_the_platform_loaders_batches():
    """Same sampler, same seed, same epochs: the batches indexed from device tensors equal
    the ones the platform's DataLoader collates, epoch after epoch (drop_last included)."""
    bench = _bench()
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(203, 8, 8, 1, generator=g) * 255).to(torch.uint8).numpy()
    ds = ImageDataset("toy", images, torch.arange(203).numpy() % 3, ["a", "b", "c"])
    loader, sampler = train_loader(ds, 16, seed=5)
    _, sampler2 = train_loader(ds, 16, seed=5)
    x, y = bench.on_device(ds, torch.device("cpu"))
    for epoch in range(2):
        set_epoch(sampler, 5, epoch)
        want = list(loader)
        set_epoch(sampler2, 5, epoch)
        got = list(bench.gpu_batches(x, y, sampler2, 16))
        assert len(got) == len(want) == 203 // 16
        for (xa, ya), (xb, yb) in zip(want, got, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_overrides_for_one_spec_or_all():
    bench = _bench()
    sets = ["train.epochs=1", "fmnist_resnet18:model.width=64", "eval.scores=[a,b]"]
    assert bench.overrides_for("jobs/fmnist_resnet18.yaml", sets) == [
        "train.epochs=1", "model.width=64", "eval.scores=[a,b]"]
    assert bench.overrides_for("jobs/fmnist_oe.yaml", sets) == [
        "train.epochs=1", "eval.scores=[a,b]"]


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion(tmp_path_factory.mktemp("fmnist-gpu"))


@pytest.mark.slow
def test_export_run_record_round_trip(tmp_path, fashion_root):
    """Two exports (the second referencing the first's images) rebuild both seeds' bundles
    with the export's split hashes; a run of the supervised spec and its energy-OE fine-tune
    per seed lands in MLflow and in the results table with both seeds and the paired rows."""
    bench = _bench()
    data = [f"data.root={fashion_root}", "data.limit=40"]
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    bench.main(["export", "--seeds", "0", "--set", *data, "--out", str(a)])
    bench.main(["export", "--seeds", "1", "--set", *data, "--base", str(a), "--out", str(b)])
    import numpy as np

    assert len(bench.read_pool(np.load(b))) < len(bench.read_pool(np.load(a)))  # a lacks them
    bundles, meta = bench.load_bundles([str(a), str(b)])
    from oodlab.detect.provenance import bundle_split_tags

    assert sorted(bundles) == [0, 1]
    for seed in (0, 1):
        assert bundle_split_tags(bundles[seed]) == meta[f"{seed}/split_tags"]

    out = tmp_path / "out"
    specs = ["jobs/fmnist_supervised.yaml", "jobs/fmnist_energy_oe.yaml"]
    bench.main(["run", "--data", str(a), str(b), "--out", str(out),  # seeds: both exported
                "--specs", *specs, "--set", "train.epochs=1", "eval.scores=[energy,msp]",
                "data.batch_size=8", "data.oe_batch_size=8",
                f"data.root={fashion_root}", "--threads", "1", "--throughput-steps", "0",
                "--deadline", "550", "--code", "test"])
    facts = json.loads((out / "facts.json").read_text())
    assert facts["exit_codes"] == [0, 0]
    runs = [json.loads(line) for p in sorted(out.glob("runs-*.jsonl"))
            for line in p.read_text().splitlines()]
    assert sorted((r["spec"]["name"], r["seed"]) for r in runs) == [
        ("fmnist_energy_oe", 0), ("fmnist_energy_oe", 1),
        ("fmnist_supervised", 0), ("fmnist_supervised", 1)]
    for r in runs:
        assert r["facts"]["optimizer_steps"] == r["facts"]["steps_per_epoch"] >= 1
        assert len(r["history"]) == 1 and "val/auroc" in r["history"][0]
        assert 0.0 <= r["metrics"]["test/auroc"] <= 1.0
    # the 1 GPU vs CPU figure's timing: SmallCNN and ResNet-18 steps through the same set-up
    rates = bench.throughput(argparse.Namespace(set=["data.batch_size=8"]), bundles[0],
                             torch.device("cpu"), 1, 2)
    assert sorted(rates) == ["resnet18_w32/cpu/1t", "small_cnn_w32/cpu/1t"], rates
    assert all(v > 0 for v in rates.values())
    tuned = {r["seed"]: r for r in runs if r["spec"]["name"] == "fmnist_energy_oe"}
    assert tuned[0]["tags"]["oodlab.init_from"] == "spec:fmnist_supervised"

    doc = tmp_path / "t.md"
    bench.main(["record", str(out), "--workdir", str(tmp_path / "w"), "--name", "t",
                "--out", str(doc), "--scores", "energy"])
    text = doc.read_text()
    assert "plain processes (bench/fmnist_gpu.py)" in text  # the runs' hardware, not ours
    assert "| fmnist_energy_oe | energy_oe | energy |" in text
    assert text.count("(n=2)") >= 10  # both seeds behind every cell of both rows
    assert "| fmnist_energy_oe | energy |" in text  # the paired difference row
