"""Library features that replaced hand-written code, checked against closed forms:
PyTorch's CosineAnnealingLR and AveragedModel EMA, MLflow parent runs and batching, Optuna's
Pareto front, and the one progress printer."""

from __future__ import annotations

import math
import random

import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from torch import nn

from oodlab import console
from oodlab.methods import build_method
from oodlab.methods.ddpm import EMAModel, _ema_module
from oodlab.models.unet import DiffusionModel
from oodlab.search.tune import TrialRecord, pareto_front
from oodlab.spec import TrainSpec, validate_spec
from oodlab.track import tracking
from oodlab.train.optim import make_scheduler
from tests.helpers import tiny_spec

# --- cosine schedule ----------------------------------------------------------------------


def _sgd(lr: float) -> torch.optim.SGD:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def _cosine(lr: float, k: int, total: int) -> float:
    return 0.5 * lr * (1 + math.cos(math.pi * k / total))


def test_cosine_schedule_is_the_closed_form_per_optimizer_step():
    lr, total = 0.1, 23
    opt = _sgd(lr)
    sched = make_scheduler(TrainSpec(lr=lr, scheduler="cosine"), opt, total)
    assert sched.get_last_lr()[0] == pytest.approx(lr)
    for k in range(1, total + 1):
        opt.step()
        sched.step()
        assert sched.get_last_lr()[0] == pytest.approx(_cosine(lr, k, total), rel=1e-9, abs=1e-15)
        assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]
    assert sched.get_last_lr()[0] == 0.0  # annealed to 0 at the end of the run


def test_cosine_schedule_resumes_from_its_state_dict():
    lr, total, k0 = 0.05, 17, 6
    opt = _sgd(lr)
    sched = make_scheduler(TrainSpec(lr=lr, scheduler="cosine"), opt, total)
    for _ in range(k0):
        opt.step()
        sched.step()
    opt2 = _sgd(lr)  # a restarted worker: fresh objects, then the checkpoint
    sched2 = make_scheduler(TrainSpec(lr=lr, scheduler="cosine"), opt2, total)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for k in range(k0 + 1, total + 1):
        opt2.step()
        sched2.step()
        assert sched2.get_last_lr()[0] == pytest.approx(_cosine(lr, k, total), rel=1e-9,
                                                        abs=1e-15)


def test_constant_schedule_keeps_the_learning_rate():
    opt = _sgd(0.3)
    sched = make_scheduler(TrainSpec(lr=0.3, scheduler="none"), opt, 5)
    for _ in range(8):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == [0.3]


# --- EMA ----------------------------------------------------------------------------------


class _Tiny(nn.Module):
    """One weight and one float buffer: both are averaged (``use_buffers=True``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("b", torch.zeros(1))

    def forward(self, x, t=None):
        return x * self.w


def _set(net: _Tiny, value: float) -> None:
    with torch.no_grad():
        net.w.fill_(value)
        net.b.fill_(-value)


def _closed_form(values: list[float], decay: float) -> float:
    """EMA after one update per value: the first copies (weight 1), update n >= 1 weighs the
    new value by 1 - d_n and every older one by d_n, d_n = min(decay, (1+n)/(10+n))."""
    d = [min(decay, (1 + n) / (10 + n)) for n in range(len(values))]
    weights = [(1.0 if k == 0 else 1 - d[k]) * math.prod(d[k + 1:]) for k in range(len(values))]
    assert sum(weights) == pytest.approx(1.0)
    return sum(w * v for w, v in zip(weights, values, strict=True))


@pytest.mark.parametrize("decay", [0.5, 0.6, 0.999])
def test_ema_after_n_updates_is_the_closed_form(decay):
    # the warm-up (2/11, 3/12, ...) gives way to the decay at n = 8 (0.5) or n = 13 (0.6);
    # 0.999 stays in the warm-up for these 15 updates
    net = _Tiny()
    ema = EMAModel(net, decay)
    values = [float(v) for v in (3, -1, 4, 1, -5, 9, 2, 6, -5, 3, 5, 8, -9, 7, 9)]
    for step, v in enumerate(values):
        _set(net, v)
        ema.update(step)
        ema.update(step)  # once per optimizer step: a second call is a no-op
    expected = _closed_form(values, decay)
    assert ema.ema.w.tolist() == pytest.approx([expected] * 2, rel=1e-6)
    assert ema.ema.b.item() == pytest.approx(-expected, rel=1e-6)
    assert int(ema.averaged.n_averaged) == len(values)
    assert not ema.ema.w.requires_grad
    assert net.w.tolist() == [values[-1]] * 2  # the trained network is untouched


def _train(ema: EMAModel, opt: torch.optim.Optimizer, steps: range) -> None:
    """The loop's order: fold in the previous optimizer step, then take the next."""
    for step in steps:
        ema.update(step)
        x = torch.full((4, 2), float(step % 3 + 1))
        loss = ((ema(x, None) - 1.0) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_ema_checkpoint_round_trip_continues_identically():
    torch.manual_seed(0)
    ema = EMAModel(_Tiny(), 0.9)
    opt = torch.optim.SGD([p for p in ema.parameters() if p.requires_grad], lr=0.1)
    _train(ema, opt, range(0, 7))
    payload = {"model": ema.state_dict(), "optimizer": opt.state_dict()}
    assert {"averaged.module.w", "averaged.n_averaged", "last_step"} <= set(payload["model"])

    restored = EMAModel(_Tiny(), 0.9)  # a fresh wrapper around a fresh network
    restored.load_state_dict(payload["model"])
    opt2 = torch.optim.SGD([p for p in restored.parameters() if p.requires_grad], lr=0.1)
    opt2.load_state_dict(payload["optimizer"])
    restored.update(6)  # step 6 was folded in before the checkpoint: no-op
    assert torch.equal(restored.ema.w, ema.ema.w)

    _train(ema, opt, range(7, 15))
    _train(restored, opt2, range(7, 15))
    for a, b in zip(ema.state_dict().values(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert int(restored.averaged.n_averaged) == 15


def test_ema_loads_a_checkpoint_of_the_hand_written_ema():
    """The earlier format (``ema.*`` weights, ``updates`` count) still resumes."""
    old = {"net.w": torch.tensor([2.0, 2.0]), "net.b": torch.tensor([-2.0]),
           "ema.w": torch.tensor([1.0, 1.0]), "ema.b": torch.tensor([-1.0]),
           "updates": torch.tensor(3), "last_step": torch.tensor(2)}
    ema = EMAModel(_Tiny(), 0.99)
    ema.load_state_dict(old)  # strict: every key has a home
    assert ema.ema.w.tolist() == [1.0, 1.0] and int(ema.averaged.n_averaged) == 3
    ema.update(3)  # n = 3: d = min(0.99, 4/13)
    d = 4 / 13
    assert ema.ema.w.tolist() == pytest.approx([d * 1.0 + (1 - d) * 2.0] * 2)


def test_ddpm_wraps_exports_and_updates_through_a_ddp_style_wrapper(tmp_path):
    spec = validate_spec(tiny_spec(
        tmp_path, method={"name": "ddpm", "channels": 8, "channel_mult": [1, 2],
                          "timesteps": 10}, eval={"scores": ["lmd"]}))
    method = build_method(spec)
    wrapped = method.wrap(method.build(10))
    exported = method.export(wrapped)
    assert isinstance(exported, DiffusionModel) and exported is wrapped.ema
    assert torch.equal(exported.alphas_cumprod, wrapped.net.alphas_cumprod)

    class _DDPLike(nn.Module):  # what DistributedDataParallel exposes: ``.module``
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    ddp = _DDPLike(wrapped)
    assert _ema_module(ddp) is wrapped and _ema_module(wrapped) is wrapped
    with torch.no_grad():
        for p in wrapped.net.parameters():
            p.add_(1.0)
    _ema_module(ddp).update(0)  # the first update copies the trained weights
    for e, p in zip(wrapped.ema.parameters(), wrapped.net.parameters(), strict=True):
        assert torch.equal(e, p)


# --- MLflow -------------------------------------------------------------------------------


def test_child_run_is_nested_under_its_parent_and_batches_are_split_by_mlflow(tmp_path):
    spec = validate_spec(tiny_spec(tmp_path, tracking={"experiment": "library-features"}))
    parent = tracking.start_run(spec, tags={"oodlab.role": "search"})
    child = tracking.start_run(spec, tags={"oodlab.role": "trial"}, parent_run_id=parent)
    client = MlflowClient(tracking.tracking_uri(spec))
    run = client.get_run(child)
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert client.get_parent_run(child).info.run_id == parent
    assert MLFLOW_PARENT_RUN_ID not in client.get_run(parent).data.tags
    assert run.info.run_name == spec.name and run.data.tags["mlflow.runName"] == spec.name
    assert run.data.tags["oodlab.role"] == "trial" and run.info.status == "RUNNING"
    assert run.data.params["train.lr"] == str(spec.train.lr)

    many = {f"m/{i:04d}": float(i) for i in range(2500)}  # > MLflow's 1000 per request
    tracking.log_metrics(client, child, many | {"skipped": "text", "nan": math.nan}, step=3)
    metrics = client.get_run(child).data.metrics
    assert metrics == many
    assert [m.step for m in client.get_metric_history(child, "m/2499")] == [3]


# --- Pareto front -------------------------------------------------------------------------


def _dominates(a: list[float], b: list[float], sign: list[float]) -> bool:
    pairs = [(s * x, s * y) for s, x, y in zip(sign, a, b, strict=True)]
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


@pytest.mark.parametrize("modes", [["max"], ["min"], ["max", "max"], ["max", "min"],
                                   ["min", "max", "min"]])
def test_pareto_front_is_the_set_of_non_dominated_trials(modes):
    rng = random.Random(len(modes) * 7 + (modes[0] == "max"))
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    for _ in range(20):
        # coarse values: ties and duplicate trials are common
        trials = [TrialRecord(str(i), None, {}, [rng.randint(0, 4) / 4 for _ in modes], 1,
                              "done") for i in range(rng.randint(1, 12))]
        front = pareto_front(trials, modes)
        expected = [t for t in trials
                    if not any(_dominates(o.values, t.values, sign) for o in trials)]
        assert front == expected  # same trials, in the given order


def test_pareto_front_keeps_ties_and_drops_dominated():
    t = [TrialRecord(n, None, {}, v, 1, "done") for n, v in
         (("a", [0.9, 0.5]), ("b", [0.8, 0.9]), ("c", [0.7, 0.4]), ("d", [0.9, 0.5]))]
    assert [x.trial_id for x in pareto_front(t, ["max", "max"])] == ["a", "b", "d"]
    assert [x.trial_id for x in pareto_front(t, ["min", "min"])] == ["c"]
    assert [x.trial_id for x in pareto_front(t[:1], ["max", "max"])] == ["a"]


# --- progress -----------------------------------------------------------------------------


def test_one_progress_printer_for_every_part(capsys):
    import oodlab.detect.diffusion.scoring as scoring
    import oodlab.search.tune as tune
    import oodlab.train.loop as loop

    assert loop.progress is tune.progress is scoring.progress is console.progress
    console.progress("epoch 1/2")
    console.progress("trial 1/3 done", source="tune")
    scoring._progress("lmd", 3, 10, t0=-1e9)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["[oodlab] epoch 1/2", "[oodlab tune] trial 1/3 done"]
    assert lines[2].startswith("[oodlab] lmd: 3/10 batches (ETA ") and len(lines) == 3


def test_time_left_extrapolates_the_pace_so_far_and_says_took_at_the_end():
    # 3 of 10 steps in 90 s: 7 more at 30 s each
    assert console.time_left(90.0, 3, 7) == "ETA 3:30"
    assert console.time_left(90.0, 3, 0) == "took 1:30"
    assert console.time_left(1800.0, 1, 2) == "ETA 1:00:00"
    assert console.time_left(0.4, 0, 5) == "ETA 0:02"  # none done: the time so far is one step


def test_console_is_a_leaf():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(console))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m and m.split(".")[0] == "oodlab" for m in imported), imported
