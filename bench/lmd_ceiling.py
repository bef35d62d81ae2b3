"""LMD's ceiling on Fashion-MNIST: Lift-Map-Detect scored with the exact denoiser of a
bounded subset of the Fashion-MNIST training images instead of a trained DDPM.

The exact denoiser (``oodlab.detect.diffusion.exact``) is the ε-predictor a DDPM trained to
convergence on that subset approximates, so this measures what the project's sampler, masks,
distances and median over attempts reach when the model is not the bottleneck (Liu et al.,
ICML 2023, "Unsupervised Out-of-Distribution Detection with Diffusion Inpainting").
Every attempt's reconstruction is scored with MSE and SSIM (one sampling pass for both).

    OMP_NUM_THREADS=1 nice -n 10 python bench/lmd_ceiling.py --train-n 5000 --n 200 \\
        --settings 5x2 25x4
"""

from __future__ import annotations

import argparse
import os
import platform as stdlib_platform
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from oodlab.data.registry import get_dataset
from oodlab.detect.diffusion.distances import median, similarity
from oodlab.detect.diffusion.exact import ExactDenoiser
from oodlab.detect.diffusion.masks import alternating_masks
from oodlab.detect.diffusion.sampler import network_calls
from oodlab.detect.diffusion.schedule import alphas_cumprod
from oodlab.detect.diffusion.scoring import reconstruct
from oodlab.detect.metrics import ood_metrics
from oodlab.report.results import write_keeping_notes

GROUPS = {"near": ["mnist", "letters"], "far": ["photos", "synth_textures", "blobs"],
          "sanity": ["gaussian", "rademacher"]}  # the Fashion-MNIST benchmark's test groups
DISTANCES = ("mse", "ssim")
INPAINTERS = ("exact", "mean-fill")


def load(name: str, split: str, n: int, seed: int, cache_dir: str | None) -> Tensor:
    """The first ``n`` images (seeded order) of a split, [n, 1, 28, 28] in [0, 1]."""
    ds = get_dataset(name, split=split, seed=seed, limit=n, cache_dir=cache_dir)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


def parse_setting(text: str) -> tuple[int, int]:
    steps, attempts = text.lower().split("x")
    return int(steps), int(attempts)


def score_set(model: ExactDenoiser, x: Tensor, *, steps: int, attempts: int, block: int,
              batch: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """LMD scores of a set for every distance (higher = more ID), batch i seeded with
    ``seed + i`` as ``LMD.score_batch``; also the reconstructions of the first batch."""
    out: dict[str, list[Tensor]] = {d: [] for d in DISTANCES}
    first = None
    for i, lo in enumerate(range(0, len(x), batch)):
        xb = x[lo:lo + batch]
        rec = reconstruct(model, xb, masked=True, steps=steps, attempts=attempts,
                          block_size=block, eta=1.0, noise_level=0.5, seed=seed + i)
        if first is None:
            first = rec
        for d in DISTANCES:
            out[d].append(median(torch.stack([similarity(d, xb, r) for r in rec], 1)))
    return {d: torch.cat(v) for d, v in out.items()}, first


def mean_fill_scores(x: Tensor, *, attempts: int, block: int) -> dict[str, Tensor]:
    """The model-free control: every lifted pixel filled with the mean of the image's kept
    pixels, same masks, distances and median as LMD. A detector that does no better than
    this has learned nothing about the ID set."""
    sims: dict[str, list[Tensor]] = {d: [] for d in DISTANCES}
    for known in alternating_masks(x.shape[-1], block, attempts):
        fill = (x * known).sum((1, 2, 3), keepdim=True) / (known.sum() * x.shape[1])
        rec = known * x + (1 - known) * fill
        for d in DISTANCES:
            sims[d].append(similarity(d, x, rec))
    return {d: median(torch.stack(v, 1)) for d, v in sims.items()}


def group_means(per_set: dict[str, float], groups: dict[str, list[str]]) -> dict[str, float]:
    means = {g: sum(per_set[s] for s in sets) / len(sets) for g, sets in groups.items() if sets}
    headline = groups["near"] + groups["far"]
    return means | {"near+far": sum(per_set[s] for s in headline) / len(headline)}


def figure(path: Path, images: dict[str, Tensor], recs: dict[str, Tensor], block: int,
           title: str) -> None:
    """Per set: an image, what attempt 0 keeps, and attempt 0 / 1 reconstructions."""
    from matplotlib.figure import Figure

    names = list(images)
    known = alternating_masks(images[names[0]].shape[-1], block, 2)
    fig = Figure(figsize=(2 * 4 * 0.9, len(names) * 0.95))
    axes = fig.subplots(len(names), 8)
    cols = ("image", "kept (attempt 0)", "recon 0", "recon 1") * 2
    for r, name in enumerate(names):
        for k in range(2):
            x, rec = images[name][k, 0], recs[name][:, k, 0]
            panels = (x, x * known[0, 0] + 0.5 * (1 - known[0, 0]), rec[0], rec[1])
            for c, img in enumerate(panels):
                ax = axes[r, 4 * k + c]
                ax.imshow(img.clamp(0, 1), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(cols[c], fontsize=6)
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fmt(v: float) -> str:
    return f"{v:.3f}"


def groups_of(args: argparse.Namespace) -> dict[str, list[str]]:
    return {"near": list(args.near), "far": list(args.far), "sanity": list(args.sanity)}


def auroc_table(auroc: dict[str, float], groups: dict[str, list[str]], label: str) -> str:
    sets = [s for g in groups.values() for s in g]
    means = group_means(auroc, groups)
    keys = [g for g in ("near", "far", "sanity") if groups[g]] + ["near+far"]
    return (f"| {label} | " + " | ".join(fmt(auroc[s]) for s in sets) + " | "
            + " | ".join(fmt(means[k]) for k in keys) + " |")


def write_markdown(path: Path, args: argparse.Namespace, command: str, rows: list[dict],
                   n_train: int, n_sets: dict[str, int], figure_path: Path | None) -> None:
    groups = groups_of(args)
    sets = [s for g in groups.values() for s in g]
    keys = [g for g in ("near", "far", "sanity") if groups[g]] + ["near+far"]
    lines = [
        f"# {path.stem}",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}, "
        f"{stdlib_platform.machine()}, {os.cpu_count()} CPUs (shared), torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s), no GPU.",
        "",
        f"LMD (Liu et al., ICML 2023) with the **exact denoiser** of the first {n_train} "
        f"training images of `{args.id}` (its seeded train-split order, roughly "
        "class-balanced) in place of a trained DDPM: ε̂(x_t, t) = (x_t − √ᾱ_t x̂₀)/√(1 − ᾱ_t), "
        "x̂₀ = Σᵢ wᵢ yᵢ, wᵢ ∝ exp(−‖x_t − √ᾱ_t yᵢ‖² / (2(1 − ᾱ_t))) — the function a DDPM trained "
        "to convergence on those images approximates. Everything else is the project's LMD: "
        f"T = 1000 linear β, alternating {args.block_size}-px checkerboards, the strided "
        "replacement sampler with η = 1, median over attempts of the per-attempt similarity "
        f"(−MSE or SSIM; higher = more ID). AUROC: ID = the `{args.id}` test split, "
        "positive = ID. `mean-fill` is the model-free control: every lifted pixel set to the "
        "mean of the kept pixels of its image (same masks, distances and median).",
        "",
        "Images per set: " + ", ".join(f"{k} {v}" for k, v in n_sets.items()) + ".",
        "Means: " + "; ".join(f"{g} = {', '.join(v)}" for g, v in groups.items() if v)
        + " (sanity: noise, never in a headline); near+far = the headline mean.",
        "",
    ]
    for row in rows:
        lines += [
            f"## {row['steps']} steps × {row['attempts']} attempts "
            f"({row['calls']} denoiser calls per image; {row['seconds']:.0f} s for all sets)",
            "",
            "| inpainter, distance | " + " | ".join(sets) + " | " + " | ".join(keys) + " |",
            "|---|" + "---|" * (len(sets) + len(keys)),
        ]
        for inp in INPAINTERS:
            for d in DISTANCES:
                lines.append(auroc_table(row["auroc"][inp][d], groups, f"{inp}, {d}"))
        lines.append("")
    if figure_path is not None:
        lines += [f"![examples]({figure_path.name})", "",
                  f"`{figure_path.name}`: two images per set, the pixels attempt 0 keeps "
                  "(gray = inpainted), and the exact denoiser's reconstructions of attempts 0 "
                  f"and 1 of the first setting ({rows[0]['steps']} × {rows[0]['attempts']}).",
                  ""]
    write_keeping_notes(path, "\n".join(lines), marker=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="LMD with the exact denoiser of the ID training images (default: the "
                    "Fashion-MNIST benchmark): per-set AUROC (MSE and SSIM), near/far/sanity "
                    "means and a model-free mean-fill control, written as markdown.")
    ap.add_argument("--id", default="fashion_mnist", help="ID dataset (built-in name)")
    ap.add_argument("--near", nargs="*", default=GROUPS["near"], help="near-OOD sets")
    ap.add_argument("--far", nargs="*", default=GROUPS["far"], help="far-OOD sets")
    ap.add_argument("--sanity", nargs="*", default=GROUPS["sanity"], help="noise sets")
    ap.add_argument("--train-n", type=int, default=5000,
                    help="ID training images the exact denoiser is built from")
    ap.add_argument("--n", type=int, default=200, help="images per test set (ID and OOD)")
    ap.add_argument("--settings", nargs="+", default=["5x2"], metavar="STEPSxATTEMPTS",
                    help="sampler settings, e.g. 5x2 25x4 (the paper: 1000x10)")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--batch", type=int, default=100, help="images per sampling pass")
    ap.add_argument("--chunk", type=int, default=1024,
                    help="training images per step of the denoiser's streaming softmax")
    ap.add_argument("--seed", type=int, default=0, help="data order and sampler noise seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--cache-dir", default=None, help="built-in dataset cache (optional)")
    ap.add_argument("--out", default="docs/results/lmd_ceiling.md")
    ap.add_argument("--figure", default="docs/results/lmd_ceiling.png",
                    help="example reconstructions ('' = none)")
    args = ap.parse_args(argv)
    if not (args.near or args.far):
        ap.error("give at least one --near or --far set")
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "bench/lmd_ceiling.py",
                          *(sys.argv[1:] if argv is None else argv)])
    settings = [parse_setting(s) for s in args.settings]
    groups = groups_of(args)

    train = load(args.id, "train", args.train_n, args.seed, args.cache_dir)
    sets = {"id": load(args.id, "test", args.n, args.seed, args.cache_dir)}
    for names in groups.values():
        for name in names:
            sets[name] = load(name, "test", args.n, args.seed, args.cache_dir)
    abar = alphas_cumprod("linear", 1000)
    model = ExactDenoiser.from_unit_images(train, abar, chunk=args.chunk).eval()
    print(f"exact denoiser over {len(train)} training images; sets "
          f"{ {k: len(v) for k, v in sets.items()} }", flush=True)

    rows, fig_recs = [], None
    for steps, attempts in settings:
        t0, scores, recs = time.perf_counter(), {}, {}
        for name, x in sets.items():
            exact, recs[name] = score_set(model, x, steps=steps, attempts=attempts,
                                          block=args.block_size, batch=args.batch,
                                          seed=args.seed)
            scores[name] = {"exact": exact, "mean-fill": mean_fill_scores(
                x, attempts=attempts, block=args.block_size)}
            print(f"{steps}x{attempts} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        fig_recs = fig_recs or recs
        auroc = {inp: {d: {s: ood_metrics(scores["id"][inp][d], scores[s][inp][d])["auroc"]
                           for s in sets if s != "id"} for d in DISTANCES}
                 for inp in INPAINTERS}
        row = {"steps": steps, "attempts": attempts, "auroc": auroc,
               "calls": attempts * network_calls(len(abar) - 1, steps),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        for inp in INPAINTERS:
            for d in DISTANCES:
                print(steps, attempts, inp, d,
                      {k: round(v, 3) for k, v in auroc[inp][d].items()},
                      {k: round(v, 3) for k, v in group_means(auroc[inp][d], groups).items()},
                      flush=True)
        fig_path = None
        if args.figure:
            fig_path = Path(args.figure)
            fig_path.parent.mkdir(parents=True, exist_ok=True)
            shown = list(sets)
            figure(fig_path, {k: sets[k][:2] for k in shown}, {k: fig_recs[k] for k in shown},
                   args.block_size, f"LMD with the exact denoiser ({len(train)} {args.id} "
                   f"training images), {rows[0]['steps']} steps x {rows[0]['attempts']} "
                   "attempts")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_markdown(out, args, command, rows, len(train),
                       {k: len(v) for k, v in sets.items()}, fig_path)  # after every setting
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
