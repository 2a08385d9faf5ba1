"""An order's life from intent to a final state, and the positions its fills make.

States are an enum with a transition table; an illegal move raises ``IllegalTransitionError`` naming
both states. An execution report that makes no sense for the order's state is not applied: the
book returns the reason and the caller counts and logs it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from broker.errors import IllegalTransitionError
from broker.ledger import Ledger
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
    # A partly filled order can still be refused in the end (the broker's, or ours: never reached).
    OrderState.PARTIALLY_FILLED: frozenset(
        {OrderState.PARTIALLY_FILLED, OrderState.FILLED, OrderState.CANCELED, OrderState.REJECTED}
    ),
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


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a report was not applied. ``inconsistent`` means it contradicts what is known (the
    position is no longer certain), as opposed to a harmless repeat or a late word."""

    code: str
    detail: str
    inconsistent: bool = False


DUPLICATE = "duplicate_exec_id"
STALE = "stale"
UNKNOWN = "unknown_order"


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
    exec_ids: set[str] = field(default_factory=set)
    cancels: int = 0  # cancel ids issued for this order (each cancel request has its own)
    cancel_pending: bool = False  # a cancel is in flight: another is not sent
    ts_ready: int = 0  # mono ns its bar was in the feature window (0: not from a live batch)

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


def check_report(order: Order, report: ExecReport) -> Refusal | None:
    """Whether ``report`` can be applied to ``order``: fills are taken from ``cum_qty`` (the
    broker's running total), so a repeated or reordered report can never move a position twice."""
    oid = order.cl_ord_id
    if report.exec_id and report.exec_id in order.exec_ids:
        return Refusal(DUPLICATE, f"{oid}: ExecID {report.exec_id} already applied")
    if report.symbol != order.symbol or report.side is not order.side:
        return Refusal(
            "mismatch", f"{oid}: report for {report.side} {report.symbol}, order is {order.side} {order.symbol}", True
        )
    if report.cum_qty > order.qty:
        return Refusal("overfill", f"{oid}: cum_qty {report.cum_qty} over order qty {order.qty}", True)
    if report.last_qty < 0 or report.cum_qty < 0 or report.leaves_qty < 0:
        return Refusal("negative_qty", f"{oid}: last {report.last_qty} cum {report.cum_qty}", True)
    fill = report.cum_qty - order.filled_qty
    target = _REPORT_STATE[report.status]
    if fill < 0:
        if order.state in FINAL or target in (OrderState.ACKED, OrderState.PARTIALLY_FILLED):
            # An older word arriving late (a reordered ack or partial, a status answer gathered
            # before a live report): a lower running total moves nothing.
            return Refusal(STALE, f"{oid}: {report.status} with cum_qty {report.cum_qty} after {order.filled_qty}")
        # The broker's final word says less was filled than it already told us.
        return Refusal("cum_qty_backwards", f"{oid}: cum_qty {report.cum_qty} after {order.filled_qty} filled", True)
    if report.last_qty > fill:
        return Refusal("last_qty_over_cum", f"{oid}: last_qty {report.last_qty}, cum_qty moved by {fill}", True)
    if fill and not (math.isfinite(report.last_px) and report.last_px > 0.0):
        return Refusal("bad_price", f"{oid}: fill of {fill} at {report.last_px}", True)
    if order.state in FINAL:
        if fill:
            return Refusal("fill_after_final", f"{oid}: {fill} more filled after {order.state}", True)
        return Refusal(STALE, f"{oid}: {report.status} after {order.state}")
    if target is OrderState.FILLED and report.cum_qty != order.qty:
        return Refusal("filled_short", f"{oid}: filled with cum_qty {report.cum_qty} of {order.qty}", True)
    if target is OrderState.PARTIALLY_FILLED and report.cum_qty in (0, order.qty):
        return Refusal("partial_not_partial", f"{oid}: partially filled with cum_qty {report.cum_qty}", True)
    if fill and target in (OrderState.ACKED, OrderState.REJECTED):
        return Refusal("fill_without_fill_status", f"{oid}: {fill} filled in a {report.status} report", True)
    if target not in TRANSITIONS[order.state]:
        if order.state in (OrderState.INTENT, OrderState.PARKED):
            return Refusal("not_sent", f"{oid}: {report.status} for an order never sent ({order.state})", True)
        return Refusal(STALE, f"{oid}: {order.state}->{target}")
    if not fill and target is order.state:
        # Nothing new (a repeat under a fresh ExecID): not applied, so not journaled either.
        return Refusal(STALE, f"{oid}: {report.status} again with cum_qty {report.cum_qty}")
    return None


@dataclass(frozen=True, slots=True)
class SentColumns:
    """Orders written to the broker together, as columns: order k's id is
    ``f"{prefix}-{first + k}"``; sides are +1 buy / -1 sell."""

    prefix: str
    first: int
    symbols: list[str]
    idx: npt.NDArray[np.int64]  # universe index of each symbol
    side: npt.NDArray[np.int8]
    qty: npt.NDArray[np.int64]
    price: npt.NDArray[np.float64]
    ts_event: npt.NDArray[np.int64]
    ts_recv: npt.NDArray[np.int64]
    ts_ready: npt.NDArray[np.int64]
    ts_send: int

    def orders(self) -> list[Order]:
        """One ``Order`` each, in state SENT."""
        prefix, first, ts_send, sent = self.prefix, self.first, self.ts_send, OrderState.SENT
        buy, sell = Side.BUY, Side.SELL
        return [
            Order(
                f"{prefix}-{first + k}",
                symbol,
                buy if side > 0 else sell,
                qty,
                price,
                ts_event,
                ts_recv,
                sent,
                ts_send=ts_send,
                ts_ready=ts_ready,
            )
            for k, (symbol, side, qty, price, ts_event, ts_recv, ts_ready) in enumerate(
                zip(
                    self.symbols,
                    self.side.tolist(),
                    self.qty.tolist(),
                    self.price.tolist(),
                    self.ts_event.tolist(),
                    self.ts_recv.tolist(),
                    self.ts_ready.tolist(),
                    strict=True,
                )
            )
        ]


class OrderBook:
    """Orders by client id, with the positions their fills have made.

    ``positions`` and ``open_qty`` are ``Ledger``s: once ``index`` (the universe) is given, their
    sum per symbol (the exposure) is also kept as an array by universe index, for the batch
    gates. Assigning a whole new mapping to either keeps that array right.

    A batch's orders written together (``add_sent_columns``) count in that array at once, and
    become ``Order``s in the dicts when anything next reads them (``orders``, ``working``,
    ``positions``, ``open_qty``, a report): the work of booking them is done after the minute's
    orders are out, not between two batches of it."""

    __slots__ = (
        "_final",
        "_index",
        "_open_qty",
        "_orders",
        "_positions",
        "_unbooked",
        "_working",
        "exposure_totals",
        "last_fill_px",
        "retain_final",
    )

    def __init__(self, retain_final: int = 10_000) -> None:
        self._orders: dict[str, Order] = {}
        self._working: dict[str, Order] = {}  # sent and not yet final
        self.last_fill_px: dict[str, float] = {}
        # Final orders are kept for late reports and operators, the most recent ``retain_final``
        # of them: a daemon that runs for months must not grow with every order it ever sent.
        self.retain_final = retain_final
        self._final: deque[str] = deque()
        self._positions = Ledger()
        self._open_qty = Ledger()
        self.exposure_totals: npt.NDArray[np.int64] | None = None
        self._index: Mapping[str, int] | None = None
        self._unbooked: list[SentColumns] = []

    @property
    def orders(self) -> dict[str, Order]:
        if self._unbooked:
            self.book_sent()
        return self._orders

    @property
    def working(self) -> dict[str, Order]:
        if self._unbooked:
            self.book_sent()
        return self._working

    @property
    def positions(self) -> Ledger:
        if self._unbooked:
            self.book_sent()
        return self._positions

    @positions.setter
    def positions(self, value: Mapping[str, int]) -> None:
        self.book_sent()
        self._positions = Ledger(value)
        self._relink()

    @property
    def open_qty(self) -> Ledger:
        if self._unbooked:
            self.book_sent()
        return self._open_qty

    @open_qty.setter
    def open_qty(self, value: Mapping[str, int]) -> None:
        self.book_sent()
        self._open_qty = Ledger(value)
        self._relink()

    def outside_symbols(self) -> set[str]:
        """Symbols held or working outside the index (orders written together never are)."""
        return self._positions.outside | self._open_qty.outside

    def index_by(self, index: Mapping[str, int]) -> None:
        """Keep the exposure of the symbols of ``index`` as an array (``exposure_totals``)."""
        self.book_sent()
        self._index = index
        self._relink()

    def _relink(self) -> None:
        if self._index is not None:
            totals = np.zeros(max(self._index.values(), default=-1) + 1, dtype=np.int64)
            self._positions.attach(self._index, totals)
            self._open_qty.attach(self._index, totals)
            self.exposure_totals = totals

    def add(self, order: Order) -> None:
        self._orders[order.cl_ord_id] = order

    def exposure(self, symbol: str) -> int:
        """Position plus the signed quantity still working at the broker. Read from
        ``exposure_totals`` where the symbol has a place in it, so orders written together need
        not be booked first (they only ever hold symbols of the index)."""
        totals, index = self.exposure_totals, self._index
        i = index.get(symbol) if index is not None else None
        if totals is not None and i is not None:
            return int(totals[i])
        # Not in the index, or no index (then orders written together are booked at once).
        return self._positions.get(symbol, 0) + self._open_qty.get(symbol, 0)

    def mark_sent(self, order: Order, ts_send: int) -> None:
        order.move(OrderState.SENT)
        order.ts_send = ts_send
        self._open_qty[order.symbol] = self._open_qty.get(order.symbol, 0) + order.signed_open_qty
        self._working[order.cl_ord_id] = order

    def add_sent_columns(self, sent: SentColumns) -> None:
        """New orders written to the broker together (``add`` then ``mark_sent`` for each, over
        arrays): their working quantity counts in ``exposure_totals`` now; they are booked as
        ``Order``s when next read."""
        if not len(sent.symbols):
            return
        totals = self.exposure_totals
        if totals is None:
            self._unbooked.append(sent)
            self.book_sent()
            return
        totals[sent.idx] += np.where(sent.side > 0, sent.qty, -sent.qty)  # distinct symbols
        self._unbooked.append(sent)

    def book_sent(self) -> None:
        """Book the orders written together since the last call as ``Order``s."""
        unbooked, self._unbooked = self._unbooked, []
        book, working, open_qty = self._orders, self._working, self._open_qty
        for sent in unbooked:
            for order in sent.orders():
                book[order.cl_ord_id] = order
                working[order.cl_ord_id] = order
                symbol = order.symbol
                # The plain dict's set: ``add_sent_columns`` counted them in the array already.
                dict.__setitem__(
                    open_qty, symbol, open_qty.get(symbol, 0) + (order.qty if order.side is Side.BUY else -order.qty)
                )

    def apply(self, report: ExecReport) -> Refusal | None:
        """Apply a report once; returns None, or why it was not applied (nothing changed then)."""
        if self._unbooked:
            self.book_sent()
        order = self._orders.get(report.cl_ord_id)
        if order is None:
            return Refusal(UNKNOWN, f"no order {report.cl_ord_id!r}")
        refusal = check_report(order, report)
        if refusal is not None:
            return refusal
        before = order.signed_open_qty
        fill = report.cum_qty - order.filled_qty
        if report.exec_id:
            order.exec_ids.add(report.exec_id)
        if fill:
            signed = fill if order.side is Side.BUY else -fill
            self._positions[order.symbol] = self._positions.get(order.symbol, 0) + signed
            order.filled_qty = report.cum_qty
            order.notional_filled += fill * report.last_px
            self.last_fill_px[order.symbol] = report.last_px
        target = _REPORT_STATE[report.status]
        order.move(target)
        if target is OrderState.REJECTED:
            order.reject_text = report.text
        self._open_qty[order.symbol] = self._open_qty.get(order.symbol, 0) - before + order.signed_open_qty
        if target in FINAL:
            self._retire(order)
        return None

    def deny(self, order: Order) -> None:
        """An intent or parked order that will never be sent."""
        order.move(OrderState.DENIED)
        self._retire(order)

    def _retire(self, order: Order) -> None:
        self._working.pop(order.cl_ord_id, None)
        self._final.append(order.cl_ord_id)
        while len(self._final) > self.retain_final:
            self._orders.pop(self._final.popleft(), None)
