"""Plug-ins: a new method is one module and one decorator; validating a spec builds no model."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

from oodlab.methods import build_method
from oodlab.methods.base import TrainState
from oodlab.registry import METHODS, Registry
from oodlab.spec import SpecError, validate_spec
from oodlab.spec.search_space import SearchSpace, check_space
from tests.helpers import tiny_spec

TOY = textwrap.dedent('''
    """A toy method living outside oodlab: plain CE plus a declared metric."""
    from typing import Literal

    import torch.nn.functional as F
    from pydantic import Field

    from oodlab.methods.base import Method, MethodParams
    from oodlab.registry import METHODS


    class ToyParams(MethodParams):
        name: Literal["toy_ce"] = "toy_ce"
        scale: float = Field(1.0, gt=0)


    @METHODS.register
    class ToyCE(Method):
        name = "toy_ce"
        Params = ToyParams

        @classmethod
        def reported_metrics(cls, spec):
            return super().reported_metrics(spec) | {"toy/scale"}

        def training_step(self, model, batch, oe_batch, state):
            x, y = batch
            return self.params.scale * F.cross_entropy(model(x)[0], y)
''')


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    """The toy method as a new module on sys.path: nothing in oodlab is edited."""
    (tmp_path / "oodlab_toy_method.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("oodlab_toy_method")
    yield module
    METHODS.unregister("toy_ce")
    sys.modules.pop("oodlab_toy_method", None)


def test_one_new_module_adds_a_method(tmp_path, toy_module):
    spec = validate_spec(tiny_spec(tmp_path, method={"name": "toy_ce", "scale": 2.0},
                                   data={"oe": []}))
    assert type(spec.method) is toy_module.ToyParams and spec.method.scale == 2.0
    assert "toy_ce" in METHODS.names()
    # its own field is validated and named
    with pytest.raises(SpecError, match=r"method\.scale"):
        validate_spec(tiny_spec(tmp_path, method={"name": "toy_ce", "scale": -1}))
    # a search space may optimise the metric it declares
    space = SearchSpace.model_validate({
        "method": "toy_ce", "params": {"method.scale": {"type": "uniform", "low": 0.5,
                                                         "high": 2.0}},
        "objectives": [{"metric": "toy/scale", "mode": "max"}]})
    check_space(space, spec)
    # and it trains: the loss of one step is the scaled CE
    method = build_method(spec)
    model = method.build(num_classes=10)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    loss = method.training_step(model, (x, y), None, TrainState(num_classes=10))
    ce = torch.nn.functional.cross_entropy(model(x)[0], y)
    assert torch.allclose(loss, 2 * ce)


def test_unknown_method_lists_the_registered_ones(tmp_path):
    with pytest.raises(SpecError, match=r"unknown method 'nope'.*'supervised'"):
        validate_spec(tiny_spec(tmp_path, method={"name": "nope"}))


def test_undeclared_metric_is_rejected_as_objective(tmp_path):
    spec = validate_spec(tiny_spec(tmp_path))
    space = SearchSpace.model_validate({
        "method": "energy_oe", "params": {"train.lr": {"type": "loguniform", "low": 0.01,
                                                       "high": 0.1}},
        "objectives": [{"metric": "toy/scale", "mode": "max"}]})
    with pytest.raises(SpecError, match="never reported"):
        check_space(space, spec)


def test_declared_method_metrics_are_objectives(tmp_path):
    """um/* and val/denoise_loss are reported by their methods, so searches accept them."""
    um = METHODS.get("um").reported_metrics(validate_spec(tiny_spec(tmp_path)))
    assert {"um/ascent_fraction", "um/loss_constraint"} <= um
    ddpm = METHODS.get("ddpm")
    assert "val/denoise_loss" in ddpm.reported_metrics(validate_spec(tiny_spec(tmp_path)))
    assert "val/id_acc" not in ddpm.reported_metrics(validate_spec(tiny_spec(tmp_path)))


def test_validating_a_spec_builds_no_model(tmp_path, monkeypatch):
    """Spec validation reads class-level declarations only: building any network, or
    instantiating the method, during validation fails this test."""
    from oodlab.methods.base import Method
    from oodlab.models import unet

    def boom(*args, **kwargs):
        raise AssertionError("a model was built while validating a spec")

    monkeypatch.setattr(unet.UNet, "__init__", boom)
    monkeypatch.setattr(Method, "__init__", boom)
    monkeypatch.setattr(Method, "build", boom)
    ddpm = tiny_spec(tmp_path, method={"name": "ddpm", "channels": 8},
                     eval={"scores": ["lmd"]}, data={"oe": []})
    assert validate_spec(ddpm).method.name == "ddpm"
    # the method's own checks still run, cheaply
    with pytest.raises(SpecError, match="eval.scores"):
        validate_spec({**ddpm, "eval": {"scores": ["energy"]}})


def test_registry_rejects_a_second_plugin_with_the_same_name():
    reg: Registry = Registry("thing", "oodlab.methods")

    class A:
        name = "a"

    class B:
        name = "a"

    reg.register(A)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(B)
