"""Feed protocol v1 decoding: every rejection reason, and properties over arbitrary input."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.feed.protocol import (
    Bar,
    Heartbeat,
    MinuteEnd,
    Rejected,
    RejectReason,
    UnknownType,
    bar_map,
    decode,
)
from tests.helpers import bar


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
