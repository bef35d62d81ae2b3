"""The tune-posthoc table: paired tuned − default differences and the validation-test rank
correlation, which needs three or more scores and says so instead of printing nan."""

from __future__ import annotations

import pytest

from oodlab.report.posthoc import posthoc_markdown, val_test_spearman
from oodlab.search.posthoc import ScoreSearch


def _search(name: str, val: float, test: float, gain: float) -> ScoreSearch:
    def metrics(auroc: float) -> dict[str, float]:
        return {"mean/auroc": auroc, "mean/fpr95": 1 - auroc, "near/auroc": auroc,
                "far/auroc": auroc}

    return ScoreSearch(name=name, default={}, best={"k": 1}, default_val=val, best_val=val + gain,
                       trials=[({}, val), ({"k": 1}, val + gain)],
                       test_default=metrics(test), test_best=metrics(test + gain))


def _summary(results: list[ScoreSearch]) -> dict:
    prov = {f"oodlab.provenance.{k}": k for k in ("checkpoint", "data", "spec", "code")}
    return {"results": {r.name: r for r in results}, "provenance": prov, "source": "runs:/x",
            "run_id": "y", "best_score": results[0].name, "best_params": results[0].best}


def test_spearman_over_scores_and_its_absence_with_one_score() -> None:
    three = _summary([_search("a", 0.90, 0.80, 0.01), _search("b", 0.95, 0.85, 0.01),
                      _search("c", 0.97, 0.99, 0.01)])
    assert val_test_spearman(three) == pytest.approx(1.0)
    assert "per checkpoint): +1.00, +1.00." in posthoc_markdown([three, three])
    one = [_summary([_search("mahalanobis", 0.93, 0.987, 0.004)]) for _ in range(2)]
    md = posthoc_markdown(one)
    assert "+nan" not in md
    assert "not computed, 1 score(s) searched (it needs 3 or more)." in md
    assert "| mahalanobis | 0.930 ± 0.000 (n=2) | 0.934 ± 0.000 (n=2) |" in md
