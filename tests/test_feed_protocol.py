"""Feed protocol v1 decoding and bounds: every rejection reason, and properties over arbitrary input."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.feed.protocol import (
    NS_PER_S,
    Bar,
    FeedBounds,
    Heartbeat,
    MinuteEnd,
    Rejected,
    RejectReason,
    UnknownType,
    bar_map,
    check_bar,
    decode,
)
from tests.helpers import T0, bar


def test_decode_when_bar_is_valid_returns_frozen_bar() -> None:
    message = decode(bar(7, "AAA", 0, close=50.0, prev_close=49.0))
    assert isinstance(message, Bar)
    assert (message.seq, message.symbol, message.close, message.prev_close) == (
        7,
        "AAA",
        50.0,
        49.0,
    )
    with pytest.raises(AttributeError):
        message.close = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"close": None}, RejectReason.MISSING_FIELD),
        ({"symbol": None}, RejectReason.MISSING_FIELD),
        ({"ts": "yesterday"}, RejectReason.BAD_TYPE),
        ({"seq": 1.5}, RejectReason.BAD_TYPE),
        ({"seq": -1}, RejectReason.BAD_TYPE),
        ({"open": "100"}, RejectReason.BAD_TYPE),
        ({"volume": True}, RejectReason.BAD_TYPE),
        ({"symbol": ""}, RejectReason.BAD_TYPE),
        ({"close": math.nan}, RejectReason.NON_FINITE),
        ({"high": math.inf}, RejectReason.NON_FINITE),
        ({"close": 0.0, "low": 0.0, "open": 0.0}, RejectReason.NON_POSITIVE_PRICE),
        ({"prev_close": -3.0}, RejectReason.NON_POSITIVE_PRICE),
        ({"low": 100.5}, RejectReason.INCONSISTENT_OHLC),
        ({"high": 99.0}, RejectReason.INCONSISTENT_OHLC),
        ({"volume": -1.0}, RejectReason.NEGATIVE_VOLUME),
    ],
)
def test_decode_when_bar_is_bad_rejects_with_reason(override: dict[str, object], reason: RejectReason) -> None:
    raw = bar(3, "AAA", 0)
    for key, value in override.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    message = decode(raw)
    assert isinstance(message, Rejected)
    assert message.reason is reason
    assert message.detail


def test_decode_when_not_a_map_rejects() -> None:
    assert decode([1, 2, 3]) == Rejected(RejectReason.NOT_A_MAP, "expected a map, got list")


def test_decode_when_type_is_unknown_returns_unknown_type() -> None:
    assert decode({"type": "trade", "seq": 1}) == UnknownType("trade")


def test_decode_control_messages() -> None:
    assert decode({"type": "minute_end", "seq": 5, "ts": 10, "count": 4}) == MinuteEnd(5, 10, 4)
    assert decode({"type": "heartbeat", "seq": 6, "ts": 11}) == Heartbeat(6, 11)
    assert decode({"type": "minute_end", "seq": 5, "ts": 10}) == Rejected(RejectReason.MISSING_FIELD, "count", 5)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=12,
)


@given(msgpack_values)
def test_decode_never_raises_on_any_msgpack_value(value: object) -> None:
    assert isinstance(decode(value), Bar | MinuteEnd | Heartbeat | UnknownType | Rejected)


@given(
    st.dictionaries(
        st.sampled_from(["type", "seq", "symbol", "ts", "open", "high", "low", "close", "volume", "prev_close"]),
        msgpack_values,
    )
)
def test_decode_never_raises_on_bar_shaped_maps(value: dict[str, object]) -> None:
    value["type"] = "bar"
    message = decode(value)
    assert isinstance(message, Bar | Rejected)


prices = st.floats(min_value=0.01, max_value=1e6, allow_nan=False)


@given(
    seq=st.integers(0, 2**63),
    symbol=st.text(min_size=1, max_size=12),
    ts=st.integers(-(2**62), 2**62),
    a=prices,
    b=prices,
    spread=st.floats(0, 10),
    volume=st.floats(0, 1e12),
)
def test_decode_round_trips_every_valid_bar_through_msgpack(
    seq: int, symbol: str, ts: int, a: float, b: float, spread: float, volume: float
) -> None:
    original = Bar(seq, symbol, ts, a, max(a, b) + spread, min(a, b), b, volume)
    assert decode(msgpack.unpackb(msgpack.packb(bar_map(original)))) == original


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (bar(1, "AAA", 0, ts=2**64 - 1), RejectReason.TS_OUT_OF_RANGE),
        (bar(1, "AAA", 0, ts=2**63), RejectReason.TS_OUT_OF_RANGE),
        (bar(1, "AAA", 0, ts=-(2**63) - 1), RejectReason.TS_OUT_OF_RANGE),
        (bar(2**64, "AAA", 0), RejectReason.BAD_TYPE),
        (bar(1, "AAA", 0, volume=10**400), RejectReason.NON_FINITE),
        ({"type": "minute_end", "seq": 1, "ts": 2**64 - 1, "count": 3}, RejectReason.TS_OUT_OF_RANGE),
        ({"type": "minute_end", "seq": 1, "ts": 0, "count": -1}, RejectReason.BAD_TYPE),
        ({"type": "minute_end", "seq": -1, "ts": 0, "count": 1}, RejectReason.BAD_TYPE),
        ({"type": "heartbeat", "seq": 1, "ts": 2**64 - 1}, RejectReason.TS_OUT_OF_RANGE),
    ],
)
def test_decode_when_integer_is_outside_its_wire_type_rejects_with_reason(
    message: dict[str, object], reason: RejectReason
) -> None:
    """seq is a u64 and ts an i64: anything else would overflow the int64 arrays downstream."""
    decoded = decode(message)
    assert isinstance(decoded, Rejected)
    assert decoded.reason is reason


def test_decode_when_integers_are_at_their_wire_limits_accepts() -> None:
    message = decode(bar(2**64 - 1, "AAA", 0, ts=2**63 - 1))
    assert isinstance(message, Bar) and (message.seq, message.ts) == (2**64 - 1, 2**63 - 1)


WALL = T0 + 3600 * NS_PER_S
BOUNDS = FeedBounds(
    min_price=1e-6, max_price=1e9, max_volume=1e15, max_future_ns=120 * NS_PER_S, max_ahead_ns=3600 * NS_PER_S
)


@pytest.mark.parametrize(
    ("override", "feed", "reason"),
    [
        ({"open": 1e-300, "high": 1e-300, "low": 1e-300, "close": 1e-300}, None, RejectReason.PRICE_OUT_OF_RANGE),
        ({"low": 5e-324, "close": 5e-324}, None, RejectReason.PRICE_OUT_OF_RANGE),
        ({"high": 2e9}, None, RejectReason.PRICE_OUT_OF_RANGE),
        ({"prev_close": 1e-9}, None, RejectReason.PRICE_OUT_OF_RANGE),
        ({"prev_close": 1e10}, None, RejectReason.PRICE_OUT_OF_RANGE),
        ({"volume": 1e16}, None, RejectReason.VOLUME_OUT_OF_RANGE),
        ({"ts": WALL + 121 * NS_PER_S}, None, RejectReason.FUTURE_TS),
        ({"ts": 2**63 - 1}, None, RejectReason.FUTURE_TS),
        ({"ts": T0 + 3601 * NS_PER_S}, T0, RejectReason.AHEAD_OF_FEED),
    ],
)
def test_check_bar_when_outside_the_configured_bounds_rejects_with_reason(
    override: dict[str, object], feed: int | None, reason: RejectReason
) -> None:
    decoded = decode(bar(9, "AAA", 0, **override))
    assert isinstance(decoded, Bar)
    rejected = check_bar(decoded, BOUNDS, WALL, feed)
    assert rejected is not None
    assert (rejected.reason, rejected.seq, rejected.symbol) == (reason, 9, "AAA")
    assert rejected.detail


@pytest.mark.parametrize(
    ("override", "feed"),
    [
        ({}, None),
        ({"open": 1e-6, "high": 1e9, "low": 1e-6, "close": 1e9, "prev_close": 1e-6, "volume": 1e15}, None),
        ({"ts": WALL + 120 * NS_PER_S}, None),
        ({"ts": T0 + 3600 * NS_PER_S}, T0),
        ({"ts": T0 - 365 * 86_400 * NS_PER_S}, T0),  # history, far behind the feed: its symbol's order decides
    ],
)
def test_check_bar_when_within_the_bounds_accepts(override: dict[str, object], feed: int | None) -> None:
    decoded = decode(bar(9, "AAA", 0, **override))
    assert isinstance(decoded, Bar)
    assert check_bar(decoded, BOUNDS, WALL, feed) is None
