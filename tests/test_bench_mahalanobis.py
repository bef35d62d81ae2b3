"""bench/mahalanobis_shrinkage.py: summaries, paired differences and the markdown it writes."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("mahalanobis_shrinkage")


def _row(spec: str, seed: int, near0: float, near1: float) -> dict:
    return {"spec": spec, "seed": seed, "run": f"{spec}{seed}" * 4, "cache_hit": True,
            "condition_number": 900.0, "variance_in_class_mean_span": 0.7,
            "class_mean_span_dims": [10, 128], "origin_vs_id_test": {"0": 1.8, "1": 11.0},
            "feature_norm": {"id_test": 14.0, "near": 6.0, "far": 3.0},
            "auroc": {"0": {"near": near0, "far": 0.9, "val": 0.8},
                      "1": {"near": near1, "far": 0.95, "val": 0.85}}}


def test_paired_differences_are_per_seed_against_the_first_spec() -> None:
    bench = _bench()
    rows = [_row("base", 0, 0.98, 0.97), _row("base", 1, 0.96, 0.97),
            _row("oe", 0, 0.78, 0.99), _row("oe", 1, 0.80, 0.99), _row("oe", 2, 0.10, 0.10)]
    summary = bench.summarise(rows, [0, 1])
    # seed 2 of "oe" has no baseline partner: in the mean, not in the paired difference
    assert summary["oe"]["0"]["near"][0] == pytest.approx((0.78 + 0.80 + 0.10) / 3)
    d = summary["oe"]["0"]["near_minus_base"]
    assert d[0] == pytest.approx(-0.18) and d[1] == pytest.approx(0.02828, abs=1e-4) and d[2] == 2
    assert summary["oe"]["1"]["near_minus_base"][0] == pytest.approx(0.02)
    assert "near_minus_base" not in summary["base"]["0"]
    sel = bench.selection(summary, [0, 1])
    assert sel["oe"]["a_by_val"] == 1 and sel["oe"]["a_by_test"] == 1
    md = bench.markdown({"table": "t", "grid": [0, 1], "summary": summary, "rows": rows,
                         "selection": sel,
                         "command": "python bench/mahalanobis_shrinkage.py", "date": "d",
                         "host": "h", "figure": "docs/results/m.png"})
    assert "| oe | 0 | 0.560 ± 0.398 | 0.900 ± 0.000 | 0.800 ± 0.000 | -0.180 ± 0.028 (n=2) |" in md
    assert ("| oe | 2 | `oe2oe2oe2oe2` | 14.00 | 6.00 | 3.00 | 0.70 (10 of 128) | 900 | 1.8 | "
            "11.0 |") in md
    assert "| oe | +1.00 | 1 | 1 |" in md


def test_the_grid_must_hold_the_exact_estimator(capsys) -> None:
    with pytest.raises(SystemExit, match="0 \\(the exact estimator\\)"):
        _bench().main(["jobs/fmnist_supervised.yaml", "--table", "t", "--grid", "0.1", "1"])
