"""Deterministic crash points on the order path (``bench.crash_matrix``): the daemon exits at each
named point, the broker simulator restarts too (remembering every client order id it ever
received), and the restarted daemon trades on. No order reaches the broker twice, positions equal
the broker's, and every intent ends exactly one way."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.crash_matrix import POINTS, run_point, synth_csv
from broker.crashpoints import EXIT_CODE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_csv(tmp_path_factory.mktemp("bars") / "bars.csv")


@pytest.mark.parametrize("point", sorted(POINTS))
def test_a_crash_at_each_point_loses_no_order_and_sends_none_twice(point: str, bars: Path, tmp_path: Path) -> None:
    result = run_point(point, 0, tmp_path, bars)
    assert result.crashed == EXIT_CODE, f"the daemon did not reach {point}: exit {result.crashed}"
    assert result.final_exit == 0
    assert result.orders > 0 and result.detail["starts"] == 2
    assert result.duplicates == 0, "a client order id reached the broker twice"
    assert result.position_mismatches == 0, result.detail
    assert result.unended_intents == 0 and result.orphans == 0
