"""The vectorised minute (``Runtime.on_bars``) decides exactly as the bar-by-bar path does."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.journal import Journal, read_journal
from daemon.backtest.baselines import RuleEngine
from daemon.batcher import Batcher
from daemon.clock import FakeClock
from daemon.config import Config, FeedConfig, RiskConfig, UniverseConfig
from daemon.engineset import EngineSet
from daemon.feed.columns import from_bars
from daemon.feed.protocol import Bar
from daemon.runtime import Runtime
from engines.chooser import DEFAULT_MODEL
from engines.manifest import load_manifest
from risk.failover import FailoverPolicy

NS_MIN = 60_000_000_000
T0 = 1_700_000_040 * 1_000_000_000
SYMBOLS = ("AAA", "BBB", "CCC", "DDD", "EEE")
MANIFEST = load_manifest(DEFAULT_MODEL)

bar_rows = st.lists(
    st.tuples(
        st.sampled_from((*SYMBOLS, "ZZZ")),  # ZZZ: not in the universe
        st.sampled_from((0, 0, 0, 0, -1, 1, 5_000)),  # minute offset: mostly this minute; late, early, far
        st.sampled_from((100.0, 101.0, 94.0, 107.0, 1e-9, 2e9)),  # close: steady, small and big moves, absurd
        st.sampled_from((0.0, 1_000.0, 2e15)),  # volume (2e15: over the bound)
        st.sampled_from((None, None, 100.0, 1e12)),  # prev_close
    ),
    max_size=8,
)


def _runtime(work: Path) -> Runtime:
    config = Config(
        universe=UniverseConfig(symbols=SYMBOLS),
        feed=FeedConfig(max_ahead_s=3600.0),
        risk=RiskConfig(clock="feed"),
    )
    engine = RuleEngine("momentum", MANIFEST, MANIFEST.batch_buckets)
    engines = EngineSet(engine, None, FailoverPolicy(10**12, 1, 1), lambda: 0)
    clock = FakeClock(wall_ns=T0 + 10 * NS_MIN)
    return Runtime(config, engines, clock, Journal(work / "journal.msgpack", "none"))


def _bars(minute: int, rows: list[tuple[str, int, float, float, float | None]], seq: int) -> list[Bar]:
    out = []
    for symbol, offset, close, volume, prev in rows:
        seq += 1
        ts = T0 + (minute + offset) * NS_MIN
        out.append(Bar(seq, symbol, ts, close, close * 1.001, close * 0.999, close, volume, prev))
    return out


def _state(rt: Runtime) -> tuple[object, ...]:
    s, w = rt.stats, rt.windows
    rt.flush_bars()
    rt.journal.sync()
    journaled = sorted(
        (sym, ts)
        for r in read_journal(rt.journal.path)
        if r["kind"] == "bars"
        for sym, ts in zip(r["symbols"], np.frombuffer(r["bar_ts"], dtype="<i8").tolist(), strict=True)
    )
    halts = [(e.action, e.symbol, e.ts) for e in rt.desk.halt_log]
    return (
        w.buf.tobytes(),
        w.count.tolist(),
        w.last_ts.tolist(),
        w.last_close.tolist(),
        s.bars_received,
        s.bars_accepted,
        dict(s.bars_rejected),
        s.bars_warmup,
        s.seq_gaps,
        journaled,
        halts,
        {k: str(v) for k, v in rt.desk.halts.state.items()},
        str(rt.desk.halts.market),
        rt.desk.risk.feed_now,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bar_rows, min_size=1, max_size=6))
def test_on_bars_when_given_any_minutes_matches_on_bar_bar_by_bar(minutes: list[list[tuple]]) -> None:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        one, many = _runtime(Path(a)), _runtime(Path(b))
        seq = 0
        for m, rows in enumerate(minutes):
            bars = _bars(m, rows, seq)
            seq += len(bars)
            for bar in bars:
                one.on_bar(bar, 0)
            many.on_bars(from_bars(bars, many.windows.index), 0)
        assert _state(one) == _state(many)


@given(st.lists(st.lists(st.integers(0, 9), max_size=10, unique=True), max_size=6))
def test_batcher_add_many_when_adding_minutes_queues_as_add_does(minutes: list[list[int]]) -> None:
    one, many = Batcher(10, 4, 1000), Batcher(10, 4, 1000)
    for m, symbols in enumerate(minutes):
        full_one = False
        for i in symbols:
            full_one = one.add(i, m, m, float(i), m) or full_one
        idx = np.array(symbols, dtype=np.int64)
        full_many = many.add_many(idx, m, np.full(len(idx), m), idx.astype(float), m)
        assert full_one == full_many and one.superseded == many.superseded and len(one) == len(many)
        if m % 2:
            a, b = one.take(), many.take()
            assert a.symbols.tolist() == b.symbols.tolist() and a.ts_recv.tolist() == b.ts_recv.tolist()
            assert a.close.tolist() == b.close.tolist() and a.ts_ready.tolist() == b.ts_ready.tolist()


def test_halt_rule_on_bars_when_a_symbol_moves_too_far_halts_as_on_bar() -> None:
    with tempfile.TemporaryDirectory() as a:
        rt = _runtime(Path(a))
        first = [Bar(k + 1, s, T0, 100.0, 100.1, 99.9, 100.0, 1.0, 100.0) for k, s in enumerate(SYMBOLS)]
        rt.on_bars(from_bars(first, rt.windows.index), 0)
        moved = [
            Bar(10 + k, s, T0 + NS_MIN, 100.0, 106.0, 99.9, 106.0 if s == "BBB" else 100.0, 1.0, 100.0)
            for k, s in enumerate(SYMBOLS)
        ]
        rt.on_bars(from_bars(moved, rt.windows.index), 0)
        assert rt.desk.halts.halted_symbols() == ["BBB"]
        assert math.isclose(rt.windows.last_close[1], 106.0)
