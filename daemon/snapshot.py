"""What a journal snapshot holds: everything restore needs, as one typed value.

Positions, the orders not yet final (with their ExecIDs and cancel counts), parked orders, halts
and trading states, the kill switch, the engine in use, the session and order counters, the order
rate memory, the risk clock and the feature windows. ``broker.journal`` writes it atomically with
a checksum; the desk builds it (``OrderDesk.snapshot``) and takes it back (``OrderDesk.load``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from daemon.windows import WindowsState

FORMAT = 1


class OrderState(msgspec.Struct, frozen=True, array_like=True):
    id: str
    symbol: str
    side: str
    qty: int
    price: float
    ts_event: int
    state: str
    filled_qty: int
    notional_filled: float
    exec_ids: list[str]
    cancels: int


class ParkedState(msgspec.Struct, frozen=True, array_like=True):
    id: str
    parked_at: int
    expires_at: int


class State(msgspec.Struct, frozen=True):
    format: int
    session: int
    order_seq: int
    positions: dict[str, int]
    last_fill_px: dict[str, float]
    orders: list[OrderState]
    parked: list[ParkedState]
    halts: dict[str, Any]
    kill: bool
    engine_active: str | None
    feed_now: int
    recent_sends: list[int]
    windows: WindowsState
    # Sends inside the duplicate window: (symbol, side, qty, price, wall ns).
    last_same: list[tuple[str, str, int, float, int]] = []


def encode(state: State) -> bytes:
    return msgspec.msgpack.encode(state)


def decode(body: bytes) -> State:
    state = msgspec.msgpack.decode(body, type=State)
    if state.format != FORMAT:
        raise ValueError(f"snapshot state format {state.format}; this build reads {FORMAT}")
    return state
