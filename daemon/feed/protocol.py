"""Feed protocol v1: a TCP stream of msgpack maps, typed here, decoded and validated in one place.

``decode`` turns one unpacked object into a frozen message or a ``Rejected`` value with a reason
code. It checks everything a single message can show on its own: types, integer ranges (``seq``
a u64, ``ts`` an i64), finite positive prices, consistent OHLC. ``check_bar`` then applies the
configured bounds (``FeedBounds``: price and volume ranges, how far ahead of the wall clock and
of the feed's current minute a bar may be), given the time; it is pure too, and the runtime
calls it once per bar. What needs more state (unknown symbol, a timestamp not after the
symbol's last bar) is checked where that state lives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any

import msgspec
import numpy as np
import numpy.typing as npt


class RejectReason(StrEnum):
    NOT_A_MAP = "not_a_map"
    MISSING_FIELD = "missing_field"
    BAD_TYPE = "bad_type"
    NON_FINITE = "non_finite"
    NON_POSITIVE_PRICE = "non_positive_price"
    INCONSISTENT_OHLC = "inconsistent_ohlc"
    NEGATIVE_VOLUME = "negative_volume"
    UNKNOWN_SYMBOL = "unknown_symbol"
    OUT_OF_ORDER = "out_of_order"
    PRICE_OUT_OF_RANGE = "price_out_of_range"  # outside [feed.min_price, feed.max_price]
    VOLUME_OUT_OF_RANGE = "volume_out_of_range"  # over feed.max_volume
    TS_OUT_OF_RANGE = "ts_out_of_range"  # not an i64
    FUTURE_TS = "future_ts"  # more than feed.max_future_s ahead of the wall clock
    AHEAD_OF_FEED = "ahead_of_feed"  # more than feed.max_ahead_s ahead of the feed's latest bar
    NON_FINITE_FEATURE = "non_finite_feature"  # a feature of the bar would not be finite
    INTERNAL_ERROR = "internal_error"  # the daemon failed on the bar (a bug; escalated, not silent)


_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_U64_MAX = (1 << 64) - 1
_Seq = Annotated[int, msgspec.Meta(ge=0)]  # a msgpack integer is at most a u64
_Ts = Annotated[int, msgspec.Meta(ge=_I64_MIN, le=_I64_MAX)]
_FLOAT_MAX = 1.7976931348623157e308  # a finite float: NaN and inf fail these bounds
_Price = Annotated[float, msgspec.Meta(gt=0.0, le=_FLOAT_MAX)]
_Volume = Annotated[float, msgspec.Meta(ge=0.0, le=_FLOAT_MAX)]

# The tags, constraints and refusal of unknown fields matter only when frames are decoded in
# bulk (``decode_frames``): msgspec refuses what ``decode`` would reject field by field (its
# type, a price that is not positive and finite, a negative or non-finite volume), and a frame
# with a field it does not know (whose value it would not even look at) goes one by one.


class Bar(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="bar", forbid_unknown_fields=True):
    """One closed 1-minute bar. ``ts`` is the bar's close in integer ns since the epoch."""

    seq: _Seq
    symbol: Annotated[str, msgspec.Meta(min_length=1)]
    ts: _Ts
    open: _Price
    high: _Price
    low: _Price
    close: _Price
    volume: _Volume
    prev_close: _Price | None = None


class MinuteEnd(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="minute_end", forbid_unknown_fields=True):
    """Every bar of minute ``ts`` has been sent (``count`` of them)."""

    seq: _Seq
    ts: _Ts
    count: Annotated[int, msgspec.Meta(ge=0, le=_I64_MAX)]


class Heartbeat(msgspec.Struct, frozen=True, gc=False, tag_field="type", tag="heartbeat", forbid_unknown_fields=True):
    seq: _Seq
    ts: _Ts


class UnknownType(msgspec.Struct, frozen=True, gc=False):
    """A well-formed map with a ``type`` this version does not know: counted and ignored."""

    type: str


class Rejected(msgspec.Struct, frozen=True, gc=False):
    reason: RejectReason
    detail: str
    seq: int | None = None
    symbol: str | None = None


Message = Bar | MinuteEnd | Heartbeat | UnknownType | Rejected

_PRICES = ("open", "high", "low", "close")
NS_PER_S = 1_000_000_000


class FeedBounds(msgspec.Struct, frozen=True, gc=False):
    """The configured limits a decoded bar must also meet (``[feed]`` in the configuration).

    With prices in ``[min_price, max_price]`` every feature ratio and every order size computed
    from a bar is finite; with ``ts`` at most ``max_future_ns`` past the wall clock one bar
    cannot lock its symbol out (as out of order) or move the feed clock for long; with ``ts`` at
    most ``max_ahead_ns`` past the feed's latest accepted bar, a replay of history cannot either.
    """

    min_price: float = 1e-6
    max_price: float = 1e9
    max_volume: float = 1e15
    max_future_ns: int = 120 * NS_PER_S
    max_ahead_ns: int = 10 * 86_400 * NS_PER_S


class _InvalidError(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail


def _int(obj: dict[Any, Any], key: str) -> int:
    value = obj.get(key)
    if value is None:
        raise _InvalidError(RejectReason.MISSING_FIELD, key)
    if type(value) is not int:
        raise _InvalidError(RejectReason.BAD_TYPE, f"{key} must be an integer, got {type(value).__name__}")
    return value


def _seq(obj: dict[Any, Any]) -> int:
    seq = _int(obj, "seq")
    if not 0 <= seq <= _U64_MAX:
        raise _InvalidError(RejectReason.BAD_TYPE, f"seq must be a u64, got {seq}")
    return seq


def _ts(obj: dict[Any, Any]) -> int:
    ts = _int(obj, "ts")
    if not _I64_MIN <= ts <= _I64_MAX:
        raise _InvalidError(RejectReason.TS_OUT_OF_RANGE, f"ts must be an i64, got {ts}")
    return ts


def _count(obj: dict[Any, Any]) -> int:
    count = _int(obj, "count")
    if not 0 <= count <= _I64_MAX:
        raise _InvalidError(RejectReason.BAD_TYPE, f"count must be a non-negative i64, got {count}")
    return count


def _num(obj: dict[Any, Any], key: str) -> float:
    value = obj.get(key)
    if value is None:
        raise _InvalidError(RejectReason.MISSING_FIELD, key)
    kind = type(value)
    if kind is not float and kind is not int:
        raise _InvalidError(RejectReason.BAD_TYPE, f"{key} must be a number, got {kind.__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int past the float range (never off the wire: msgpack ints are 64-bit)
        number = math.inf
    if not math.isfinite(number):
        raise _InvalidError(RejectReason.NON_FINITE, f"{key}={value}")
    return number


def _decode_bar(obj: dict[Any, Any]) -> Bar:
    seq = _seq(obj)
    symbol = obj.get("symbol")
    if symbol is None:
        raise _InvalidError(RejectReason.MISSING_FIELD, "symbol")
    if type(symbol) is not str or not symbol:
        raise _InvalidError(RejectReason.BAD_TYPE, f"symbol must be a non-empty string, got {symbol!r}")
    ts = _ts(obj)
    o, h, lo, c = (_num(obj, k) for k in _PRICES)
    v = _num(obj, "volume")
    prev = obj.get("prev_close")
    if prev is not None:
        prev = _num(obj, "prev_close")
        if prev <= 0.0:
            raise _InvalidError(RejectReason.NON_POSITIVE_PRICE, f"prev_close={prev}")
    if o <= 0.0 or h <= 0.0 or lo <= 0.0 or c <= 0.0:
        raise _InvalidError(RejectReason.NON_POSITIVE_PRICE, f"open={o} high={h} low={lo} close={c}")
    if lo > min(o, c) or h < max(o, c):
        raise _InvalidError(RejectReason.INCONSISTENT_OHLC, f"open={o} high={h} low={lo} close={c}")
    if v < 0.0:
        raise _InvalidError(RejectReason.NEGATIVE_VOLUME, f"volume={v}")
    return Bar(seq, symbol, ts, o, h, lo, c, v, prev)


def decode(obj: object) -> Message:
    """Turn one unpacked msgpack object into a message, or a ``Rejected`` saying why not."""
    if type(obj) is not dict:
        return Rejected(RejectReason.NOT_A_MAP, f"expected a map, got {type(obj).__name__}")
    try:
        match obj.get("type"):
            case "bar":
                return _decode_bar(obj)
            case "minute_end":
                return MinuteEnd(_seq(obj), _ts(obj), _count(obj))
            case "heartbeat":
                return Heartbeat(_seq(obj), _ts(obj))
            case None:
                return Rejected(RejectReason.MISSING_FIELD, "type")
            case str() as other:
                return UnknownType(other)
            case other:
                return Rejected(RejectReason.BAD_TYPE, f"type must be a string, got {type(other).__name__}")
    except _InvalidError as exc:
        seq, symbol = obj.get("seq"), obj.get("symbol")
        return Rejected(
            exc.reason,
            exc.detail,
            seq if type(seq) is int else None,
            symbol if type(symbol) is str else None,
        )


_FRAMES = msgspec.msgpack.Decoder(list[Bar | MinuteEnd | Heartbeat])


def bar_values(bars: Sequence[Bar]) -> npt.NDArray[np.float64]:
    """The bars' open, high, low, close, volume and previous close (NaN: none) as six
    contiguous rows, [6, n]."""
    nan = math.nan
    values = np.array(
        [(b.open, b.high, b.low, b.close, b.volume, nan if b.prev_close is None else b.prev_close) for b in bars],
        dtype=np.float64,
    )
    return np.ascontiguousarray(values.reshape(len(bars), 6).T)


def decode_frames(
    frames: bytes, count: int
) -> tuple[list[Bar | MinuteEnd | Heartbeat], npt.NDArray[np.float64]] | None:
    """``decode`` for ``count`` complete frames back to back, all at once (msgspec, as one array):
    the messages and the bars' ``bar_values``, in order, or None when any frame is not a bar,
    minute end or heartbeat that ``decode`` would return as such (the caller then decodes them
    one by one, for their reasons)."""
    header = (
        bytes([0x90 | count])
        if count < 16
        else b"\xdc" + count.to_bytes(2, "big")
        if count < 1 << 16
        else b"\xdd" + count.to_bytes(4, "big")
    )
    try:
        messages = _FRAMES.decode(header + frames)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    values = bar_values([m for m in messages if type(m) is Bar])
    # The one rule of ``_decode_bar`` across fields, which msgspec's constraints cannot say.
    o, h, lo, c = values[:4]
    if (lo > np.minimum(o, c)).any() or (h < np.maximum(o, c)).any():
        return None
    return messages, values


def check_bar(bar: Bar, bounds: FeedBounds, wall_ns: int, feed_ns: int | None) -> Rejected | None:
    """The configured bounds on a decoded bar: None when it meets them, else why not.

    ``wall_ns`` is the wall clock now; ``feed_ns`` the feed's current minute (the latest bar
    close accepted so far, None before the first). A replay of history is in the past of the
    wall clock, so only a bar ahead of it is refused; against the feed's minute the bound is
    loose enough for a weekend or a market closure between two bars.
    """
    lo, hi = bounds.min_price, bounds.max_price
    # decode made low the smallest price and high the largest.
    if bar.low < lo or bar.high > hi:
        detail = f"open={bar.open} high={bar.high} low={bar.low} close={bar.close} outside [{lo}, {hi}]"
        return Rejected(RejectReason.PRICE_OUT_OF_RANGE, detail, bar.seq, bar.symbol)
    prev = bar.prev_close
    if prev is not None and not lo <= prev <= hi:
        return Rejected(RejectReason.PRICE_OUT_OF_RANGE, f"prev_close={prev} outside [{lo}, {hi}]", bar.seq, bar.symbol)
    if bar.volume > bounds.max_volume:
        detail = f"volume={bar.volume} over {bounds.max_volume}"
        return Rejected(RejectReason.VOLUME_OUT_OF_RANGE, detail, bar.seq, bar.symbol)
    if bar.ts > wall_ns + bounds.max_future_ns:
        detail = f"ts {bar.ts} is {(bar.ts - wall_ns) / NS_PER_S:.0f} s ahead of the wall clock {wall_ns}"
        return Rejected(RejectReason.FUTURE_TS, detail, bar.seq, bar.symbol)
    if feed_ns is not None and bar.ts > feed_ns + bounds.max_ahead_ns:
        detail = f"ts {bar.ts} is {(bar.ts - feed_ns) / NS_PER_S:.0f} s ahead of the feed's minute {feed_ns}"
        return Rejected(RejectReason.AHEAD_OF_FEED, detail, bar.seq, bar.symbol)
    return None


def bar_map(bar: Bar) -> dict[str, object]:
    """The wire form of a bar (``prev_close`` only when known)."""
    out: dict[str, object] = {
        "type": "bar",
        "seq": bar.seq,
        "symbol": bar.symbol,
        "ts": bar.ts,
        "open": bar.open,
        "high": bar.high,
        "low": bar.low,
        "close": bar.close,
        "volume": bar.volume,
    }
    if bar.prev_close is not None:
        out["prev_close"] = bar.prev_close
    return out


def minute_end_map(seq: int, ts: int, count: int) -> dict[str, object]:
    return {"type": "minute_end", "seq": seq, "ts": ts, "count": count}


def heartbeat_map(seq: int, ts: int) -> dict[str, object]:
    return {"type": "heartbeat", "seq": seq, "ts": ts}
