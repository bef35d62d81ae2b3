"""Every knob searched by ``oodlab tune-posthoc`` changes the score; a knob with no effect
is refused; the feature cache is keyed by checkpoint and round-trips its shards."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from oodlab.detect.cache import cache_for, checkpoint_hash, data_hash
from oodlab.detect.outputs import Outputs
from oodlab.errors import SpecError
from oodlab.registry import SCORES
from oodlab.search.posthoc import SPACES, fitted, knob_effects


def tiny_outputs(n: int, seed: int) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    fc = nn.Linear(16, 4)
    torch.manual_seed(seed)
    feats = torch.randn(n, 16, generator=g).relu() * 2
    with torch.no_grad():
        logits = fc(feats)
    return Outputs(logits, feats, torch.arange(n) % 4, (fc.weight.detach(), fc.bias.detach()))


@pytest.mark.parametrize("name", [n for n in sorted(SPACES) if not SCORES[n].needs_model])
def test_every_searched_knob_changes_the_score(name: str) -> None:  # ODIN: below
    train, probe = tiny_outputs(200, 0), tiny_outputs(50, 1)
    effects = knob_effects(name, SPACES[name], train, probe, num_classes=4)
    assert set(effects) == set(SPACES[name])
    assert all(v > 1e-9 for v in effects.values())


def test_a_knob_without_effect_fails() -> None:
    train, probe = tiny_outputs(200, 0), tiny_outputs(50, 1)
    with pytest.raises(SpecError, match="'chunk' does not change"):
        knob_effects("knn", {"chunk": ("int", 8, 512, False)}, train, probe, num_classes=4)
    with pytest.raises(SpecError, match="'seed' does not change"):  # bank larger than the set
        knob_effects("knn", {"seed": ("int", 0, 9, False)}, train, probe, num_classes=4)


def test_cache_round_trip_and_keys(tmp_path) -> None:
    out = tiny_outputs(10, 0)
    model = nn.Linear(3, 2)
    key = checkpoint_hash(model.state_dict())
    assert key == checkpoint_hash(model.state_dict())
    with torch.no_grad():
        model.bias.add_(1e-3)
    assert checkpoint_hash(model.state_dict()) != key
    assert data_hash({"id": "a"}, {"id_train": 5}) != data_hash({"id": "a"}, {"id_train": 6})
    cache = cache_for(tmp_path, key, "d")
    assert not cache.complete
    rel = [cache.write_shard("id_train", i, Outputs(out.logits[i * 5:(i + 1) * 5],
                                                     out.features[i * 5:(i + 1) * 5],
                                                     out.labels[i * 5:(i + 1) * 5]))
           for i in range(2)]
    cache.finish({"id_train": [(r, 5) for r in rel]}, out.head, {})
    back = cache.outputs("id_train")
    torch.testing.assert_close(back.features, out.features)
    assert len(cache.chunks("id_train")) == 2
    a = fitted("vim", {"dim": 4}, back).score(out.logits, out.features)
    b = fitted("vim", {"dim": 4}, out).score(out.logits, out.features)
    torch.testing.assert_close(a, b)


class TinyNet(nn.Module):
    """(logits, features) of 1x4x4 images, for scores that run the network (ODIN)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return self.fc(f), f


def test_odin_epsilon_is_searched_through_the_network() -> None:
    """ODIN's ε perturbs the input, so its knob check needs the network: without one it is an
    error, with one both ODIN knobs change the scores."""
    train, probe = tiny_outputs(200, 0), tiny_outputs(50, 1)
    assert set(SPACES["odin"]) == {"temperature", "epsilon"}
    with pytest.raises(ValueError, match="needs the network"):
        knob_effects("odin", SPACES["odin"], train, probe, num_classes=4)
    net, x = TinyNet(), torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    effects = knob_effects("odin", SPACES["odin"], train, probe, num_classes=4,
                           score_probe=lambda s: s.score_model(net, x))
    assert effects["epsilon"] > 1e-6 and effects["temperature"] > 1e-6


@pytest.mark.slow
def test_tune_posthoc_end_to_end(ray_session, tmp_path) -> None:
    """A trained run's checkpoint: features cached once (a second search hits the cache and
    gives the same numbers), one MLflow child run per trial, ODIN searched through the
    network, provenance tags, the table over checkpoints, and the registered best detector
    promotable to champion like a trained run."""
    from mlflow import MlflowClient

    from oodlab.cli.main import main
    from oodlab.search.posthoc import tune_posthoc
    from oodlab.search.promote import promote
    from oodlab.spec import validate_spec
    from oodlab.track import tracking
    from oodlab.train.pipeline import run_experiment
    from tests.helpers import tiny_spec

    spec = validate_spec(tiny_spec(tmp_path, method={"name": "supervised"},
                                   data={"val_ood": ["val_letters", "val_noise"]},
                                   tracking={"experiment": "tests", "model_name": "ph"}))
    run = run_experiment(spec)
    ref, scores = f"runs:/{run.run_id}", ["energy", "odin", "knn"]
    first = tune_posthoc(ref, scores=scores, n_trials=3, tracking_uri=run.tracking_uri,
                         overrides=["tracking.experiment=tests-posthoc"])
    assert not first["cache_hit"]
    assert {n: set(r.knob_effects) for n, r in first["results"].items()} == {
        "energy": {"temperature"}, "odin": {"temperature", "epsilon"}, "knn": {"k"}}
    odin = first["results"]["odin"]
    assert odin.default == {"temperature": 1000.0, "epsilon": 0.0014}
    assert len({p["epsilon"] for p, _ in odin.trials}) == 3

    client = MlflowClient(run.tracking_uri)
    parent = client.get_run(first["run_id"])
    assert {"checkpoint", "data", "spec", "code"} <= {
        k.removeprefix("oodlab.provenance.") for k in parent.data.tags
        if k.startswith("oodlab.provenance.")}
    trained = client.get_run(run.run_id).data.tags  # the search names the weights it read
    for key in ("checkpoint", "split.id_train", "split.id_test", "split.test_ood"):
        assert trained[f"oodlab.provenance.{key}"] == parent.data.tags[f"oodlab.provenance.{key}"]
    assert {f"oodlab.provenance.split.{s}" for s in ("id_train", "id_val", "id_test",
                                                     "val_ood", "test_ood")} <= set(trained)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{first['run_id']}'")
    assert sorted(c.data.tags["oodlab.score"] for c in children) == sorted(scores * 3)

    promoted = promote(first["run_id"], tracking_uri=run.tracking_uri)
    assert promoted.champion and promoted.model_name == "ph"
    champion = tracking.load_detector("models:/ph@champion", run.tracking_uri)
    assert champion.score_fn.name == first["best_score"]

    table = tmp_path / "posthoc.md"
    os.environ["MLFLOW_TRACKING_URI"] = run.tracking_uri
    try:
        assert main(["tune-posthoc", ref, "--scores", *scores, "--trials", "3", "--no-register",
                     "--set", "tracking.experiment=tests-posthoc", "--out", str(table)]) == 0
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    second = client.get_run(client.search_runs(
        [parent.info.experiment_id], "tags.`oodlab.posthoc` = 'true'",
        order_by=["attributes.start_time DESC"], max_results=1)[0].info.run_id)
    assert second.data.metrics["cache_hit"] == 1.0  # no network for the cached scores
    for name in scores:  # same checkpoint, same data, same seeded search: same numbers
        key = f"test/{name}/tuned/mean/auroc"
        assert second.data.metrics[key] == pytest.approx(parent.data.metrics[key])
    text = table.read_text()
    assert all(f"| {n} |" in text for n in scores) and first["source"] in text


def test_cli_needs_a_model_or_a_results_table(capsys) -> None:
    from oodlab.cli.main import main

    assert main(["tune-posthoc"]) == 2
    assert "give MODEL(s) or --results-of" in capsys.readouterr().err
    assert main(["tune-posthoc", "--results-of", "jobs/fmnist_supervised.yaml"]) == 2
    assert "--results-of needs --table" in capsys.readouterr().err
