"""Seed aggregation of the results table: mean ± sample std by hand, missing shown as missing."""

from __future__ import annotations

from oodlab.results import mean_std


def test_mean_std_by_hand():
    # mean 2, sample std sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1
    assert mean_std([1.0, 2.0, 3.0]) == "2.000 ± 1.000 (n=3)"
    assert mean_std([0.5]) == "0.500 ± 0.000 (n=1)"


def test_missing_metric_is_a_dash_not_zero():
    assert mean_std([]) == "–"
