"""The native order-gateway protocol: msgpack maps over TCP, typed and validated here.

Daemon -> broker: ``new_order``, ``cancel``, ``status_request``, ``heartbeat``.
Broker -> daemon: ``exec_report``, ``status``, ``heartbeat``.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, cast

import msgspec


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"


class ExecStatus(StrEnum):
    NEW = "new"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    REJECTED = "rejected"
    CANCELED = "canceled"


class NewOrder(msgspec.Struct, frozen=True):
    cl_ord_id: str
    symbol: str
    side: Side
    qty: int
    price: float
    ts: int  # wall-clock ns at send
    tif: str = "day"


class Cancel(msgspec.Struct, frozen=True):
    cl_ord_id: str
    orig_cl_ord_id: str
    symbol: str
    ts: int


class ExecReport(msgspec.Struct, frozen=True):
    cl_ord_id: str
    exec_id: str
    status: ExecStatus
    symbol: str
    side: Side
    last_qty: int
    last_px: float
    cum_qty: int
    leaves_qty: int
    ts: int
    text: str = ""


class Heartbeat(msgspec.Struct, frozen=True):
    ts: int


class StatusRequest(msgspec.Struct, frozen=True):
    """Ask the broker where these orders stand, and for the account's positions."""

    cl_ord_ids: list[str]
    ts: int


class OrderStatus(msgspec.Struct, frozen=True):
    cl_ord_id: str
    symbol: str
    side: Side
    qty: int
    price: float
    status: ExecStatus
    cum_qty: int
    avg_px: float


class Status(msgspec.Struct, frozen=True):
    """The broker's answer: the orders it knows of those asked about, and every position
    (``None`` where the gateway has no position report, as over FIX: the journal's stand)."""

    orders: list[OrderStatus]
    unknown: list[str]
    positions: dict[str, int] | None
    ts: int


class Malformed(msgspec.Struct, frozen=True):
    detail: str


GatewayMessage = NewOrder | Cancel | ExecReport | Heartbeat | StatusRequest | Status | Malformed

_TYPES: dict[str, type[msgspec.Struct]] = {
    "new_order": NewOrder,
    "cancel": Cancel,
    "exec_report": ExecReport,
    "heartbeat": Heartbeat,
    "status_request": StatusRequest,
    "status": Status,
}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def encode(message: NewOrder | Cancel | ExecReport | Heartbeat | StatusRequest | Status) -> dict[str, Any]:
    """The wire map of a message (the caller packs it)."""
    out: dict[str, Any] = msgspec.to_builtins(message)
    out["type"] = _NAMES[type(message)]
    return out


def decode(obj: object) -> GatewayMessage:
    """A wire map -> a typed message, or ``Malformed`` naming what is wrong."""
    if type(obj) is not dict:
        return Malformed(f"expected a map, got {type(obj).__name__}")
    fields = dict(obj)
    kind = fields.pop("type", None)
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return Malformed(f"unknown message type {kind!r}")
    try:
        message = msgspec.convert(fields, cls)
    except msgspec.ValidationError as exc:
        return Malformed(f"{kind}: {exc}")
    if isinstance(message, NewOrder) and (message.qty <= 0 or not math.isfinite(message.price) or message.price <= 0.0):
        return Malformed(f"new_order {message.cl_ord_id}: qty and price must be positive")
    return cast(GatewayMessage, message)
