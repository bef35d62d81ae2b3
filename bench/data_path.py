"""Which data path feeds training: decoding in the training process, in DataLoader
processes (``resources.loader_workers``), or through Ray Data.

Run:  .venv/bin/python bench/data_path.py [--images 20000] [--files 4000]

Two datasets, as oodlab reads them:

* ``in-memory``: the Fashion-MNIST training split (uint8 arrays in RAM; "decoding" is the
  conversion to a float tensor), ``--images`` images;
* ``files``: ``--files`` PNG files (64 x 64 RGB, 10 class folders) written here to a temp
  dir and read by oodlab's ``imagefolder`` loader (Pillow decode + antialiased resize to 32).

For each, one epoch of 128-image batches through each path, timed from the first batch:

1. **data only** - how many images/s the path delivers to an idle consumer;
2. **training** - images/s of a plain SGD loop on SmallCNN (width 32, one torch thread: one
   Ray Train worker with one CPU) fed by that path.

Ray Data: ``from_numpy`` + ``map_batches`` (in-memory) and ``read_images`` (files), consumed
with ``iter_torch_batches``; its tasks run on the Ray this benchmark starts (all CPUs). The
choice the figures justify is written in docs/benchmarks.md. Writes
bench/results/data_path.json and docs/results/data_path.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchlib import header, write_result

BATCH = 128


def consume(batches: Iterable, step: Callable[[torch.Tensor, torch.Tensor], None] | None
            ) -> float:
    """Images/s of one pass, timed from the first batch (start-up excluded)."""
    it = iter(batches)
    x, y = next(it)
    if step:
        step(x, y)
    t0, n = time.perf_counter(), 0
    for x, y in it:
        if step:
            step(x, y)
        n += len(x)
    return n / (time.perf_counter() - t0)


def sgd_step(in_channels: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    from oodlab.models.cnn import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(10, in_channels=in_channels, width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x.float())[0], y.long()).backward()
        opt.step()

    return step


def write_pngs(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth-ish, compressible
        img = Image.fromarray(base).resize((64, 64), Image.BILINEAR)
        img.save(d / f"{i:05d}.png")


def ray_batches(kind: str, ds, root: Path | None) -> Iterable:
    """A Ray Data stream of (x [B, C, S, S] float in [0, 1], y) batches of one epoch."""
    import ray.data

    if kind == "in-memory":
        images = ds.images  # N x S x S x C uint8
        rd = ray.data.from_numpy(images).map_batches(
            lambda b: {"x": b["data"].transpose(0, 3, 1, 2).astype(np.float32) / 255.0,
                       "y": np.zeros(len(b["data"]), dtype=np.int64)}, batch_format="numpy")
    else:
        rd = ray.data.read_images(str(root), size=(32, 32), mode="RGB", include_paths=True)
        rd = rd.map_batches(
            lambda b: {"x": b["image"].transpose(0, 3, 1, 2).astype(np.float32) / 255.0,
                       "y": np.array([int(Path(p).parent.name[1:]) for p in b["path"]])},
            batch_format="numpy")
    return ((b["x"], b["y"]) for b in rd.iter_torch_batches(batch_size=BATCH))


def measure(kind: str, ds, root: Path | None, channels: int) -> dict[str, dict[str, float]]:
    from oodlab.data.bundle import train_loader

    paths: dict[str, Callable[[], Iterable]] = {
        f"{w} loader process{'es' * (w > 1)}" if w else "training process":
            (lambda w=w: train_loader(ds, BATCH, seed=0, workers=w)[0]) for w in (0, 1, 2)}
    paths["Ray Data"] = lambda: ray_batches(kind, ds, root)
    out: dict[str, dict[str, float]] = {}
    for name, make in paths.items():
        data_only = consume(make(), None)
        training = consume(make(), sgd_step(channels)) if name != "2 loader processes" else None
        out[name] = {"data_only": data_only, "training": training}
        print(f"{kind:>9} | {name:<20} | data only {data_only:9.0f} img/s | training "
              f"{'-' if training is None else f'{training:7.0f}'} img/s", flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4))
    axes = fig.subplots(1, 2)
    for ax, (kind, res) in zip(axes, results.items(), strict=True):
        names = list(res)
        xs = np.arange(len(names))
        ax.bar(xs - 0.2, [res[n]["data_only"] for n in names], 0.4, label="data only")
        ax.bar(xs + 0.2, [res[n]["training"] or 0 for n in names], 0.4, label="training")
        ax.set_xticks(xs, [n.replace(" process", "\nprocess") for n in names], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("images/s")
        ax.set_title(kind, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=4_000)
    parser.add_argument("--out", default="bench/results/data_path.json")
    parser.add_argument("--figure", default="docs/results/data_path.png")
    args = parser.parse_args(argv)

    import ray

    from oodlab.data import get_dataset

    torch.set_num_threads(1)  # the training process: one Ray Train worker with one CPU
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    fmnist = get_dataset("fashion_mnist", split="train", limit=args.images)
    results["in-memory"] = measure("in-memory", fmnist, None, 1)
    with tempfile.TemporaryDirectory() as tmp:
        write_pngs(Path(tmp), args.files)
        files = get_dataset("imagefolder", split="test", root=tmp, image_size=32, channels=3)
        results["files"] = measure("files", files, Path(tmp), 3)
    ray.shutdown()
    plot(results, Path(args.figure))

    def training(kind: str, path: str) -> float:
        return results[kind][path]["training"]

    main_proc = "training process"
    summary = []
    for kind, res in results.items():
        summary += [
            {"figure": f"data path, {kind}: training images/s with 1 loader process ÷ "
                       "decoding in the training process",
             "value": f"{training(kind, '1 loader process') / training(kind, main_proc):.2f}"},
            {"figure": f"data path, {kind}: training images/s with Ray Data ÷ decoding in "
                       "the training process",
             "value": f"{training(kind, 'Ray Data') / training(kind, main_proc):.2f}"},
            {"figure": f"data path, {kind}: images/s the training process decodes ÷ images/s "
                       "it trains (> 10: decoding is not the bottleneck)",
             "value": f"{res[main_proc]['data_only'] / training(kind, main_proc):.1f}"}]
    result = header("data_path", "bench/data_path.py", argv) | {
        "images": args.images, "files": args.files, "batch_size": BATCH, "results": results,
        "figure": args.figure, "summary": summary}
    print(write_result(args.out, result).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
