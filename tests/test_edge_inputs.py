"""Hostile feed input at the edge: numbers and timestamps that used to wedge the daemon.

Every test runs a real daemon (ONNX Runtime, broker simulator) on loopback and feeds it what a
broken or malicious feed could send. Each bad bar must be rejected and counted by reason, the
connection must survive, bars received must equal accepted plus rejected, and the next good
minute must still become orders at the broker.
"""

from __future__ import annotations

import asyncio
import math
import random
from pathlib import Path

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import FrameError
from daemon.config import SignalConfig
from daemon.feed.ingest import FeedProtocol
from daemon.feed.protocol import (
    Bar,
    FeedBounds,
    Heartbeat,
    MinuteEnd,
    Rejected,
    RejectReason,
    UnknownType,
    check_bar,
    decode,
)
from engines.features import DEFAULT_FEATURES, feature_row_fn
from tests.helpers import NS_PER_MIN, T0, Rig, ScriptedFeed, bar, pack, running_rig, wait_for

WINDOW = 16
SYMBOLS = ("AAA", "BBB", "CCC")


def _minute(seq: int, minute: int) -> tuple[list[dict[str, object]], int]:
    messages: list[dict[str, object]] = []
    for k, symbol in enumerate(SYMBOLS):
        seq += 1
        close = 100.0 * math.exp(0.02 * math.sin(minute * (k + 1.3)))
        messages.append(bar(seq, symbol, minute, close=round(close, 2)))
    seq += 1
    messages.append({"type": "minute_end", "seq": seq, "ts": messages[-1]["ts"], "count": len(SYMBOLS)})
    return messages, seq


async def _send(rig: Rig, minutes: range, seq: int) -> int:
    for minute in minutes:
        messages, seq = _minute(seq, minute)
        rig.writer.write(pack(*messages))
    await rig.writer.drain()
    return seq


async def _settle(rig: Rig, minute_ends: int) -> None:
    s = rig.daemon.stats
    runtime = rig.daemon.runtime
    assert runtime is not None
    await wait_for(lambda: s.minute_ends == minute_ends and runtime.idle_event.is_set(), what=f"{minute_ends} minutes")


def _balanced(rig: Rig) -> bool:
    s = rig.daemon.stats
    return s.bars_received == s.bars_accepted + sum(s.bars_rejected.values())


async def _assert_next_minutes_trade(rig: Rig, first: int, seq: int, minute_ends: int) -> None:
    """Good minutes after the hostile input still become intents and orders at the broker."""
    s = rig.daemon.stats
    before = s.intents
    good = 8
    await _send(rig, range(first, first + good), seq)
    await _settle(rig, minute_ends + good)
    assert s.intents > before, "no order intent after the hostile input: the minute loop is wedged"
    assert s.orders_sent >= 1
    assert rig.broker is not None
    await wait_for(lambda: len(rig.broker.received) >= 1, what="an order at the broker")
    assert _balanced(rig)
    assert s.feed_connects == 1, "hostile values must not cost the connection"


async def _warm(rig: Rig) -> int:
    seq = await _send(rig, range(WINDOW), 0)
    await _settle(rig, WINDOW)
    return seq


def _signal() -> SignalConfig:
    return SignalConfig(confidence_threshold=0.0)


async def test_tiny_positive_price_when_fed_is_rejected_and_next_minute_trades(tmp_path: Path) -> None:
    """o = h = l = c = 1e-300 used to size a 1e304-share order and wedge the journal write."""
    async with running_rig(tmp_path, SYMBOLS, signal=_signal()) as rig:
        seq = await _warm(rig)
        tiny = [bar(seq + 1 + k, s, WINDOW, close=1e-300, high=1e-300, low=1e-300) for k, s in enumerate(SYMBOLS)]
        seq += len(SYMBOLS) + 1
        rig.writer.write(pack(*tiny, {"type": "minute_end", "seq": seq, "ts": T0 + WINDOW * NS_PER_MIN, "count": 3}))
        await rig.writer.drain()
        await _settle(rig, WINDOW + 1)
        s = rig.daemon.stats
        assert s.bars_rejected[RejectReason.PRICE_OUT_OF_RANGE] == 3
        await _assert_next_minutes_trade(rig, WINDOW + 1, seq, WINDOW + 1)


async def test_subnormal_close_when_fed_is_rejected_without_dropping_the_connection(tmp_path: Path) -> None:
    """close = 5e-324 used to raise in log(c/o) inside the feed callback and drop the connection."""
    async with running_rig(tmp_path, SYMBOLS, signal=_signal()) as rig:
        seq = await _warm(rig)
        rig.writer.write(pack(bar(seq + 1, "AAA", WINDOW, close=5e-324, open=100.0, high=100.0, low=5e-324)))
        await rig.writer.drain()
        s = rig.daemon.stats
        await wait_for(lambda: s.bars_received == 3 * WINDOW + 1, what="the subnormal bar")
        assert s.bars_rejected[RejectReason.PRICE_OUT_OF_RANGE] == 1
        assert _balanced(rig)
        await _assert_next_minutes_trade(rig, WINDOW, seq + 1, WINDOW)


async def test_future_timestamp_when_fed_is_rejected_and_the_symbol_keeps_trading(tmp_path: Path) -> None:
    """ts = 2^64 - 1 used to be accepted and lock the symbol out as out_of_order until restart."""
    async with running_rig(tmp_path, SYMBOLS, signal=_signal()) as rig:
        seq = await _warm(rig)
        far = [
            bar(seq + 1, "AAA", WINDOW, ts=2**64 - 1),
            bar(seq + 2, "BBB", WINDOW, ts=2**63 - 1),
            bar(seq + 3, "CCC", WINDOW, ts=T0 + 10 * 365 * 24 * 60 * NS_PER_MIN),
            # Still in the wall clock's past, but eleven days past the feed's minute.
            bar(seq + 4, "AAA", WINDOW, ts=T0 + 11 * 24 * 60 * NS_PER_MIN),
        ]
        rig.writer.write(pack(*far))
        await rig.writer.drain()
        s = rig.daemon.stats
        await wait_for(lambda: s.bars_received == 3 * WINDOW + 4, what="the future bars")
        assert s.bars_rejected[RejectReason.TS_OUT_OF_RANGE] == 1
        assert s.bars_rejected[RejectReason.FUTURE_TS] == 2
        assert s.bars_rejected[RejectReason.AHEAD_OF_FEED] == 1
        accepted = s.bars_accepted
        await _assert_next_minutes_trade(rig, WINDOW, seq + 4, WINDOW)
        assert s.bars_accepted == accepted + 8 * 3, "every later bar of every symbol is accepted"
        assert RejectReason.OUT_OF_ORDER not in s.bars_rejected
        runtime = rig.daemon.runtime
        assert runtime is not None
        assert runtime.desk.risk_now() == T0 + (WINDOW + 7) * NS_PER_MIN, "the feed clock did not jump"


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(10 if depth < 2 else 7)
    match kind:
        case 0:
            return None
        case 1:
            return rng.random() < 0.5
        case 2:
            return rng.choice([0, -1, 1, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(-(2**63), 2**64)])
        case 3:
            return rng.choice([0.0, -0.0, 5e-324, 1e-300, 1e300, math.inf, -math.inf, math.nan, rng.uniform(-1e6, 1e6)])
        case 4:
            return rng.choice(["", "AAA", "bar", "x" * 40, "\u00e9\u4e2d"])
        case 5:
            return rng.randbytes(rng.randrange(8))
        case 6:
            return rng.uniform(1e-9, 1e12)
        case 7:
            return [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
        case _:
            return {str(rng.randrange(5)): _random_value(rng, depth + 1) for _ in range(rng.randrange(3))}


def _hostile_messages(rng: random.Random, n: int) -> list[object]:
    fields = ("seq", "symbol", "ts", "open", "high", "low", "close", "volume", "prev_close")
    out: list[object] = []
    for k in range(n):
        message = bar(1000 + k, rng.choice(SYMBOLS), WINDOW)
        for key in rng.sample(fields, rng.randrange(1, 4)):
            message[key] = _random_value(rng)
        if rng.random() < 0.1:
            message["type"] = _random_value(rng)
        out.append(message if rng.random() < 0.9 else _random_value(rng))
    return out


async def test_random_msgpack_values_in_every_field_are_counted_and_the_next_minute_trades(tmp_path: Path) -> None:
    async with running_rig(tmp_path, SYMBOLS, signal=_signal()) as rig:
        seq = await _warm(rig)
        hostile = _hostile_messages(random.Random(12), 400)
        rig.writer.write(pack(*hostile))
        await rig.writer.drain()
        s = rig.daemon.stats
        bars = sum(1 for m in hostile if not isinstance(decode(m), UnknownType))
        await wait_for(lambda: s.bars_received == 3 * WINDOW + bars, what="every hostile message")
        assert _balanced(rig)
        await _assert_next_minutes_trade(rig, WINDOW + 1, seq + 10_000, WINDOW)


async def test_unknown_types_when_many_distinct_are_counted_in_a_bounded_table(tmp_path: Path) -> None:
    async with running_rig(tmp_path, SYMBOLS) as rig:
        rig.writer.write(pack(*({"type": f"kind-{k}-" + "x" * 200, "seq": k} for k in range(500))))
        rig.writer.write(pack(bar(600, "AAA", 0)))
        await rig.writer.drain()
        s = rig.daemon.stats
        await wait_for(lambda: s.bars_accepted == 1, what="the bar after the unknown types")
        assert sum(s.unknown_types.values()) == 500
        assert len(s.unknown_types) <= 33
        assert all(len(key) <= 64 for key in s.unknown_types)
        assert s.unknown_types["(other)"] == 500 - (len(s.unknown_types) - 1)


class _RaisingSink:
    """A feed sink whose bar callback fails on the second bar, as a bug would."""

    def __init__(self) -> None:
        self.bars: list[int] = []
        self.errors: list[tuple[str, str]] = []
        self.minute_ends = 0
        self.lost = 0
        self.connected = asyncio.Event()

    def on_bar(self, message: Bar, ts_recv: int) -> None:
        if message.seq == 2:
            raise RuntimeError("a bug in the sink")
        self.bars.append(message.seq)

    def on_bar_group(self, bars: list[Bar], ts_recv: int, values: object = None) -> None:
        for one in bars:
            self.on_bar(one, ts_recv)

    def on_minute_end(self, message: MinuteEnd, ts_recv: int) -> None:
        self.minute_ends += 1

    def on_heartbeat(self, message: Heartbeat, ts_recv: int) -> None:
        pass

    def on_rejected(self, rejected: Rejected, ts_recv: int) -> None:
        pass

    def on_unknown_type(self, message: UnknownType) -> None:
        pass

    def on_feed_connected(self, feed: FeedProtocol) -> None:
        self.connected.set()

    def on_feed_lost(self) -> None:
        self.lost += 1

    def on_frame_error(self, error: FrameError) -> None:
        pass

    def on_internal_error(self, exc: BaseException, where: str) -> None:
        self.errors.append((where, str(exc)))


async def test_ingest_when_sink_raises_reports_it_and_keeps_the_connection() -> None:
    feed = ScriptedFeed()
    port = await feed.start()
    sink = _RaisingSink()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(lambda: FeedProtocol(sink, 1024, lambda: 0), "127.0.0.1", port)
    try:
        writer = await feed.next_connection()
        writer.write(pack(bar(1, "AAA", 0), bar(2, "AAA", 1), bar(3, "AAA", 2), {"type": "minute_end", "seq": 4}))
        writer.write(pack({"type": "minute_end", "seq": 5, "ts": 0, "count": 3}))
        await writer.drain()
        await wait_for(lambda: sink.minute_ends == 1, what="the minute end after the failing bar")
        # The bars of one read go on as a group: the group the bug hit is reported, and delivery
        # goes on with the next message.
        assert sink.bars == [1]
        assert sink.errors == [("bar", "a bug in the sink")]
        assert sink.lost == 0 and not transport.is_closing()
    finally:
        transport.close()
        await feed.close()


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
BAR_FIELDS = ("type", "seq", "symbol", "ts", "open", "high", "low", "close", "volume", "prev_close")


@given(
    fields=st.dictionaries(st.sampled_from(BAR_FIELDS), msgpack_values),
    base=st.sampled_from(["bar", "minute_end", "heartbeat"]),
    wall=st.integers(0, 2**63 - 1),
    feed=st.none() | st.integers(-(2**63), 2**63 - 1),
)
def test_decode_and_check_when_any_field_holds_any_msgpack_value_never_raise(
    fields: dict[str, object], base: str, wall: int, feed: int | None
) -> None:
    """Whatever a feed sends in whatever field, decoding and checking return a value, and a bar
    that passes both has finite features."""
    raw = {**bar(1, "AAA", 0), "type": base, "count": 1, **fields}
    wire = msgpack.unpackb(msgpack.packb(raw), raw=False, strict_map_key=False)
    message = decode(wire)
    assert isinstance(message, Bar | MinuteEnd | Heartbeat | UnknownType | Rejected)
    if isinstance(message, Bar):
        verdict = check_bar(message, FeedBounds(), wall, feed)
        assert verdict is None or isinstance(verdict, Rejected)
        if verdict is None:
            b = message
            row = feature_row_fn(DEFAULT_FEATURES)(b.open, b.high, b.low, b.close, b.volume, b.prev_close or 0.0)
            assert all(math.isfinite(x) for x in row)
