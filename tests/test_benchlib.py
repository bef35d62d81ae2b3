"""bench/benchlib.py: the no-Ray ceiling trains through the loop's own set-up and epoch."""

from __future__ import annotations

import sys
from pathlib import Path

from oodlab.spec import validate_spec
from tests.helpers import tiny_spec

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_plain_rates_trains_every_epoch_of_an_oe_method(tmp_path):
    """One images/s per epoch, with the OE stream an OE method needs (a method that uses OE
    fails without its OE batch)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    from benchlib import plain_rates

    spec = validate_spec(tiny_spec(tmp_path, train={"epochs": 2}))  # energy_oe
    rates = plain_rates(spec)
    assert len(rates) == 2 and all(r > 0 for r in rates)
