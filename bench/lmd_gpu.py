"""LMD on a DDPM trained on an accelerator: train, sample and score in one process.

``oodlab run jobs/lmd.yaml`` trains the diffusion model under Ray Train and logs to MLflow.
The accelerator machine behind the committed GPU numbers has PyTorch but neither Ray nor
MLflow, and nothing can be installed there, so this script runs the same method code in
one plain loop: :class:`~oodlab.methods.ddpm.DDPM`'s ``build`` / ``wrap`` /
``training_step`` (the EMA, the per-step noise stream), the optimizer and schedule of
:mod:`oodlab.train.optim`, the sampler of the logged sample grids, and LMD's
``reconstruct`` / ``similarity`` / ``median`` (Liu et al., ICML 2023). Under a wall-clock
deadline, in order:

1. **train** the spec's U-Net on the ID training split for ``--train-seconds`` (bf16
   autocast; the step budget is the rate measured over the first ``--probe-steps`` times the
   seconds left, capped by the spec's own step count; cosine schedule over the budget);
2. a **sample grid** of the EMA network and the **loss curve**;
3. **scoring passes**, each one sampling pass over ``--batch`` images of every set (the spec's
   ID test split and near/far/sanity OOD sets, in one seeded random order exported here),
   seeded ``seed + batch index`` like the platform's scorer: LMD at the spec's setting and at
   the sweep's step counts (MSE and SSIM from the same reconstructions, 10 attempts, so
   every attempt count 1..10 is a median over a prefix), the reconstruction baseline, and the
   exact denoiser of ``--exact-train`` training images as the ceiling. Passes are skipped
   once the deadline would be passed, so a slow machine returns fewer images, never nothing.

``run`` writes per-image similarities (``scores.npz``) and the facts of the run
(``lmd_gpu.json``); ``report`` turns them into the Markdown tables (per-set AUROC, the
near/far groups, the published Fashion-MNIST -> MNIST number, the cost sweep), here::

    python bench/lmd_gpu.py export --out .devdata/lmd.npz     # here, with the project env
    python bench/lmd_gpu.py run --data .devdata/lmd.npz --out OUT --deadline 520
    python bench/lmd_gpu.py report OUT --out docs/results/lmd_gpu.md

oodlab's specs need pydantic; where the accelerator's image lacks it, carry it as
``bench/fmnist_gpu.py`` describes (``bench/offline_site.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

GROUP_KEYS = ("near", "far", "sanity")
SWEEP_STEPS = [250, 100, 50, 25, 10, 5]  # the first, x 10 attempts, is the sweep's reference
ATTEMPTS = 10


# ---------------------------------------------------------------- export (here) -----------
def export(args: argparse.Namespace) -> None:
    """The spec's ID train split (all of it), and ``--per-set`` images of the ID test split and
    of every test OOD set, each in one seeded random order, as uint8 in one .npz."""
    from oodlab.data.bundle import load_bundle
    from oodlab.spec import load_spec

    spec = load_spec(args.spec)
    bundle = load_bundle(spec)
    rng = np.random.default_rng(args.seed)

    def arr(ds, n: int | None) -> np.ndarray:
        order = rng.permutation(len(ds))[: n or len(ds)]
        x = torch.stack([ds[int(i)][0] for i in order])
        return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()

    out = {"train": arr(bundle.id_train, None), "set/id_test": arr(bundle.id_test, args.per_set)}
    for name, ds in bundle.test_ood.items():
        out[f"set/{name}"] = arr(ds, args.per_set)
    groups = {g: bundle.test_groups.get(g, []) for g in GROUP_KEYS}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, groups=json.dumps(groups), spec=args.spec, **out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape[0]}" for k, v in out.items()))


# ---------------------------------------------------------------- run (accelerator) -------
class Autocast(nn.Module):
    """A diffusion model run under bf16 autocast, returning float32 (the sampler's dtype)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("alphas_cumprod", net.alphas_cumprod)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            return self.net(x, t).float()


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def log(msg: str, deadline: Deadline) -> None:
    print(f"[{deadline.elapsed():6.1f} s] {msg}", flush=True)


def train(spec, x_train: Tensor, args, deadline: Deadline, facts: dict) -> nn.Module:
    """The ddpm method's training step in a plain loop; returns the EMA network (eval)."""
    from oodlab.methods import TrainState, build_method
    from oodlab.train.optim import make_optimizer, make_scheduler

    device = x_train.device
    torch.manual_seed(spec.seed)
    method = build_method(spec)
    net = method.build(0).to(device)
    model = method.wrap(net).to(device)
    opt = make_optimizer(spec.train, [p for p in model.parameters() if p.requires_grad])
    state = TrainState(device=device)
    bs, n = spec.data.batch_size, len(x_train)
    per_epoch = n // bs  # drop_last, as the platform's loader
    spec_steps = spec.train.epochs * per_epoch
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    losses: list[float] = []
    order, pos, sched, budget, t_start = None, per_epoch, None, spec_steps, time.perf_counter()
    window, t_warm = torch.zeros((), device=device), t_start
    model.train()
    while state.step < budget:
        if pos == per_epoch:
            order, pos = torch.randperm(n, device=device, generator=gen), 0
            state.epoch = state.step // per_epoch
        xb = x_train[order[pos * bs:(pos + 1) * bs]].float() / 255
        pos += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = method.training_step(model, (xb, xb.new_zeros(len(xb))), None, state)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        state.step += 1
        window += loss.detach()
        if state.step % args.log_every == 0:
            losses.append(float(window) / args.log_every)
            window.zero_()
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"loss {losses[-1]} at step {state.step}")
        if state.step in (args.probe_steps // 5, args.probe_steps) and device.type == "cuda":
            torch.cuda.synchronize()
        if state.step == args.probe_steps // 5:  # after cuDNN's autotuning
            t_warm = time.perf_counter()
        if state.step == args.probe_steps:  # the budget: measured rate x seconds left
            rate = (state.step - args.probe_steps // 5) / (time.perf_counter() - t_warm)
            budget = min(spec_steps, int(rate * (args.train_seconds - (
                time.perf_counter() - t_start))) + state.step)
            budget = max(budget, state.step + 1)
            sched = make_scheduler(spec.train, opt, budget - state.step)
            log(f"probe: {rate:.1f} steps/s -> budget {budget} steps "
                f"({budget / per_epoch:.1f} epochs; the spec's: {spec_steps})", deadline)
        if state.step % max(1, budget // 10) == 0:
            log(f"step {state.step}/{budget} loss {losses[-1] if losses else float('nan'):.4f}",
                deadline)
    model.update(state.step)  # fold in the last step, as on_epoch_end does
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t_start
    facts["train"] = {
        "optimizer_steps": state.step, "spec_steps": spec_steps, "batch_size": bs,
        "train_images": n, "epochs": state.step / per_epoch, "wall_s": wall,
        "images_per_s": state.step * bs / wall, "log_every": args.log_every, "loss": losses,
        "lr": spec.train.lr, "optimizer": spec.train.optimizer, "schedule": spec.train.scheduler,
        "ema_decay": spec.method.ema_decay,
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "params": sum(p.numel() for p in net.parameters()),
    }
    return model.ema.eval()


def figures(ema: nn.Module, spec, facts: dict, out: Path) -> None:
    """The EMA sample grid (``samples.png``) and the loss curve (``loss.png``)."""
    from matplotlib.figure import Figure

    from oodlab.methods.ddpm import sample, sample_grid_figure

    d, tr = spec.data, facts["train"]
    imgs = sample(Autocast(ema), 64, (d.channels, d.image_size, d.image_size),
                  spec.method.sample_steps, seed=spec.seed)
    sample_grid_figure(imgs, f"EMA samples after {tr['optimizer_steps']} optimizer steps "
                       f"({spec.method.sample_steps} sampler steps)").savefig(
        out / "samples.png", dpi=110)
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    steps = np.arange(1, len(tr["loss"]) + 1) * tr["log_every"]
    ax.plot(steps, tr["loss"], lw=1)
    ax.set(xlabel="optimizer step", ylabel="L_simple (mean of each window)", yscale="log",
           title=f"{spec.name}: training loss, batch {tr['batch_size']}")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)


def passes(args, spec) -> list[dict[str, Any]]:
    """The scoring passes in priority order: (score, steps, model, batch index)."""
    lmd_steps = spec.eval.score_params.get("lmd", {}).get("steps", 100)
    first = [dict(score="lmd", steps=lmd_steps, model="ddpm", batch=0)]
    first += [dict(score="lmd", steps=s, model="ddpm", batch=0)
              for s in args.sweep_steps if s != lmd_steps]
    first += [dict(score="diffusion_recon", steps=lmd_steps, model="ddpm", batch=0),
              dict(score="lmd", steps=lmd_steps, model="exact", batch=0)]
    more = [dict(score="lmd", steps=lmd_steps, model="exact", batch=b)
            for b in range(1, args.max_batches)]  # cheap: every batch
    more += [dict(score=s, steps=lmd_steps, model="ddpm", batch=b)
             for b in range(1, args.max_batches) for s in ("lmd", "diffusion_recon")]
    done = set(args.skip)
    return [p for p in first + more
            if f"{p['model']}/{p['score']}/{p['steps']}/{p['batch']}" not in done]


def load_ema(spec, path: str, device: torch.device, facts: dict) -> nn.Module:
    """The EMA network saved by an earlier ``run`` (its training facts are in that run's
    JSON; this run only scores)."""
    from oodlab.methods import build_method

    net = build_method(spec).build(0)
    net.load_state_dict({k: v.float() for k, v in torch.load(path, map_location="cpu").items()})
    facts["checkpoint"] = path
    return net.to(device).eval()


@torch.no_grad()
def call_seconds(model: nn.Module, n: int, x: Tensor) -> float:
    """Seconds per image of one network call at batch ``n`` (median of 3, after a warm-up)."""
    xb = (x[:1].float() / 255).expand(n, *x.shape[1:]).contiguous()
    t = torch.full((n,), len(model.alphas_cumprod) // 2, device=x.device, dtype=torch.long)
    times = []
    for _ in range(4):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(xb, t)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:])) / n


def score_pass(model: nn.Module, sets: dict[str, Tensor], p: dict, args, spec
               ) -> dict[str, np.ndarray]:
    """Per-image, per-attempt similarities [B, ATTEMPTS] of one pass over every set."""
    from oodlab.detect.diffusion.distances import similarity
    from oodlab.detect.diffusion.scoring import reconstruct

    cfg = spec.eval.score_params.get(p["score"], {})
    out = {}
    for name, x_all in sets.items():
        x = x_all[p["batch"] * args.batch:(p["batch"] + 1) * args.batch].float() / 255
        if len(x) == 0:
            continue
        rec = reconstruct(model, x, masked=p["score"] == "lmd", steps=p["steps"],
                          attempts=ATTEMPTS, block_size=cfg.get("block_size", 4),
                          eta=cfg.get("eta", 1.0), noise_level=cfg.get("noise_level", 0.3),
                          seed=args.score_seed + p["batch"])
        for dist in ("mse", "ssim"):
            sims = torch.stack([similarity(dist, x, r) for r in rec], 1)
            out[f"{p['model']}/{p['score']}/{dist}/{p['steps']}/{p['batch']}/{name}"] = \
                sims.float().cpu().numpy()
    return out


def run(args: argparse.Namespace) -> None:
    deadline = Deadline(args.deadline)
    from oodlab.detect.diffusion.exact import ExactDenoiser
    from oodlab.detect.diffusion.sampler import network_calls
    from oodlab.spec import load_spec

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    data = np.load(args.data)
    spec = load_spec(args.spec or str(data["spec"]), args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts: dict[str, Any] = {
        "spec": args.spec or str(data["spec"]), "overrides": args.set,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "sweep_steps": args.sweep_steps,
        "lmd_steps": spec.eval.score_params.get("lmd", {}).get("steps", 100),
        "torch": torch.__version__, "argv": sys.argv[1:], "groups": json.loads(
            str(data["groups"])), "batch": args.batch, "attempts": ATTEMPTS, "passes": []}

    def save(scores: dict[str, np.ndarray]) -> None:
        facts["elapsed_s"] = deadline.elapsed()
        (out / "lmd_gpu.json").write_text(json.dumps(facts, indent=1) + "\n")
        np.savez_compressed(out / "scores.npz", **scores)

    x_train = torch.from_numpy(data["train"]).to(device)
    sets = {k.removeprefix("set/"): torch.from_numpy(data[k]).to(device)
            for k in data.files if k.startswith("set/")}
    log(f"{device}: {len(x_train)} training images, sets {list(sets)}", deadline)
    scores: dict[str, np.ndarray] = {}
    if args.checkpoint:
        ema = load_ema(spec, args.checkpoint, device, facts)
    else:
        ema = train(spec, x_train, args, deadline, facts)
        torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() and "alphas" not in k
                    else v for k, v in ema.state_dict().items()}, out / "ema_bf16.pt")
        save(scores)
        try:
            figures(ema, spec, facts, out)
        except Exception as err:  # a figure must not cost the scores
            facts["figure_error"] = repr(err)
        log(f"trained {facts['train']['optimizer_steps']} steps; scoring", deadline)
    models = {"ddpm": Autocast(ema)}
    exact_images = x_train[: args.exact_train].float() / 255 * 2 - 1
    models["exact"] = ExactDenoiser(exact_images, ema.alphas_cumprod)
    n_t = len(ema.alphas_cumprod)
    rate = {name: call_seconds(m, args.batch * ATTEMPTS, sets["id_test"]) for name, m in
            models.items()}  # seconds per U-Net call and image, raised by each pass
    facts["probe_calls_per_s"] = {k: 1 / v for k, v in rate.items()}
    log(f"U-Net calls/s at batch {args.batch * ATTEMPTS}: "
        + ", ".join(f"{k} {1 / v:,.0f}" for k, v in rate.items()), deadline)
    for p in passes(args, spec):
        t_begin = round(spec.eval.score_params.get(p["score"], {}).get("noise_level", 0.3)
                        * (n_t - 1)) if p["score"] != "lmd" else n_t - 1
        calls = network_calls(t_begin, p["steps"]) * ATTEMPTS
        images = sum(min(args.batch, max(0, len(x) - p["batch"] * args.batch))
                     for x in sets.values())
        if images == 0:
            continue
        need = rate.get(p["model"], 0.0) * calls * images
        if need > deadline.left() - args.margin:
            log(f"skip {p} (needs ~{need:.0f} s, {deadline.left():.0f} s left)", deadline)
            facts["passes"].append(p | {"skipped": True, "calls_per_image": calls})
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        scores |= score_pass(models[p["model"]], sets, p, args, spec)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        rate[p["model"]] = max(rate.get(p["model"], 0.0), wall / (calls * images))
        facts["passes"].append(p | {"calls_per_image": calls, "images": images, "wall_s": wall,
                                    "unet_calls_per_s": calls * images / wall})
        log(f"{p}: {images} images x {calls} calls in {wall:.1f} s "
            f"({calls * images / wall:,.0f} calls/s)", deadline)
        save(scores)
    save(scores)
    log("done", deadline)


# ---------------------------------------------------------------- report (here) ----------
def set_scores(scores: dict[str, np.ndarray], prefix: str, attempts: int, name: str
               ) -> np.ndarray | None:
    """One set's scores for one (model, score, distance, steps) over every batch scored: the
    median of the first ``attempts`` similarities of each image."""
    keys = sorted((k for k in scores if k.startswith(prefix + "/") and
                   k.rsplit("/", 1)[1] == name), key=lambda k: int(k.split("/")[-2]))
    if not keys:
        return None
    return np.median(np.concatenate([scores[k] for k in keys])[:, :attempts], axis=1)


def aurocs(scores: dict[str, np.ndarray], prefix: str, attempts: int, sets: list[str]
           ) -> dict[str, float] | None:
    """AUROC of ID test vs each set (see :func:`set_scores`)."""
    from oodlab.detect.metrics import auroc

    id_s = set_scores(scores, prefix, attempts, "id_test")
    if id_s is None:
        return None
    return {s: auroc(id_s, v) for s in sets
            if (v := set_scores(scores, prefix, attempts, s)) is not None}


def boot_headline(scores: dict[str, np.ndarray], rows: list[tuple[str, int]],
                  headline: list[str], n: int = 500, seed: int = 0) -> np.ndarray:
    """[n, len(rows)] mean AUROC over ``headline`` sets on bootstrap resamples of the images
    of every set, the same resample for every row (paired; rows must share their images)."""
    from oodlab.detect.metrics import auroc

    names = ["id_test", *headline]
    vals = [{s: set_scores(scores, prefix, r, s) for s in names} for prefix, r in rows]
    rng = np.random.default_rng(seed)
    out = np.empty((n, len(rows)))
    for b in range(n):
        idx = {s: rng.integers(0, len(vals[0][s]), len(vals[0][s])) for s in names}
        for i, v in enumerate(vals):
            out[b, i] = np.mean([auroc(v["id_test"][idx["id_test"]], v[s][idx[s]])
                                 for s in headline])
    return out


def ci(samples: np.ndarray) -> str:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return f"[{lo:.3f}, {hi:.3f}]"


def load_runs(dirs: list[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The facts of the run that trained (the first dir) with every run's passes, and the
    union of their scores (a later run with ``--checkpoint`` adds passes, never repeats one)."""
    facts: dict[str, Any] | None = None
    scores: dict[str, np.ndarray] = {}
    for i, d in enumerate(dirs):
        f = json.loads((Path(d) / "lmd_gpu.json").read_text())
        with np.load(Path(d) / "scores.npz") as z:
            scores |= {k: z[k] for k in z.files}
        passes = [p | {"run": i + 1} for p in f["passes"]]
        if facts is None:
            facts = f | {"passes": passes, "runs": [f["argv"]]}
        else:
            facts["passes"] += passes
            facts["runs"].append(f["argv"])
    if facts is None or "train" not in facts:
        raise SystemExit("report: the first folder must be the run that trained")
    return facts, scores


def batches_of(scores: dict[str, np.ndarray], prefix: str) -> int:
    return len({k.split("/")[-2] for k in scores if k.startswith(prefix + "/")})


def mean_of(per: dict[str, float], names: list[str]) -> float:
    vals = [per[n] for n in names if n in per]
    return sum(vals) / len(vals) if vals else float("nan")


def fmt(v: float) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:.3f}"


def report(args: argparse.Namespace) -> None:
    from oodlab.report.published import counterparts
    from oodlab.report.results import write_keeping_notes

    src = Path(args.dirs[0])
    facts, scores = load_runs(args.dirs)
    groups, tr = facts["groups"], facts["train"]
    headline = groups["near"] + groups["far"]
    ood = [s for g in GROUP_KEYS for s in groups[g]]
    lmd_steps = facts["lmd_steps"]
    pub = {p.ood_set: p for p in counterparts("ddpm", "lmd", "fashion_mnist")}
    L: list[str] = []
    L += [f"# LMD on a DDPM trained on {facts['device']}", "",
          f"`python bench/lmd_gpu.py run` ({' '.join(facts['argv'])}), then "
          f"`python bench/lmd_gpu.py report`. Spec `{facts['spec']}`"
          + (f" with {', '.join(facts['overrides'])}" if facts["overrides"] else "")
          + f"; torch {facts['torch']}. One training seed (why: see the notes).", "",
          "## Training", "",
          "| optimizer steps | spec's steps | batch | epochs | training images | wall | "
          "images/s | final loss (last window) | precision | EMA decay |",
          "|---|---|---|---|---|---|---|---|---|---|",
          f"| {tr['optimizer_steps']:,} | {tr['spec_steps']:,} | {tr['batch_size']} | "
          f"{tr['epochs']:.1f} | {tr['train_images']:,} | {tr['wall_s']:.0f} s | "
          f"{tr['images_per_s']:,.0f} | {tr['loss'][-1]:.4f} | {tr['precision']} | "
          f"{tr['ema_decay']} |", "",
          f"![loss]({Path(args.out).stem}_loss.png) "
          f"![samples]({Path(args.out).stem}_samples.png)", ""]
    rows = [("LMD, MSE", f"ddpm/lmd/mse/{lmd_steps}"), ("LMD, SSIM", f"ddpm/lmd/ssim/{lmd_steps}"),
            ("reconstruction baseline, MSE", f"ddpm/diffusion_recon/mse/{lmd_steps}"),
            ("reconstruction baseline, SSIM", f"ddpm/diffusion_recon/ssim/{lmd_steps}"),
            ("exact-denoiser ceiling, MSE", f"exact/lmd/mse/{lmd_steps}"),
            ("exact-denoiser ceiling, SSIM", f"exact/lmd/ssim/{lmd_steps}")]
    L += [f"## AUROC per test set ({lmd_steps} steps x {ATTEMPTS} attempts)", "",
          "Images per set = batches x " + str(facts["batch"]) + " (same images for every row "
          "with the same count). Near+far mean is the headline; sanity sets are left out of "
          "it.", "",
          "| row | images/set | " + " | ".join(f"{s} ({g})" for g in GROUP_KEYS
                                              for s in groups[g])
          + " | near | far | **near+far** | 95% CI |",
          "|---|---|" + "---|" * (len(ood) + 4)]
    summary: dict[str, float] = {}
    for label, prefix in rows:
        per = aurocs(scores, prefix, ATTEMPTS, ood)
        if per is None:
            L.append(f"| {label} | not run | " + " | ".join("—" for _ in range(len(ood) + 4))
                     + " |")
            continue
        summary[label] = mean_of(per, headline)
        L.append(f"| {label} | {batches_of(scores, prefix) * facts['batch']} | "
                 + " | ".join(fmt(per.get(s, float("nan"))) for s in ood)
                 + f" | {fmt(mean_of(per, groups['near']))} | {fmt(mean_of(per, groups['far']))}"
                 f" | **{fmt(summary[label])}** | "
                 f"{ci(boot_headline(scores, [(prefix, ATTEMPTS)], headline, args.boot)[:, 0])} |")
    if pub:
        L.append("| published, LMD (paper's model and budget) | — | " + " | ".join(
            f"{pub[s].value:.3f}" if s in pub else "—" for s in ood) + " | — | — | — | — |")
        L += [""] + [f"Published: {p.source}: {p.ood_set} AUROC {p.value} ({p.note})."
                     for p in pub.values()]
    batch0 = {k: v for k, v in scores.items() if "/0/" in k}
    for dist in ("mse", "ssim"):
        pair = [(f"ddpm/lmd/{dist}/{lmd_steps}", ATTEMPTS),
                (f"ddpm/diffusion_recon/{dist}/{lmd_steps}", ATTEMPTS)]
        if all(f"{prefix}/0/id_test" in scores for prefix, _ in pair):
            b = boot_headline(batch0, pair, headline, args.boot)
            diff = (mean_of(aurocs(batch0, pair[0][0], ATTEMPTS, ood), headline)
                    - mean_of(aurocs(batch0, pair[1][0], ATTEMPTS, ood), headline))
            L.append(f"\nLMD − reconstruction baseline, {dist.upper()}, on the same first "
                     f"{facts['batch']} images per set: near+far {diff:+.3f} (paired bootstrap "
                     f"95% CI {ci(b[:, 0] - b[:, 1])}).")
    # the cost sweep: batch 0 only, every (steps, attempts), paired on the same images
    sweep_steps = facts["sweep_steps"]
    ref = ("mse", sweep_steps[0], ATTEMPTS)
    sweep = []
    for dist in ("mse", "ssim"):
        for steps in sweep_steps:
            for r in range(1, ATTEMPTS + 1):
                prefix = f"ddpm/lmd/{dist}/{steps}"
                key = f"{prefix}/0/id_test"
                if key not in scores:
                    continue
                per = aurocs({k: v for k, v in scores.items() if "/0/" in k}, prefix, r, ood)
                sweep.append(dict(distance=dist, steps=steps, attempts=r, calls=steps * r,
                                  auroc=mean_of(per, headline)))
    L += ["", f"## Cost: U-Net calls per image vs AUROC (first {facts['batch']} images per set, "
          "paired)", ""]
    by = {(s["distance"], s["steps"], s["attempts"]): s for s in sweep}
    if ref not in by:
        L.append("The reference pass did not run.")
    else:
        for dist in ("mse", "ssim"):
            rkey = (dist, sweep_steps[0], ATTEMPTS)
            if rkey not in by:
                continue
            r_auc = by[rkey]["auroc"]
            ok = [s for s in sweep if s["distance"] == dist and s["auroc"] >= r_auc - 0.01]
            best = min(ok, key=lambda s: (s["calls"], -s["auroc"]))
            batch0 = {k: v for k, v in scores.items() if "/0/" in k}
            pair = boot_headline(batch0, [(f"ddpm/lmd/{dist}/{sweep_steps[0]}", ATTEMPTS),
                                          (f"ddpm/lmd/{dist}/{best['steps']}",
                                           best["attempts"])], headline, args.boot)
            L += [f"**{dist.upper()}**: reference {sweep_steps[0]} steps x {ATTEMPTS} attempts "
                  f"= {sweep_steps[0] * ATTEMPTS:,} calls, near+far AUROC {r_auc:.3f}. Fewest "
                  f"calls within 0.01 of it: {best['steps']} x {best['attempts']} = "
                  f"{best['calls']} calls, AUROC {best['auroc']:.3f} (difference "
                  f"{best['auroc'] - r_auc:+.3f}, paired bootstrap 95% CI "
                  f"{ci(pair[:, 1] - pair[:, 0])}): "
                  f"{sweep_steps[0] * ATTEMPTS / best['calls']:.0f}x fewer than the reference, "
                  f"{10_000 / best['calls']:.0f}x fewer than the paper's 1,000 x 10 (goal: "
                  f">= 10x, {'met' if 10_000 / best['calls'] >= 10 else 'missed'}).", ""]
        L += ["Near+far mean AUROC of every setting:", "",
              "| distance | steps | " + " | ".join(f"{r} att." for r in range(1, ATTEMPTS + 1))
              + " |", "|---|---|" + "---|" * ATTEMPTS]
        for dist in ("mse", "ssim"):
            for steps in sweep_steps:
                if (dist, steps, 1) in by:
                    L.append(f"| {dist} | {steps} | " + " | ".join(
                        fmt(by[(dist, steps, r)]["auroc"]) for r in range(1, ATTEMPTS + 1))
                        + " |")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        cost_figure(sweep, Path(args.out).with_name(Path(args.out).stem + "_cost.png"))
        L += ["", f"![cost]({Path(args.out).stem}_cost.png)"]
    L += ["", "## Scoring passes", "", "Runs: " + "; ".join(
        f"{i + 1}: `{' '.join(a)}`" for i, a in enumerate(facts["runs"])), "",
          "| run | model | score | steps | batch | images | calls/image | wall | U-Net calls/s |",
          "|---|---|---|---|---|---|---|---|---|"]
    def key(p: dict) -> tuple:
        return p["model"], p["score"], p["steps"], p["batch"]

    done = {key(p) for p in facts["passes"] if not p.get("skipped")}
    for p in facts["passes"]:
        head = f"| {p['run']} | {p['model']} | {p['score']} | {p['steps']} | {p['batch']} | "
        if not p.get("skipped"):
            L.append(head + f"{p['images']} | {p['calls_per_image']} | {p['wall_s']:.1f} s | "
                     f"{p['unet_calls_per_s']:,.0f} |")
        elif key(p) not in done:
            L.append(head + f"skipped (deadline) | {p['calls_per_image']} | — | — |")
    out = write_keeping_notes(Path(args.out), "\n".join(L) + "\n", marker=True)
    for name in ("loss", "samples"):
        if (src / f"{name}.png").is_file():
            out.with_name(f"{out.stem}_{name}.png").write_bytes((src / f"{name}.png").read_bytes())
    print(f"wrote {out}; near+far mean AUROC: "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))


def cost_figure(sweep: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    for dist, marker in (("mse", "o"), ("ssim", "s")):
        pts = sorted((s["calls"], s["auroc"]) for s in sweep if s["distance"] == dist)
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=10, marker=marker, label=dist.upper())
    ax.axvline(10_000 / 10, color="grey", lw=0.8, ls="--", label="10x fewer than the paper")
    ax.set(xscale="log", xlabel="U-Net calls per image (steps x attempts)",
           ylabel="near+far mean AUROC", title="LMD: cost vs quality (paired images)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the spec's splits as one .npz (needs the env)")
    e.add_argument("--spec", default="jobs/lmd.yaml")
    e.add_argument("--out", required=True)
    e.add_argument("--per-set", type=int, default=1000, help="images per test set")
    e.add_argument("--seed", type=int, default=0, help="seed of the random order")
    r = sub.add_parser("run", help="train, sample and score under a deadline")
    r.add_argument("--data", required=True, help="the .npz of 'export'")
    r.add_argument("--out", required=True)
    r.add_argument("--spec", help="default: the spec the data were exported from")
    r.add_argument("--set", nargs="*", default=[], help="spec overrides, key=value")
    r.add_argument("--device", help="default: cuda when there is one")
    r.add_argument("--deadline", type=float, default=520, help="seconds for the whole run")
    r.add_argument("--train-seconds", type=float, default=210)
    r.add_argument("--probe-steps", type=int, default=250,
                   help="steps of the rate probe (the first fifth is warm-up)")
    r.add_argument("--log-every", type=int, default=50)
    r.add_argument("--batch", type=int, default=200, help="images per set per pass")
    r.add_argument("--max-batches", type=int, default=5, help="batches of the main passes")
    r.add_argument("--exact-train", type=int, default=5000,
                   help="training images of the exact denoiser (the ceiling)")
    r.add_argument("--score-seed", type=int, default=0)
    r.add_argument("--checkpoint", help="score this saved EMA network (ema_bf16.pt of an "
                   "earlier run) instead of training")
    r.add_argument("--skip", nargs="*", default=[], metavar="MODEL/SCORE/STEPS/BATCH",
                   help="passes an earlier run already made, e.g. ddpm/lmd/100/0")
    r.add_argument("--sweep-steps", type=int, nargs="+", default=SWEEP_STEPS,
                   help="LMD step counts of the cost sweep; the first (x 10 attempts) is its "
                   "reference")
    r.add_argument("--margin", type=float, default=15, help="seconds kept free at the end")
    p = sub.add_parser("report", help="Markdown tables and figures from a run's output")
    p.add_argument("dirs", nargs="+", help="the --out folders: the run that trained first, "
                   "then runs that scored its checkpoint")
    p.add_argument("--out", default="docs/results/lmd_gpu.md")
    p.add_argument("--boot", type=int, default=500, help="bootstrap resamples of the CIs")
    args = ap.parse_args(argv)
    {"export": export, "run": run, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
