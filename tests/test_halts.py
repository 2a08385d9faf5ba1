"""The halt rule: moves of 5 % or more latch a halt; the benchmark or a share halts the market;
and the real SPY daily history, replayed as a feed, halts on exactly its ±5 % days."""

from __future__ import annotations

import csv
import datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.sim import BrokerSimulator, SimConfig
from daemon.app import Daemon
from daemon.config import HaltConfig, RiskConfig
from daemon.feed.replay import ReplayServer, load_csv
from risk.halts import NS_PER_DAY, HaltBook, HaltEvent, HaltRule, moved_too_far
from risk.states import TradingState
from tests.conftest import SPY_DAILY_CSV
from tests.helpers import rig_config, wait_for

DAY = NS_PER_DAY


def _changes(events: list[HaltEvent]) -> list[HaltEvent]:
    return [e for e in events if e.action != "reference"]


@given(ref=st.floats(1, 1000), move=st.floats(-0.5, 0.5), pct=st.floats(0.5, 20))
def test_moved_too_far_is_a_symmetric_threshold(ref: float, move: float, pct: float) -> None:
    close = ref * (1 + move)
    if abs(abs(move) * 100 - pct) > 1e-6:
        assert moved_too_far(close, ref, pct) == (abs(move) * 100 >= pct)


@given(closes=st.lists(st.floats(50, 150), min_size=1, max_size=30), prev=st.floats(50, 150))
def test_a_symbol_halts_on_its_first_big_move_and_stays_halted(closes: list[float], prev: float) -> None:
    book = HaltBook(HaltRule(move_pct=5.0), ("A", "B"))
    first = next((k for k, c in enumerate(closes) if moved_too_far(c, prev, 5.0)), None)
    for k, close in enumerate(closes):
        events = _changes(book.on_bar("A", 10 * DAY + k, close, close, prev))
        assert [e.action for e in events] == (["halt"] if k == first else [])
    assert book.state["A"] is (TradingState.HALTED if first is not None else TradingState.ACTIVE)
    assert book.state["B"] is TradingState.ACTIVE
    assert book.market is TradingState.ACTIVE


def test_reference_is_the_sessions_first_open_without_prev_close() -> None:
    book = HaltBook(HaltRule(move_pct=5.0, market_share=2.0), ("A",))
    first = book.on_bar("A", DAY + 1, 100.0, 104.9, None)
    assert [(e.action, e.close) for e in first] == [("reference", 100.0)]
    assert [e.action for e in book.on_bar("A", DAY + 2, 104.9, 105.0, None)] == ["halt"]
    assert book.resume("A", DAY + 3, "operator") is not None
    # A new session: its first open is the new reference.
    assert not _changes(book.on_bar("A", 2 * DAY + 1, 120.0, 121.0, None))

    restored = HaltBook(HaltRule(move_pct=5.0, market_share=2.0), ("A",))
    restored.restore(first[0])
    assert [e.action for e in restored.on_bar("A", DAY + 5, 104.9, 105.0, None)] == ["halt"]


def test_benchmark_halt_halts_the_market_and_so_does_a_share_of_the_universe() -> None:
    book = HaltBook(HaltRule(move_pct=5.0, benchmark="SPY"), ("SPY", "A"))
    events = _changes(book.on_bar("SPY", DAY, 100.0, 94.0, 100.0))
    assert [(e.action, e.symbol) for e in events] == [("halt", "SPY"), ("halt", None)]
    assert book.market is TradingState.HALTED

    book = HaltBook(HaltRule(move_pct=5.0, market_share=0.5), ("A", "B", "C", "D"))
    assert [e.symbol for e in _changes(book.on_bar("A", DAY, 10.0, 11.0, 10.0))] == ["A"]
    assert [e.symbol for e in _changes(book.on_bar("B", DAY, 10.0, 9.0, 10.0))] == ["B", None]


def test_cooloff_lifts_a_halt_after_feed_time_passes() -> None:
    book = HaltBook(HaltRule(move_pct=5.0, market_share=2.0, cooloff_ns=3600 * 10**9), ("A",))
    book.on_bar("A", DAY, 100.0, 110.0, 100.0)
    assert not _changes(book.on_bar("A", DAY + 60 * 10**9, 110.0, 110.0, 100.0))
    events = book.on_bar("A", DAY + 3600 * 10**9, 110.0, 101.0, 100.0)
    assert [e.action for e in events] == ["lift"]
    assert book.state["A"] is TradingState.ACTIVE


def test_states_move_by_the_transition_table_and_restore_from_events() -> None:
    book = HaltBook(HaltRule(market_share=2.0), ("A",))
    events = [book.reduce("A", 1, "op"), book.halt("A", 2, "op"), book.resume("A", 3, "op"), book.reduce(None, 4, "op")]
    assert [(e.action, e.symbol) for e in events if e] == [
        ("reduce", "A"),
        ("halt", "A"),
        ("lift", "A"),
        ("reduce", None),
    ]
    assert book.reduce("A", 5, "op") is not None and book.reduce("A", 6, "op") is None
    again = HaltBook(HaltRule(market_share=2.0), ("A",))
    for e in events:
        if e is not None:
            again.restore(e)
    assert again.state["A"] is TradingState.ACTIVE and again.market is TradingState.REDUCING


def test_operator_halt_and_resume_name_unknown_symbols() -> None:
    from risk.errors import UnknownSymbolError  # noqa: PLC0415

    book = HaltBook(HaltRule(), ("A",))
    with pytest.raises(UnknownSymbolError, match="ZZZ"):
        book.halt("ZZZ", 0, "operator")
    assert book.halt(None, 0, "operator") is not None
    assert book.halt(None, 0, "operator") is None


async def test_spy_daily_history_replayed_as_a_feed_halts_on_exactly_its_five_percent_days(tmp_path: Path) -> None:
    if not SPY_DAILY_CSV.is_file():
        pytest.skip(f"real SPY daily bars not found at {SPY_DAILY_CSV} (the shared data folder is absent)")
    with SPY_DAILY_CSV.open() as f:
        rows = list(csv.DictReader(f))
    expected = {
        rows[k]["date"]
        for k in range(1, len(rows))
        if abs(float(rows[k]["close"]) / float(rows[k - 1]["close"]) - 1) >= 0.05
    }
    assert len(expected) == 38
    minutes = load_csv(SPY_DAILY_CSV)
    feed = ReplayServer(minutes, speed=0)
    broker = BrokerSimulator(SimConfig())
    # A halt lifts after an hour of feed time, so each day is judged on its own move.
    risk = RiskConfig(clock="feed", halt=HaltConfig(move_pct=5.0, cooloff_s=3600))
    daemon = Daemon(rig_config(tmp_path, await feed.start(), await broker.start(), ("SPY",), risk=risk))
    try:
        await daemon.start()
        await wait_for(lambda: daemon.stats.minute_ends == len(minutes), timeout=120, what="the whole history")
        halted_days = {_date(e.ts) for e in daemon.runtime.desk.halt_log if e.action == "halt" and e.symbol == "SPY"}
    finally:
        await daemon.shutdown()
        await feed.close()
        await broker.close()
    assert halted_days == expected


def _date(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts / 1e9, datetime.UTC).strftime("%Y-%m-%d")
