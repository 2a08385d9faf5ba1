"""An order's life from intent to a final state, and the positions its fills make.

States are an enum with a transition table; an illegal move raises ``IllegalTransitionError`` naming
both states. An execution report that makes no sense for the order's state is not applied: the
book returns the reason and the caller counts and logs it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from broker.errors import IllegalTransitionError
from broker.protocol import ExecReport, ExecStatus, Side


class OrderState(StrEnum):
    INTENT = "intent"
    PARKED = "parked"  # waiting for an operator's review
    DENIED = "denied"
    SENT = "sent"
    ACKED = "acked"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELED = "canceled"
    REJECTED = "rejected"


FINAL = frozenset({OrderState.DENIED, OrderState.FILLED, OrderState.CANCELED, OrderState.REJECTED})
_LIVE_AFTER_SEND = frozenset({OrderState.PARTIALLY_FILLED, OrderState.FILLED, OrderState.CANCELED, OrderState.REJECTED})

TRANSITIONS: dict[OrderState, frozenset[OrderState]] = {
    OrderState.INTENT: frozenset({OrderState.DENIED, OrderState.SENT, OrderState.PARKED}),
    OrderState.PARKED: frozenset({OrderState.DENIED, OrderState.SENT}),
    OrderState.SENT: _LIVE_AFTER_SEND | {OrderState.ACKED},
    OrderState.ACKED: _LIVE_AFTER_SEND,
    OrderState.PARTIALLY_FILLED: frozenset({OrderState.PARTIALLY_FILLED, OrderState.FILLED, OrderState.CANCELED}),
    OrderState.DENIED: frozenset(),
    OrderState.FILLED: frozenset(),
    OrderState.CANCELED: frozenset(),
    OrderState.REJECTED: frozenset(),
}

_REPORT_STATE = {
    ExecStatus.NEW: OrderState.ACKED,
    ExecStatus.PARTIALLY_FILLED: OrderState.PARTIALLY_FILLED,
    ExecStatus.FILLED: OrderState.FILLED,
    ExecStatus.CANCELED: OrderState.CANCELED,
    ExecStatus.REJECTED: OrderState.REJECTED,
}


@dataclass(slots=True)
class Order:
    cl_ord_id: str
    symbol: str
    side: Side
    qty: int
    price: float
    ts_event: int
    ts_recv: int
    state: OrderState = OrderState.INTENT
    filled_qty: int = 0
    notional_filled: float = 0.0
    ts_send: int = 0
    reject_text: str = ""

    @property
    def signed_open_qty(self) -> int:
        if self.state in FINAL or self.state in (OrderState.INTENT, OrderState.PARKED):
            return 0
        left = self.qty - self.filled_qty
        return left if self.side is Side.BUY else -left

    def move(self, target: OrderState) -> None:
        if target not in TRANSITIONS[self.state]:
            raise IllegalTransitionError(self.cl_ord_id, self.state, target)
        self.state = target


@dataclass(slots=True)
class OrderBook:
    """Orders by client id, with the positions their fills have made."""

    orders: dict[str, Order] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    open_qty: dict[str, int] = field(default_factory=dict)
    working: dict[str, Order] = field(default_factory=dict)  # sent and not yet final
    # Final orders are kept for late reports and operators, the most recent ``retain_final`` of
    # them: a daemon that runs for months must not grow with every order it ever sent.
    retain_final: int = 10_000
    _final: deque[str] = field(default_factory=deque)

    def add(self, order: Order) -> None:
        self.orders[order.cl_ord_id] = order

    def exposure(self, symbol: str) -> int:
        """Position plus the signed quantity still working at the broker."""
        return self.positions.get(symbol, 0) + self.open_qty.get(symbol, 0)

    def mark_sent(self, order: Order, ts_send: int) -> None:
        order.move(OrderState.SENT)
        order.ts_send = ts_send
        self.open_qty[order.symbol] = self.open_qty.get(order.symbol, 0) + order.signed_open_qty
        self.working[order.cl_ord_id] = order

    def apply(self, report: ExecReport) -> str | None:
        """Apply a report; returns None, or the reason it was not applied."""
        order = self.orders.get(report.cl_ord_id)
        if order is None:
            return "unknown_order"
        target = _REPORT_STATE[report.status]
        if target not in TRANSITIONS[order.state]:
            return f"{order.state}->{target}"
        if report.last_qty < 0 or order.filled_qty + report.last_qty > order.qty:
            return "overfill"
        before = order.signed_open_qty
        if report.last_qty:
            signed = report.last_qty if order.side is Side.BUY else -report.last_qty
            self.positions[order.symbol] = self.positions.get(order.symbol, 0) + signed
            order.filled_qty += report.last_qty
            order.notional_filled += report.last_qty * report.last_px
        order.move(target)
        if target is OrderState.REJECTED:
            order.reject_text = report.text
        self.open_qty[order.symbol] = self.open_qty.get(order.symbol, 0) - before + order.signed_open_qty
        if target in FINAL:
            self._retire(order)
        return None

    def deny(self, order: Order) -> None:
        """An intent or parked order that will never be sent."""
        order.move(OrderState.DENIED)
        self._retire(order)

    def _retire(self, order: Order) -> None:
        self.working.pop(order.cl_ord_id, None)
        self._final.append(order.cl_ord_id)
        while len(self._final) > self.retain_final:
            self.orders.pop(self._final.popleft(), None)
