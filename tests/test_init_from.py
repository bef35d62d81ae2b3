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


def test_spec_reference_is_this_seeds_run_on_the_same_training_set(tmp_path, monkeypatch):
    """``spec:<name>`` resolves per seed *and* per ID training set: a newer run of the same
    spec on other images (a ``data.limit`` table beside a full-size one) is never taken."""
    from oodlab.track import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = validate_spec(tiny_spec(tmp_path, seed=2, init_from="spec:pre",
                                   tracking={"experiment": "chain"}))
    client = tracking.client_for(spec)
    exp = tracking.ensure_experiment(client, spec)
    clock = iter(range(1_000, 2_000))  # distinct start times: "newest" is well defined

    def run(seed: int, split: str) -> str:
        r = client.create_run(exp, start_time=next(clock), run_name="pre", tags={
            "oodlab.seed": str(seed), "oodlab.provenance.split.id_train": split})
        client.set_terminated(r.info.run_id, status="FINISHED")
        return r.info.run_id

    full = run(2, "hash-full")
    capped = run(2, "hash-capped")  # newer, other images
    run(3, "hash-full")  # newer, another seed
    assert tracking.resolve_init_from(spec, "hash-full") == f"runs:/{full}"
    assert tracking.resolve_init_from(spec, "hash-capped") == f"runs:/{capped}"
    assert tracking.resolve_init_from(spec) == f"runs:/{capped}"  # no hash: newest of seed 2
    with pytest.raises(ModelReferenceError, match=r"seed 2 on this ID training set "
                                                  r"\(split.id_train hash-other\)"):
        tracking.resolve_init_from(spec, "hash-other")
