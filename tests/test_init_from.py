"""init_from really starts from the stored weights; a bad reference is an error."""

from __future__ import annotations

import pytest
import torch

from oodlab.spec import validate_spec
from oodlab.track.tracking import ModelReferenceError
from oodlab.train.pipeline import initial_weights, run_experiment
from tests.helpers import tiny_spec

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def source(ray_session, tmp_path_factory):
    """One trained, registered run (model ``init-src`` version 1) both tests start from."""
    tmp_path = tmp_path_factory.mktemp("init_from")
    return tmp_path, run_experiment(validate_spec(tiny_spec(
        tmp_path, method={"name": "supervised"}, eval={"scores": ["msp"]},
        tracking={"experiment": "tests", "model_name": "init-src"})))


def test_init_from_run_loads_the_stored_weights(source):
    tmp_path, first = source
    stored = first.report.detector.model.state_dict()
    for ref in (f"runs:/{first.run_id}", "models:/init-src/1", "models:/init-src@champion"):
        spec = validate_spec(tiny_spec(tmp_path, method={"name": "supervised"}, init_from=ref))
        if ref.endswith("@champion"):
            with pytest.raises(ModelReferenceError, match="cannot load a detector"):
                initial_weights(spec, 10)  # no alias set yet: an error, not a random init
            continue
        state = initial_weights(spec, 10)
        assert all(torch.equal(state[k], stored[k]) for k in stored)
    # the Ray workers really start from those weights: with a vanishing learning rate the
    # finetuned parameters stay where the stored model left them (a random init would not)
    tuned = run_experiment(validate_spec(tiny_spec(
        tmp_path, method={"name": "supervised"}, eval={"scores": ["msp"]},
        train={"epochs": 1, "lr": 1e-12}, init_from=f"runs:/{first.run_id}")))
    for name, p in tuned.report.detector.model.named_parameters():
        assert torch.allclose(p, stored[name], atol=1e-6), name


def test_init_from_missing_or_mismatched_is_an_error(source):
    tmp_path, src = source
    spec = validate_spec(tiny_spec(tmp_path, init_from="runs:/0123abcd"))
    with pytest.raises(ModelReferenceError, match="runs:/0123abcd"):
        initial_weights(spec, 10)
    wider = validate_spec(tiny_spec(tmp_path, model={"arch": "small_cnn", "width": 16},
                                    init_from=f"runs:/{src.run_id}"))
    with pytest.raises(ModelReferenceError, match="does not fit model"):
        initial_weights(wider, 10)
