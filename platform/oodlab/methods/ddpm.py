"""``ddpm``: an ε-prediction diffusion model trained on ID images only, for LMD.

Training (Ho et al. 2020, Eq. 14, "L_simple"): x_0 in [-1, 1], t ~ U{0..T-1}, ε ~ N(0, I),
loss = ‖ε - ε_θ(sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, t)‖² (mean). Labels are unused
(``kind = "unsupervised"``). An exponential moving average of the weights is trained
alongside (inside the checkpointed module, so it survives restarts); the EMA network is what
is evaluated and served, as in Ho et al. 2020 (App. B: EMA decay 0.9999) and the LMD model
(Liu et al. 2023, "Unsupervised Out-of-Distribution Detection with Diffusion Inpainting").
Detection is a post-hoc score over the model: ``lmd`` (Lift-Map-Detect) or
``diffusion_recon`` (the baseline).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from oodlab.detect.diffusion.schedule import alphas_cumprod, q_sample
from oodlab.methods.base import Loaders, Method, MethodParams, TrainState
from oodlab.models.unet import DiffusionModel, UNet, check_depth
from oodlab.registry import METHODS, SCORES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from oodlab.data.bundle import DataBundle
    from oodlab.spec import ExperimentSpec

DIFFUSION_SCORES = ("lmd", "diffusion_recon")


class DDPMParams(MethodParams):
    """The diffusion model, its EMA, and the cheap per-epoch validation."""

    name: Literal["ddpm"] = "ddpm"
    channels: int = Field(32, ge=4, le=256, description="U-Net base width (paper: 128)")
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2], min_length=1,
                                    max_length=5, description="width multiplier per level; "
                                    "its length is the U-Net depth (paper: 1,2,2,2)")
    num_res_blocks: int = Field(1, ge=1, le=4, description="res-blocks per level (paper: 2)")
    attention_resolutions: list[int] = Field(
        default_factory=lambda: [7], description="feature-map sizes (px) with self-attention "
        "(paper: 16 at 32 px; 7 = the lowest level of a 28 px, 3-level U-Net)")
    dropout: float = Field(0.1, ge=0, lt=1)
    timesteps: int = Field(1000, ge=2, le=4000, description="T of the forward process")
    schedule: Literal["linear", "cosine"] = Field("linear", description="noise schedule")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="linear schedule β_1")
    beta_end: float = Field(0.02, gt=0, lt=1, description="linear schedule β_T")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay, warmed up as "
                             "min(decay, (1+n)/(10+n)) after n updates (paper: 0.9999)")
    sample_every: int = Field(5, ge=0, description="log a sample grid to MLflow every n "
                              "epochs and after the last (0 = never)")
    sample_steps: int = Field(50, ge=1, description="sampler steps of the logged samples")
    val_limit: int = Field(64, ge=8, description="images per set in the per-epoch view")
    val_steps: int | None = Field(10, ge=1, description="sampler steps of the per-epoch AUROC "
                                  "(null = those of the served score)")
    val_attempts: int | None = Field(2, ge=1, description="attempts of the per-epoch AUROC "
                                     "(null = those of the served score)")

    @field_validator("beta_end")
    @classmethod
    def _increasing(cls, v: float, info) -> float:
        start = info.data.get("beta_start")
        if start is not None and v <= start:
            raise ValueError(f"beta_end ({v}) must exceed beta_start ({start})")
        return v


MultiAvgFn = Callable[[list[Tensor], list[Tensor], Tensor | int], None]


def warmup_ema_multi_avg_fn(decay: float) -> MultiAvgFn:
    """A ``multi_avg_fn`` for :class:`~torch.optim.swa_utils.AveragedModel`: the EMA of
    :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` with the warm-up of TensorFlow's
    ``tf.train.ExponentialMovingAverage(num_updates=n)``: decay ``min(decay, (1+n)/(10+n))``
    after ``n`` updates, so an EMA of a short run does not stay at the initial weights."""

    def update(averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor | int) -> None:
        n = int(n_averaged)
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)))(averaged, current, n_averaged)

    return update


class EMAModel(nn.Module):
    """The trained network ``net`` and its exponential moving average ``ema`` (no gradients).

    The average is a :class:`~torch.optim.swa_utils.AveragedModel` over parameters and
    buffers (``use_buffers=True``) with the warm-up EMA of :func:`warmup_ema_multi_avg_fn`:
    its first update copies ``net`` (``n_averaged = 0``), update ``n >= 1`` folds ``net`` in
    with decay ``min(decay, (1+n)/(10+n))``. Its state (averaged weights, ``n_averaged``) and
    the last folded optimizer step live in this module's ``state_dict``, so a restored
    checkpoint continues the same average.
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        super().__init__()
        self.net, self.decay = net, decay
        self.averaged = AveragedModel(net, multi_avg_fn=warmup_ema_multi_avg_fn(decay),
                                      use_buffers=True)
        self.averaged.requires_grad_(False)
        self.register_buffer("last_step", torch.full((), -1, dtype=torch.long))
        self.register_load_state_dict_pre_hook(_upgrade_legacy_ema_keys)

    @property
    def ema(self) -> nn.Module:
        """The averaged plain network (what is evaluated, sampled and exported)."""
        return self.averaged.module

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights in once per optimizer step (idempotent for ``step``)."""
        if int(self.last_step) >= step:
            return
        self.averaged.update_parameters(self.net)
        self.last_step.fill_(step)


def _upgrade_legacy_ema_keys(module: nn.Module, state_dict: dict[str, Tensor],
                                   prefix: str, *_: object) -> None:
    """Read a checkpoint of the earlier hand-written EMA: its ``ema.*`` weights and
    ``updates`` count are ``averaged.module.*`` and ``averaged.n_averaged`` here."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}ema.")]:
        state_dict[f"{prefix}averaged.module.{key.removeprefix(f'{prefix}ema.')}"] = \
            state_dict.pop(key)
    if f"{prefix}updates" in state_dict:
        state_dict[f"{prefix}averaged.n_averaged"] = state_dict.pop(f"{prefix}updates")


def _ema_module(model: nn.Module) -> EMAModel:
    return getattr(model, "module", model)  # inside DDP or not


def _schedule(model: nn.Module) -> Tensor:
    """ᾱ of a DiffusionModel, bare, EMA-wrapped or inside DDP."""
    m = _ema_module(model)
    return (m.net if isinstance(m, EMAModel) else m).alphas_cumprod


def denoising_loss(model: nn.Module, x01: Tensor, generator: torch.Generator | None = None
                   ) -> Tensor:
    """The simple DDPM loss on [0, 1] images (the module docstring's equation)."""
    x0 = x01 * 2 - 1
    abar = _schedule(model)
    t = torch.randint(0, len(abar), (len(x0),), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    return F.mse_loss(model(q_sample(x0, t, noise, abar), t), noise)


def noise_generator(seed: int, rank: int, step: int,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of t and ε for one optimizer step of one DDP rank.

    Seeded from (seed, rank, step) through NumPy's ``SeedSequence`` hash, so every rank
    draws its own timesteps and noise (the training loop seeds the global RNG identically
    on all ranks, which would make the ranks' draws, and so their gradient noise, equal),
    the same rank and step always draw the same, and a run resumed at step n continues the
    stream it would have drawn."""
    words = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(
        (int(words[0]) << 31) ^ int(words[1]))


@torch.no_grad()
def sample(model: DiffusionModel, n: int, shape: tuple[int, int, int], steps: int,
           seed: int = 0) -> Tensor:
    """n unconditional samples in [0, 1]: the inpainter with nothing known."""
    from oodlab.detect.diffusion.sampler import inpaint

    device = model.alphas_cumprod.device
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.zeros(n, *shape, device=device)
    out = inpaint(model, x, torch.zeros(1, device=device), t_start=model.num_timesteps - 1,
                  steps=steps, generator=gen)
    return ((out + 1) / 2).clamp(0, 1)


def sample_grid_figure(images: Tensor, title: str):
    """A square grid of [0, 1] images."""
    import math

    from matplotlib.figure import Figure

    n = len(images)
    side = math.ceil(math.sqrt(n))
    fig = Figure(figsize=(side, side))
    axes = fig.subplots(side, side)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = images[i].cpu()
            ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray",
                      vmin=0, vmax=1)
    fig.suptitle(title, fontsize=8)
    return fig


@METHODS.register
class DDPM(Method):
    """Train the diffusion model; detect with the ``lmd`` / ``diffusion_recon`` scores."""

    name = "ddpm"
    Params = DDPMParams
    kind = "unsupervised"

    def __init__(self, spec: ExperimentSpec) -> None:
        super().__init__(spec)
        self._samples: Tensor | None = None

    @classmethod
    def check(cls, spec: ExperimentSpec) -> None:
        """Diffusion scores only, with valid parameters, and an image size the U-Net's depth
        divides: bad settings fail when the spec is loaded, not after training."""
        bad = [s for s in spec.eval.scores if s not in DIFFUSION_SCORES]
        if bad:
            raise ValueError(f"eval.scores: {bad} need logits/features; method 'ddpm' "
                             f"supports {list(DIFFUSION_SCORES)}")
        size = spec.data.image_size
        for s in spec.eval.scores:  # a score object holds settings only: cheap to build
            score = SCORES.get(s)(**spec.eval.score_params.get(s, {}))
            if getattr(score, "masked", False) and score.block_size >= size:
                raise ValueError(
                    f"eval.score_params.{s}.block_size: {score.block_size} px >= "
                    f"data.image_size {size} px makes one checkerboard block cover the whole "
                    f"image, so the mask lifts nothing (needs block_size < image_size)")
        check_depth(size, spec.method.channel_mult)

    @classmethod
    def reported_metrics(cls, spec: ExperimentSpec) -> set[str]:
        return super().reported_metrics(spec) | {"val/denoise_loss"}

    def build(self, num_classes: int) -> nn.Module:
        p, d = self.params, self.spec.data
        unet = UNet(in_channels=d.channels, image_size=d.image_size, channels=p.channels,
                    channel_mult=p.channel_mult, num_res_blocks=p.num_res_blocks,
                    attention_resolutions=p.attention_resolutions, dropout=p.dropout)
        return DiffusionModel(unet, alphas_cumprod(p.schedule, p.timesteps, p.beta_start,
                                                   p.beta_end))

    def wrap(self, model: nn.Module) -> nn.Module:
        return EMAModel(model, self.params.ema_decay)

    def export(self, model: nn.Module) -> nn.Module:
        return model.ema

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      oe_batch: tuple[Tensor, Tensor] | None, state: TrainState) -> Tensor:
        _ema_module(model).update(state.step)  # fold in the previous optimizer step
        x = batch[0].to(state.device)
        gen = noise_generator(self.spec.seed, state.rank, state.step, x.device)
        return denoising_loss(model, x, gen)

    def on_epoch_end(self, model: nn.Module, loaders: Loaders, state: TrainState) -> None:
        ema = _ema_module(model)
        ema.update(state.step)  # the epoch's last optimizer step
        p = self.params
        last = state.epoch + 1 == self.spec.train.epochs
        if state.rank == 0 and p.sample_every and ((state.epoch + 1) % p.sample_every == 0
                                                   or last):
            d, net = self.spec.data, ema.ema
            was = net.training
            self._samples = sample(net.eval(), 16, (d.channels, d.image_size, d.image_size),
                                   p.sample_steps, seed=self.spec.seed)
            net.train(was)

    def epoch_figures(self, model: nn.Module, state: TrainState) -> dict[str, Figure]:
        """A 4x4 grid of EMA samples every ``sample_every`` epochs and after the last."""
        if self._samples is None:
            return {}
        images, self._samples = self._samples, None
        title = f"{self.spec.name}: EMA samples, epoch {state.epoch + 1}"
        return {f"samples/epoch_{state.epoch + 1:03d}.png": sample_grid_figure(images, title)}

    def validation_metrics(self, model: nn.Module, bundle: DataBundle,
                           device: torch.device | str) -> dict[str, float]:
        """The cheap per-epoch view (rank 0): the EMA model's denoising loss on ID-val and
        the served score's AUROC (with ``val_steps`` / ``val_attempts`` if set) on the first
        ``val_limit`` images of ID-val and of each validation OOD set."""
        from oodlab.data.bundle import eval_loader
        from oodlab.detect.evaluate import METRIC_KEYS, first_n
        from oodlab.detect.metrics import ood_metrics
        from oodlab.detect.scores import build_score

        p, bs = self.params, self.spec.data.batch_size
        net = model.ema if isinstance(model, EMAModel) else model
        was = net.training
        net.eval()
        gen = torch.Generator(device=device).manual_seed(self.spec.seed)
        with torch.no_grad():
            losses = [denoising_loss(net, x.to(device), gen).item() * len(x)
                      for x, _ in eval_loader(first_n(bundle.id_val, p.val_limit), bs)]
        out = {"val/denoise_loss": sum(losses) / min(len(bundle.id_val), p.val_limit)}
        served = self.spec.eval.scores[0]
        cheap = {k: v for k, v in (("steps", p.val_steps), ("attempts", p.val_attempts))
                 if v is not None}
        score = build_score(served, **self.spec.eval.score_params.get(served, {}) | cheap)

        def run(ds) -> Tensor:
            return torch.cat([score.score_batch(net, x.to(device), i).cpu() for i, (x, _)
                              in enumerate(eval_loader(first_n(ds, p.val_limit), bs))])

        id_scores, per_set = run(bundle.id_val), []
        for set_name, ds in bundle.val_ood.items():
            m = ood_metrics(id_scores, run(ds))
            per_set.append(m)
            out |= {f"val/{set_name}/{k}": v for k, v in m.items()}
        if per_set:
            out |= {f"val/{k}": sum(m[k] for m in per_set) / len(per_set) for k in METRIC_KEYS}
        net.train(was)
        sys.stdout.flush()
        return out
