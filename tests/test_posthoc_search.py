"""Every knob searched by ``oodlab tune-posthoc`` changes the score; a knob with no effect
is refused; the feature cache is keyed by checkpoint and round-trips its shards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oodlab.detect.cache import cache_for, checkpoint_hash, data_hash
from oodlab.detect.outputs import Outputs
from oodlab.errors import SpecError
from oodlab.search.posthoc import SPACES, fitted, knob_effects


def tiny_outputs(n: int, seed: int) -> Outputs:
    g = torch.Generator().manual_seed(seed)
    fc = nn.Linear(16, 4)
    torch.manual_seed(seed)
    feats = torch.randn(n, 16, generator=g).relu() * 2
    with torch.no_grad():
        logits = fc(feats)
    return Outputs(logits, feats, torch.arange(n) % 4, (fc.weight.detach(), fc.bias.detach()))


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_searched_knob_changes_the_score(name: str) -> None:
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
