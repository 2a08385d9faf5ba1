"""A simulated venue for backtests: an in-process gateway that fills on the next bar.

The far side of the order boundary, as ``broker.sim`` is over TCP, but driven by the bars of a
replay so nothing fills on information the daemon did not have yet: an order sent after the bar
that closes at ``t`` fills at the open of the symbol's next bar, plus slippage, if its limit
allows; otherwise at its limit when that bar trades through it; otherwise it keeps working, and a
day order is cancelled when the trading day of the first bar it could trade on ends (with daily
bars: the next day's bar is its one chance). Costs are charged per fill in basis
points of the notional. Cancels and status requests are answered as a broker would.

Reports are queued and handed to the daemon by ``deliver``, which the backtest calls between
bars: the gateway never calls back into the desk from inside ``send``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from broker import protocol as wire

NS = 1_000_000_000


def _day(ts_ns: int) -> str:
    return datetime.fromtimestamp((ts_ns - 1) // NS, UTC).date().isoformat()  # a bar's ts is its close


@dataclass(frozen=True, slots=True)
class Fill:
    ts_ns: int  # the close of the bar it filled on
    order_id: str
    symbol: str
    side: str
    qty: int
    price: float
    cost: float


@dataclass(slots=True)
class _Working:
    order: wire.NewOrder
    placed_ts: int  # the venue's minute when it arrived: it fills on a later bar only
    day: str  # the trading day it works through (set by the first bar after it arrived)
    filled: int = 0
    status: wire.ExecStatus = wire.ExecStatus.NEW
    avg_px: float = 0.0


@dataclass(slots=True)
class _Account:
    cash: float
    positions: dict[str, int] = field(default_factory=dict)
    costs: float = 0.0
    traded_notional: float = 0.0


class SimVenue:
    """The ``Gateway`` of a backtest. ``slippage_bps`` moves every fill against the order;
    ``cost_bps`` of each fill's notional is paid in cash."""

    def __init__(
        self,
        capital: float,
        *,
        on_report: Callable[[wire.ExecReport], None],
        on_status: Callable[[wire.Status], None],
        on_event: Callable[[str, str], None],
        slippage_bps: float = 0.0,
        cost_bps: float = 0.0,
    ) -> None:
        self.on_report = on_report
        self.on_status = on_status
        self.on_event = on_event
        self.slippage = slippage_bps / 10_000.0
        self.cost = cost_bps / 10_000.0
        self.account = _Account(capital)
        self.fills: list[Fill] = []
        self.orders: dict[str, _Working] = {}
        self._working: dict[str, dict[str, _Working]] = {}  # symbol -> id -> order
        self._outbox: list[wire.ExecReport | wire.Status] = []
        self._exec_ids = itertools.count(1)
        self._now = 0  # the close of the latest bar the venue has seen
        self._stopped = asyncio.Event()

    # -- the Gateway protocol ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return True

    async def run(self) -> None:
        self.on_event("connected", "simulated venue")
        await self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()

    def cork(self) -> None:
        """Nothing to hold: each message is written as it is sent."""

    def uncork(self) -> None:
        pass

    def send(self, message: wire.NewOrder | wire.Cancel | wire.StatusRequest) -> bool:
        match message:
            case wire.NewOrder():
                self._new(message)
            case wire.Cancel():
                self._cancel(message.orig_cl_ord_id, "canceled on request")
            case wire.StatusRequest():
                self._outbox.append(self._status(message))
        return True

    # -- driven by the backtest -------------------------------------------------------------

    def deliver(self) -> int:
        """Hand every queued report to the daemon, in order; returns how many."""
        n = 0
        while self._outbox:
            out, self._outbox = self._outbox, []
            for message in out:
                if isinstance(message, wire.Status):
                    self.on_status(message)
                else:
                    self.on_report(message)
            n += len(out)
        return n

    def on_bar(self, symbol: str, ts: int, open_: float, high: float, low: float) -> None:
        """A new bar of ``symbol`` (closing at ``ts``): its open is the first price an order sent
        before it can get."""
        self._now = max(self._now, ts)
        working = self._working.get(symbol)
        if not working:
            return
        day = _day(ts)
        for order_id, w in list(working.items()):
            if w.placed_ts >= ts:
                continue
            if not w.day:
                w.day = day  # a day order works through the day of the first bar it can trade on
            elif w.day != day:
                self._cancel(order_id, "day order expired")
                continue
            o = w.order
            buy = o.side is wire.Side.BUY
            at_open = open_ * (1.0 + self.slippage) if buy else open_ * (1.0 - self.slippage)
            if (at_open <= o.price) if buy else (at_open >= o.price):
                self._fill(w, at_open, ts)
            elif (low <= o.price) if buy else (high >= o.price):
                self._fill(w, o.price, ts)

    def equity(self, marks: dict[str, float]) -> float:
        """Cash plus every position at ``marks`` (the latest closes)."""
        a = self.account
        return a.cash + sum(q * marks[s] for s, q in a.positions.items() if q)

    # -- internals --------------------------------------------------------------------------

    def _report(self, w: _Working, status: wire.ExecStatus, last_qty: int, last_px: float, text: str = "") -> None:
        o = w.order
        w.status = status
        self._outbox.append(
            wire.ExecReport(
                cl_ord_id=o.cl_ord_id,
                exec_id=f"V{next(self._exec_ids)}",
                status=status,
                symbol=o.symbol,
                side=o.side,
                last_qty=last_qty,
                last_px=last_px,
                cum_qty=w.filled,
                leaves_qty=0 if status in (wire.ExecStatus.FILLED, wire.ExecStatus.CANCELED) else o.qty - w.filled,
                ts=self._now,
                text=text,
            )
        )

    def _new(self, o: wire.NewOrder) -> None:
        if o.cl_ord_id in self.orders:
            return  # a resend of an order the venue has: a broker ignores it
        w = _Working(o, self._now, "")
        self.orders[o.cl_ord_id] = w
        self._working.setdefault(o.symbol, {})[o.cl_ord_id] = w
        self._report(w, wire.ExecStatus.NEW, 0, 0.0)

    def _fill(self, w: _Working, price: float, ts: int) -> None:
        o = w.order
        qty = o.qty - w.filled
        notional = qty * price
        cost = notional * self.cost
        a = self.account
        signed = qty if o.side is wire.Side.BUY else -qty
        a.positions[o.symbol] = a.positions.get(o.symbol, 0) + signed
        a.cash -= signed * price + cost
        a.costs += cost
        a.traded_notional += notional
        w.avg_px = price
        w.filled = o.qty
        del self._working[o.symbol][o.cl_ord_id]
        self.fills.append(Fill(ts, o.cl_ord_id, o.symbol, str(o.side), qty, price, cost))
        self._report(w, wire.ExecStatus.FILLED, qty, price)

    def _cancel(self, order_id: str, text: str) -> None:
        w = self.orders.get(order_id)
        if w is None or order_id not in self._working.get(w.order.symbol, {}):
            return
        del self._working[w.order.symbol][order_id]
        self._report(w, wire.ExecStatus.CANCELED, 0, 0.0, text)

    def _status(self, request: wire.StatusRequest) -> wire.Status:
        known = [self.orders[i] for i in request.cl_ord_ids if i in self.orders]
        return wire.Status(
            orders=[
                wire.OrderStatus(
                    w.order.cl_ord_id,
                    w.order.symbol,
                    w.order.side,
                    w.order.qty,
                    w.order.price,
                    w.status,
                    w.filled,
                    w.avg_px,
                )
                for w in known
            ],
            unknown=[i for i in request.cl_ord_ids if i not in self.orders],
            positions={s: q for s, q in self.account.positions.items() if q},
            ts=self._now,
        )
