"""Feed protocol v1: a TCP stream of msgpack maps, typed here, decoded and validated in one place.

``decode`` turns one unpacked object into a frozen message or a ``Rejected`` value with a reason
code. It checks everything a single message can show; what needs state (unknown symbol, a
timestamp not after the symbol's last bar) is checked where that state lives.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

import msgspec


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


class Bar(msgspec.Struct, frozen=True, gc=False):
    """One closed 1-minute bar. ``ts`` is the bar's close in integer ns since the epoch."""

    seq: int
    symbol: str
    ts: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    prev_close: float | None = None


class MinuteEnd(msgspec.Struct, frozen=True, gc=False):
    """Every bar of minute ``ts`` has been sent (``count`` of them)."""

    seq: int
    ts: int
    count: int


class Heartbeat(msgspec.Struct, frozen=True, gc=False):
    seq: int
    ts: int


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


def _num(obj: dict[Any, Any], key: str) -> float:
    value = obj.get(key)
    if value is None:
        raise _InvalidError(RejectReason.MISSING_FIELD, key)
    kind = type(value)
    if kind is not float and kind is not int:
        raise _InvalidError(RejectReason.BAD_TYPE, f"{key} must be a number, got {kind.__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise _InvalidError(RejectReason.NON_FINITE, f"{key}={value}")
    return number


def _decode_bar(obj: dict[Any, Any]) -> Bar:
    seq = _int(obj, "seq")
    if seq < 0:
        raise _InvalidError(RejectReason.BAD_TYPE, f"seq must be unsigned, got {seq}")
    symbol = obj.get("symbol")
    if symbol is None:
        raise _InvalidError(RejectReason.MISSING_FIELD, "symbol")
    if type(symbol) is not str or not symbol:
        raise _InvalidError(RejectReason.BAD_TYPE, f"symbol must be a non-empty string, got {symbol!r}")
    ts = _int(obj, "ts")
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
                return MinuteEnd(_int(obj, "seq"), _int(obj, "ts"), _int(obj, "count"))
            case "heartbeat":
                return Heartbeat(_int(obj, "seq"), _int(obj, "ts"))
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
