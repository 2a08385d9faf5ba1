"""The order manager: orders from intent to a final state, journaled before they leave.

It owns the order book, the journal and the gateway. Every order is journaled as an intent, its
decision journaled, and its send journaled and synced before it is written (group commit per
batch); a write the gateway refuses closes the order as never sent. Execution reports apply once,
by ExecID and ``cum_qty`` (``broker.orders``); a report that contradicts the book is journaled and
never applied, and the symbol is handed to ``on_inconsistent`` (the desk puts it in REDUCING).
Cancels are sent once per order, each with its own id, journaled and synced first.

Synchronous: called on the event loop, it never awaits. An error it cannot reason about (a
journal write that fails, a broken invariant) propagates: the daemon fail-stops on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from broker import protocol as wire
from broker import records as rec
from broker.bulk import NewOrders
from broker.client import Gateway
from broker.crashpoints import CRASH
from broker.journal import Journal
from broker.orders import FINAL, Order, OrderBook, OrderState, Refusal, SentColumns
from daemon.batcher import BatchTiming
from daemon.clock import Clock
from daemon.stats import Stats

log = structlog.get_logger("tradingd.orders")

NS = 1_000_000_000


def _info(logger: Any) -> bool:
    """Whether ``logger`` writes info lines (the per-order lines cost nothing when it does not)."""
    enabled = getattr(logger, "is_enabled_for", None)
    return bool(enabled(logging.INFO)) if enabled is not None else True


def synthetic_report(
    order: Order, status: wire.ExecStatus, cum_qty: int, px: float, text: str, exec_id: str
) -> wire.ExecReport:
    """A report the daemon makes itself (reconciliation, a send that never left): same rules."""
    last = max(cum_qty - order.filled_qty, 0)
    leaves = 0 if status in (wire.ExecStatus.REJECTED, wire.ExecStatus.CANCELED) else order.qty - cum_qty
    return wire.ExecReport(
        order.cl_ord_id, exec_id, status, order.symbol, order.side, last, px, cum_qty, max(leaves, 0), 0, text
    )


@dataclass(slots=True)
class OrderBlock:
    """A batch's orders that passed every gate at once (distinct symbols), as columns: they are
    journaled as one ``Orders`` record and written in one go, and become ``Order``s in the book
    only after they are on the wire."""

    orders: NewOrders  # ids, symbols, sides, quantities, prices (``ts`` is set when written)
    symbols: list[str]
    ts_event: npt.NDArray[np.int64]
    ts_recv: npt.NDArray[np.int64]  # mono ns of the read that brought each bar
    ts_ready: npt.NDArray[np.int64]  # mono ns each bar was in its window (0: unknown)
    signal: npt.NDArray[np.int8]  # the class (``records.SIGNALS``)
    confidence: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.symbols)


class OrderManager:
    def __init__(
        self,
        clock: Clock,
        journal: Journal,
        stats: Stats,
        *,
        on_inconsistent: Callable[[str, str], None] = lambda symbol, detail: None,
        on_sent: Callable[[Order, int], None] = lambda order, wall: None,
        on_block_sent: Callable[[list[str], Any, Any, Any, int], None] = lambda symbols, side, qty, price, wall: None,
        universe: frozenset[str] | None = None,
    ) -> None:
        self.clock = clock
        self.journal = journal
        self.stats = stats
        self.book = OrderBook()
        self.gateway: Gateway | None = None
        self.reconciled = False
        self.session = 1
        self.on_inconsistent = on_inconsistent
        self.on_sent = on_sent
        self.on_block_sent = on_block_sent
        self.universe = universe  # positions outside it are the broker's business, not tracked here
        self.status_asked_ns: int | None = None  # a status request is outstanding since (mono ns)
        self.order_seq = 0
        self._id_prefix = ""
        self._outbox: list[tuple[Order, dict[str, Any]]] = []
        self._blocks: list[OrderBlock] = []

    # -- start-up -------------------------------------------------------------------------

    def begin_session(self) -> None:
        wall = self.clock.wall_ns()
        self._id_prefix = f"{wall // NS:x}{self.session}"
        for order in self.book.orders.values():
            if order.state is OrderState.INTENT:
                # The process stopped between journaling the intent and deciding on it: the
                # decision is closed as abandoned, never taken late.
                self.journal.append(rec.Abandoned(ts=wall, id=order.cl_ord_id, detail="stopped before the decision"))
                self.book.deny(order)
                log.warning("intent_abandoned", id=order.cl_ord_id, detail="stopped before the decision")
        self.journal.sync()

    def restore_report(self, r: rec.Report) -> None:
        order = self.book.orders.get(r.id)
        if order is None:
            return
        self.book.apply(synthetic_report(order, wire.ExecStatus(r.status), r.cum_qty, r.last_px, r.text, r.exec_id))

    def restore_abandoned(self, order: Order, detail: str) -> None:
        if order.state in (OrderState.INTENT, OrderState.PARKED):
            self.book.deny(order)
        elif order.state not in FINAL:
            self.book.apply(synthetic_report(order, wire.ExecStatus.REJECTED, order.filled_qty, 0.0, detail, ""))

    # -- new orders -----------------------------------------------------------------------

    def next_id(self) -> str:
        self.order_seq += 1
        return f"{self._id_prefix}-{self.order_seq}"

    @property
    def id_prefix(self) -> str:
        return self._id_prefix

    def next_ids(self, n: int) -> int:
        """Take ``n`` order numbers at once; returns the first (ids as ``next_id`` makes them)."""
        first = self.order_seq + 1
        self.order_seq += n
        return first

    def intent(self, order: Order, signal: str, confidence: float) -> None:
        self.journal.append(
            rec.Intent(
                ts=self.clock.wall_ns(),
                id=order.cl_ord_id,
                symbol=order.symbol,
                side=str(order.side),
                qty=order.qty,
                price=order.price,
                ts_event=order.ts_event,
                signal=signal,
                confidence=confidence,
            )
        )
        self.book.add(order)

    def deny(self, order: Order, reason: str, detail: str) -> None:
        self.journal.append(rec.Denied(ts=self.clock.wall_ns(), id=order.cl_ord_id, reason=reason, detail=detail))
        self.book.deny(order)

    def park(self, order: Order, wall: int, expires: int, notional: float) -> None:
        self.journal.append(rec.Parked(ts=wall, id=order.cl_ord_id, expires_at=expires, notional=notional))
        order.move(OrderState.PARKED)

    def can_send(self) -> bool:
        gateway = self.gateway
        return gateway is not None and gateway.connected and self.reconciled

    def queue(self, order: Order, fields: dict[str, Any]) -> None:
        """Journal the send; the order is written at ``commit``, after the journal sync."""
        wall = self.clock.wall_ns()
        self.journal.append(rec.Send(ts=wall, id=order.cl_ord_id))
        self.on_sent(order, wall)
        self._outbox.append((order, fields))

    def queue_block(self, block: OrderBlock) -> None:
        """Journal a block's intents and sends as one record; its orders are written at
        ``commit``, after the journal sync, with the batch's other orders."""
        o = block.orders
        self.journal.append(
            rec.Orders(
                ts=self.clock.wall_ns(),
                prefix=o.prefix,
                first=o.first,
                symbols=block.symbols,
                side=o.side.astype(np.int8).tobytes(),
                qty=o.qty.astype("<i8").tobytes(),
                price=o.price.astype("<f8").tobytes(),
                ts_event=block.ts_event.astype("<i8").tobytes(),
                signal=block.signal.astype(np.int8).tobytes(),
                confidence=block.confidence.astype("<f8").tobytes(),
            )
        )
        self._blocks.append(block)

    def commit(self, timing: BatchTiming | None = None, decided_ns: int = 0) -> None:
        """Group commit: the batch's records reach the journal file (and the disk, per the fsync
        policy) before any of its orders leaves, so a crash can lose an order's send but never
        send an order the journal does not know. An order the gateway cannot write is closed as
        never sent (journaled), never left looking sent."""
        self.journal.sync()
        synced = self.clock.mono_ns()
        outbox, self._outbox = self._outbox, []
        blocks, self._blocks = self._blocks, []
        if not outbox and not blocks:
            return
        if CRASH.armed:
            CRASH.reached("batch_synced")
        # One write for the batch (bar a crash test, which must see a batch partly written).
        corked = self.gateway if not CRASH.armed else None
        if corked is not None:
            corked.cork()
        try:
            written = self._write(outbox)
            blocks_written = [(block, self._write_block(block)) for block in blocks]
        finally:
            if corked is not None:
                corked.uncork()
        # Sent when written to the socket: after the batch's one write, for every order in it.
        ts_send = self.clock.mono_ns()
        s = self.stats
        for block, k in blocks_written:
            recv = block.ts_recv[:k]
            s.tick_to_order.record_many(ts_send - recv)
            if timing is not None:
                ready = block.ts_ready[:k]
                staged = ready != 0
                s.stages.record_many(recv[staged], ready[staged], timing, decided_ns, synced, ts_send)
        mark_sent = self.book.mark_sent
        for order, _fields in written:
            mark_sent(order, ts_send)
        s.orders_sent += len(written)
        recv = np.fromiter((o.ts_recv for o, _ in written), dtype=np.int64, count=len(written))
        timed = recv != 0  # an approved order's latency is the operator's, not the daemon's
        s.tick_to_order.record_many(ts_send - recv[timed])
        if timing is not None:
            ready = np.fromiter((o.ts_ready for o, _ in written), dtype=np.int64, count=len(written))
            staged = timed & (ready != 0)
            s.stages.record_many(recv[staged], ready[staged], timing, decided_ns, synced, ts_send)
        # Everything is on the wire: now the blocks' orders become ``Order``s in the book.
        for block, k in blocks_written:
            self._booked(block, k, ts_send)
        if len(written) < len(outbox) or any(k < len(block) for block, k in blocks_written):
            self.journal.sync()
        # Logged after the whole batch is on the wire: a log line never delays the next order.
        if _info(log):
            for (order, fields), ok in zip(written, timed.tolist(), strict=True):
                latency = (ts_send - order.ts_recv) // 1000 if ok else None
                log.info("order_sent", tick_to_order_us=latency, **fields)
            for block, k in blocks_written:
                if k:
                    t2o = (ts_send - block.ts_recv[:k]) // 1000
                    o = block.orders
                    log.info(
                        "orders_sent",
                        orders=k,
                        first_id=f"{o.prefix}-{o.first}",
                        last_id=f"{o.prefix}-{o.first + k - 1}",
                        tick_to_order_us_max=int(t2o.max()),
                        detail="one batch's orders that passed every gate at once; each is in the journal",
                    )

    def _write_block(self, block: OrderBlock) -> int:
        """Write a block's orders (one buffer where the gateway takes one); returns how many,
        from the first, were written."""
        gateway = self.gateway
        block.orders = orders = replace(block.orders, ts=self.clock.wall_ns())
        if gateway is None:
            return 0
        send_new_orders = getattr(gateway, "send_new_orders", None)
        if send_new_orders is not None and not CRASH.armed:
            return len(orders) if send_new_orders(orders) else 0
        for k, message in enumerate(orders.messages()):
            if CRASH.armed and k == 1:
                CRASH.reached("batch_partly_sent")
            if not gateway.send(message):
                return k  # written: the ones before it
            if CRASH.armed:
                CRASH.reached("sent_not_marked")
        return len(orders)

    def _booked(self, block: OrderBlock, k: int, ts_send: int) -> None:
        """The block's orders into the book: the first ``k`` sent (booked as columns, made
        ``Order``s when next read), the rest closed as never sent (journaled), as ``_write``
        closes an order the gateway could not write."""
        o = block.orders
        if k:
            self.book.add_sent_columns(
                SentColumns(
                    o.prefix,
                    o.first,
                    block.symbols[:k],
                    o.idx[:k],
                    o.side[:k],
                    o.qty[:k],
                    o.price[:k],
                    block.ts_event[:k],
                    block.ts_recv[:k],
                    block.ts_ready[:k],
                    ts_send,
                )
            )
            self.stats.orders_sent += k
            self.on_block_sent(block.symbols[:k], o.side[:k], o.qty[:k], o.price[:k], o.ts)
        if k == len(block):
            return
        detail = "the gateway could not write it (disconnected)"
        wall = self.clock.wall_ns()
        first_failed = f"{o.prefix}-{o.first + k}"
        for j in range(k, len(block)):
            order = Order(
                f"{o.prefix}-{o.first + j}",
                block.symbols[j],
                wire.Side.BUY if o.side[j] > 0 else wire.Side.SELL,
                int(o.qty[j]),
                float(o.price[j]),
                int(block.ts_event[j]),
                int(block.ts_recv[j]),
            )
            self.book.add(order)
            self.journal.append(rec.Abandoned(ts=wall, id=order.cl_ord_id, detail=detail))
            self.book.deny(order)
            self.stats.sends_failed += 1
            self.stats.orders_denied["send_failed"] += 1
        log.error("orders_not_sent", orders=len(block) - k, first_id=first_failed, detail=detail)

    def _write(self, outbox: list[tuple[Order, dict[str, Any]]]) -> list[tuple[Order, dict[str, Any]]]:
        """Hand each order to the gateway; one it cannot write is closed as never sent."""
        gateway = self.gateway
        s = self.stats
        written = []
        for k, (order, fields) in enumerate(outbox):
            if CRASH.armed and k == 1:
                CRASH.reached("batch_partly_sent")
            message = wire.NewOrder(
                order.cl_ord_id, order.symbol, order.side, order.qty, order.price, self.clock.wall_ns()
            )
            ok = gateway is not None and gateway.send(message)
            if CRASH.armed and ok:
                CRASH.reached("sent_not_marked")
            if not ok:
                detail = "the gateway could not write it (disconnected)"
                self.journal.append(rec.Abandoned(ts=self.clock.wall_ns(), id=order.cl_ord_id, detail=detail))
                self.book.deny(order)
                s.sends_failed += 1
                s.orders_denied["send_failed"] += 1
                log.error("order_not_sent", detail=detail, **fields)
                continue
            written.append((order, fields))
        return written

    # -- cancels --------------------------------------------------------------------------

    def cancel_working(self, symbol: str | None) -> int:
        """Cancel every working order (of ``symbol``, or all) that has no cancel in flight: each
        cancel journaled with its own id and synced, then written. Returns how many were written."""
        wall = self.clock.wall_ns()
        todo: list[tuple[Order, str]] = []
        for order in self.book.working.values():
            if (symbol is not None and order.symbol != symbol) or order.cancel_pending:
                continue
            order.cancels += 1
            order.cancel_pending = True
            cancel_id = f"{order.cl_ord_id}.C{self.session}-{order.cancels}"
            self.journal.append(rec.Cancel(ts=wall, id=order.cl_ord_id, cancel_id=cancel_id))
            todo.append((order, cancel_id))
        if not todo:
            return 0
        self.journal.sync()
        gateway = self.gateway
        n = 0
        for order, cancel_id in todo:
            if gateway is not None and gateway.send(wire.Cancel(cancel_id, order.cl_ord_id, order.symbol, wall)):
                n += 1
            else:
                order.cancel_pending = False  # not in flight: a later kill or halt may try again
                log.error("cancel_not_sent", id=order.cl_ord_id, cancel_id=cancel_id, detail="gateway disconnected")
        self.stats.cancels_sent += n
        return n

    @staticmethod
    def restore_cancel(order: Order) -> None:
        # Ids stay unique (they carry the session too); whether that cancel arrived is the
        # reconciliation's to find out, so a new kill may cancel the order again.
        order.cancels += 1

    # -- broker ---------------------------------------------------------------------------

    def sent_order(self, cl_ord_id: str) -> wire.NewOrder | None:
        """An order as it was sent, from the book (which the journal rebuilt); None if unknown."""
        order = self.book.orders.get(cl_ord_id)
        if order is None:
            return None
        return wire.NewOrder(order.cl_ord_id, order.symbol, order.side, order.qty, order.price, order.ts_send)

    def status_request(self) -> wire.StatusRequest:
        """Ask the broker about every order sent and not yet final: the book's working orders."""
        return wire.StatusRequest(cl_ord_ids=list(self.book.working), ts=self.clock.wall_ns())

    def on_report(self, report: wire.ExecReport) -> None:
        self._apply_report(report, self.clock.wall_ns())

    def _apply_report(self, report: wire.ExecReport, wall: int) -> Refusal | None:
        s = self.stats
        known = self.book.orders.get(report.cl_ord_id)
        was_sent = known is not None and known.state is OrderState.SENT
        refusal = self.book.apply(report)
        if refusal is not None:
            self._refused(report, refusal, known, wall)
            return refusal
        self.journal.append(
            rec.Report(
                ts=wall,
                id=report.cl_ord_id,
                exec_id=report.exec_id,
                status=str(report.status),
                last_qty=report.last_qty,
                last_px=report.last_px,
                cum_qty=report.cum_qty,
                text=report.text,
            )
        )
        order = self.book.orders.get(report.cl_ord_id) or known
        assert order is not None
        if report.last_qty or report.cum_qty:
            s.fills += bool(report.last_qty)
            log.info(
                "fill",
                id=report.cl_ord_id,
                symbol=order.symbol,
                qty=report.last_qty,
                cum_qty=report.cum_qty,
                px=report.last_px,
                position=self.book.positions.get(order.symbol, 0),
            )
        state = order.state
        if was_sent and state is not OrderState.REJECTED:
            s.orders_acked += 1  # the broker's first word on the order, and not a refusal
        if state is OrderState.FILLED:
            s.orders_filled += 1
        elif state is OrderState.REJECTED:
            s.orders_rejected += 1
            log.warning("order_rejected", id=report.cl_ord_id, reason=report.text)
        elif state is OrderState.CANCELED:
            s.orders_canceled += 1
        return None

    def _refused(self, report: wire.ExecReport, refusal: Refusal, order: Order | None, wall: int) -> None:
        s = self.stats
        if not refusal.inconsistent:
            s.reports_ignored[refusal.code] += 1
            log.warning("exec_report_ignored", id=report.cl_ord_id, exec_id=report.exec_id, problem=refusal.detail)
            return
        s.reports_inconsistent[refusal.code] += 1
        self.journal.append(rec.BadReport(ts=wall, id=report.cl_ord_id, exec_id=report.exec_id, problem=refusal.detail))
        log.error(
            "exec_report_inconsistent",
            id=report.cl_ord_id,
            exec_id=report.exec_id,
            problem=refusal.code,
            detail=refusal.detail,
            action="not applied; symbol reducing-only until an operator resumes it",
        )
        assert order is not None  # an unknown order is never inconsistent
        self.on_inconsistent(order.symbol, refusal.detail)

    def reconcile(self, status: wire.Status) -> list[str]:
        """Bring orders and positions in line with the broker's word; returns the differences."""
        differences: list[str] = []
        wall = self.clock.wall_ns()
        for k, s in enumerate(status.orders):
            if CRASH.armed and k == 1:
                CRASH.reached("mid_reconcile")
            order = self.book.orders.get(s.cl_ord_id)
            if order is None:
                differences.append(f"broker knows order {s.cl_ord_id} the journal does not")
                continue
            if order.state in FINAL:
                continue
            missing = s.cum_qty - order.filled_qty
            moved = s.status.value != order.state.value and not (
                s.status is wire.ExecStatus.NEW and order.state is OrderState.ACKED
            )
            if missing or moved:
                exec_id = f"reconcile:{self.session}:{s.status}:{s.cum_qty}"
                report = synthetic_report(order, s.status, s.cum_qty, s.avg_px, "reconciled", exec_id)
                refusal = self._apply_report(report, wall)
                what = (
                    f"not applied: {refusal.detail}" if refusal is not None else f"{max(missing, 0)} filled while away"
                )
                differences.append(f"{s.cl_ord_id}: {s.status} at the broker, {what}")
        for cl_ord_id in status.unknown:
            order = self.book.orders.get(cl_ord_id)
            if order is None or order.state in FINAL:
                continue
            # Journaled as sent, but the broker never received it: the process died in between.
            # The signal is stale now; it is closed, never resent blindly.
            self.journal.append(rec.Abandoned(ts=wall, id=cl_ord_id, detail="never reached the broker"))
            self.restore_abandoned(order, "never reached the broker")
            differences.append(f"{cl_ord_id}: never reached the broker; closed, not resent")
        positions = self.book.positions
        broker_positions = status.positions if status.positions is not None else positions
        universe = self.universe
        if universe is not None:
            foreign = sorted(s for s, q in broker_positions.items() if q and s not in universe)
            if foreign:
                differences.append(f"broker positions outside the universe, not tracked: {foreign}")
            broker_positions = {s: q for s, q in broker_positions.items() if s in universe}
        for symbol in sorted(set(broker_positions) | set(positions)):
            ours, theirs = positions.get(symbol, 0), broker_positions.get(symbol, 0)
            if ours != theirs:
                differences.append(f"position {symbol}: journal {ours}, broker {theirs}; taking the broker's")
                positions[symbol] = theirs
        self.journal.append(rec.Reconcile(ts=wall, differences=differences, positions=dict(positions)))
        self.journal.sync()
        self.stats.reconcile_differences += len(differences)
        for d in differences:
            log.error("reconcile_difference", detail=d)
        log.info("reconciled", orders_checked=len(status.orders) + len(status.unknown), differences=len(differences))
        self.reconciled = True
        return differences

    def ask_status(self) -> None:
        """Ask where the working orders stand; only the answer to an outstanding request is
        applied (``on_status``)."""
        if self.gateway is not None and self.gateway.send(self.status_request()):
            self.status_asked_ns = self.clock.mono_ns()

    def on_status(self, status: wire.Status) -> bool:
        """The broker's answer to our status request. One that nobody asked for (a repeat, or
        one sent unprompted) is counted and ignored: its positions are a snapshot of an earlier
        moment, and adopting them would undo fills applied since."""
        if self.status_asked_ns is None:
            self.stats.reports_ignored["unsolicited_status"] += 1
            log.warning("broker_status_ignored", detail="no status request outstanding")
            return False
        self.status_asked_ns = None
        self.reconcile(status)
        return True

    def on_broker_event(self, kind: str, detail: str) -> None:
        if kind == "connected":
            self.stats.broker_connects += 1
            # Every (re)connection is reconciled before orders flow again.
            self.reconciled = False
            self.status_asked_ns = None
            self.ask_status()
        elif kind == "disconnected":
            self.stats.broker_disconnects += 1
            self.reconciled = False
            self.status_asked_ns = None
            # A cancel in flight may not have arrived: after the reconnect, it may be sent again.
            for order in self.book.working.values():
                order.cancel_pending = False
        elif kind == "cancel_rejected":
            # The broker refused a cancel: none is in flight for that order any more.
            refused = self.book.working.get(detail.split(":", 1)[0].strip())
            if refused is not None:
                refused.cancel_pending = False
        log.info("broker_" + kind, detail=detail)
