"""The order desk: signals to orders, through the risk engine to the order manager.

The desk coordinates; it owns no state of its own kind. The risk engine (``daemon.risk_engine``)
holds the kill switch, trading states, review queue and order-rate memory and decides each order;
the order manager (``daemon.order_manager``) holds the book, journals and sends, applies reports
and reconciles. The desk turns signals into intents, routes each decision, records halts and
engine switches, rebuilds both from the journal at start-up, and serves operator commands.

Synchronous: the runtime calls it on the event loop; it never awaits. Every operator action is
journaled with the caller's uid.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from broker import protocol as wire
from broker import records as rec
from broker.bulk import NewOrders
from broker.client import Gateway
from broker.journal import Journal
from broker.orders import FINAL, Order, OrderBook, OrderState
from daemon import snapshot as snap
from daemon.batcher import Batch, BatchTiming
from daemon.clock import Clock
from daemon.config import Config
from daemon.engineset import FailoverEvent
from daemon.order_manager import OrderBlock, OrderManager
from daemon.policy import CLASS_NAMES, SignalPolicy
from daemon.risk_engine import Gross, RiskEngine
from daemon.stats import Stats
from daemon.windows import FeatureWindows
from risk import batch_gates as bg
from risk.halts import HaltBook, HaltEvent
from risk.review import ReviewQueue
from risk.states import TradingState

log = structlog.get_logger("tradingd.desk")

NS = 1_000_000_000
_HALT_ACTION: dict[type, str] = {kind: action for action, kind in rec.HALT_RECORDS.items()}
HALT_LOG = 1000  # halt events kept for status and tests; the journal has them all
# A batch of this many signals or more goes through the batch gates (fewer: one by one).
BATCH_GATES_FROM = 8


class OrderDesk:
    def __init__(self, config: Config, windows: FeatureWindows, clock: Clock, journal: Journal, stats: Stats) -> None:
        self.config = config
        self.windows = windows
        self.symbols = windows.symbols
        self.clock = clock
        self.journal = journal
        self.stats = stats
        self.policy = SignalPolicy.from_config(config)
        self.risk = RiskEngine(config, windows, clock)
        self.orders = OrderManager(
            clock,
            journal,
            stats,
            on_inconsistent=self._inconsistent,
            on_sent=self.risk.remember_send,
            on_block_sent=self.risk.remember_same_columns,
            universe=frozenset(self.symbols),
        )
        self.book.index_by(windows.index)
        self._names = np.array(self.symbols, dtype=object)
        self.halt_log: deque[HaltEvent] = deque(maxlen=HALT_LOG)
        self.engine_active: str | None = None  # the journal's word on which engine was serving
        self.fail_stopped = False  # the last process stopped itself on a fault
        self._gross = Gross(0.0)
        self.batch_gates_from = BATCH_GATES_FROM

    # -- the parts, by name ---------------------------------------------------------------

    @property
    def book(self) -> OrderBook:
        return self.orders.book

    @property
    def halts(self) -> HaltBook:
        return self.risk.halts

    @property
    def reviews(self) -> ReviewQueue:
        return self.risk.reviews

    @property
    def kill(self) -> bool:
        return self.risk.kill

    @property
    def gateway(self) -> Gateway | None:
        return self.orders.gateway

    @gateway.setter
    def gateway(self, gateway: Gateway | None) -> None:
        self.orders.gateway = gateway
        prepare = getattr(gateway, "prepare", None)  # the native gateway's bulk frames
        if prepare is not None:
            prepare(self.symbols)

    @property
    def reconciled(self) -> bool:
        return self.orders.reconciled

    @property
    def session(self) -> int:
        return self.orders.session

    # -- start-up -------------------------------------------------------------------------

    def restore(self, records: Iterable[rec.Record]) -> None:
        """Rebuild orders, positions, parked orders, halts and the kill switch from the journal."""
        book, orders, risk = self.book, self.orders, self.risk
        for r in records:
            oid = getattr(r, "id", None)
            order = book.orders.get(oid) if isinstance(oid, str) else None
            match r:
                case rec.Start():
                    orders.session = max(orders.session, r.session + 1)
                    self.windows.mark_restored()
                case rec.Intent() if order is None:
                    book.add(Order(r.id, r.symbol, wire.Side(r.side), r.qty, r.price, r.ts_event, 0))
                case rec.Denied() if order is not None and order.state in (OrderState.INTENT, OrderState.PARKED):
                    book.deny(order)
                case rec.Abandoned() if order is not None:
                    orders.restore_abandoned(order, r.detail)
                case rec.Parked() if order is not None and order.state is OrderState.INTENT:
                    order.move(OrderState.PARKED)
                    risk.reviews.park(risk.parked(order, r.ts, r.expires_at))
                case rec.Review() if order is not None:
                    if r.id in risk.reviews:
                        risk.reviews.take(r.id)
                    if r.action != "approved" and order.state is OrderState.PARKED:
                        book.deny(order)
                case rec.Send() if order is not None and order.state in (OrderState.INTENT, OrderState.PARKED):
                    book.mark_sent(order, 0)
                    risk.remember_send(order, r.ts)
                case rec.Orders():
                    for row in rec.order_rows(r):
                        if row["id"] in book.orders:
                            continue
                        side = wire.Side(row["side"])
                        sent = Order(row["id"], row["symbol"], side, row["qty"], row["price"], row["ts_event"], 0)
                        book.add(sent)
                        book.mark_sent(sent, 0)
                        risk.remember_send(sent, r.ts)
                case rec.Report():
                    orders.restore_report(r)
                case rec.Cancel() if order is not None:
                    orders.restore_cancel(order)
                case rec.HaltRecord() | rec.ReduceRecord() | rec.LiftRecord() | rec.ReferenceRecord() if (
                    r.symbol is not None and r.symbol not in risk.halts.state
                ):
                    self.stats.restore_skipped += 1  # a symbol no longer in the universe
                case rec.HaltRecord() | rec.ReduceRecord() | rec.LiftRecord():
                    risk.halts.restore(HaltEvent(_HALT_ACTION[type(r)], r.symbol, r.ts_event, r.reason, r.close))
                case rec.ReferenceRecord():
                    risk.halts.restore(HaltEvent("reference", r.symbol, r.ts_event, r.reason, r.close))
                case rec.Kill() if r.automatic:
                    self.fail_stopped = r.on
                case rec.Kill():
                    risk.kill = r.on
                case rec.Failover():
                    self.engine_active = r.to
                case rec.Reconcile() if r.positions is not None:
                    # The broker's positions, as adopted then; later fills move them on.
                    book.positions = dict(r.positions)
                case rec.Bars():
                    self._replay_bars(r)

    def _replay_bars(self, r: rec.Bars) -> None:
        """Bars accepted after the snapshot go back into the windows (never through the halt
        rule again: its events are journaled on their own)."""
        windows, index = self.windows, self.windows.index
        ts = np.frombuffer(r.bar_ts, dtype="<i8")
        ohlcv = np.frombuffer(r.ohlcv, dtype="<f8").reshape(len(ts), 5)
        prev = np.frombuffer(r.prev_close, dtype="<f8")
        max_gap_ns = int(self.config.journal.window_max_gap_s * 1e9)
        for k, symbol in enumerate(r.symbols):
            i = index.get(symbol)
            if i is None:
                continue
            if windows.restored and i in windows.restored:
                windows.resume(i, int(ts[k]), max_gap_ns)  # the live process's rule, replayed
            o, h, lo, c, v = (float(x) for x in ohlcv[k])
            pc = float(prev[k])
            windows.push(i, int(ts[k]), o, h, lo, c, v, None if math.isnan(pc) else pc)
            self.risk.feed_now = max(self.risk.feed_now, int(ts[k]))

    def snapshot(self) -> snap.State:
        """Everything restore needs, as of now (between two callbacks of the loop)."""
        book, risk = self.book, self.risk
        live = [o for o in book.orders.values() if o.state not in FINAL]
        return snap.State(
            format=snap.FORMAT,
            session=self.orders.session,
            order_seq=self.orders.order_seq,
            positions={k: v for k, v in book.positions.items() if v},
            last_fill_px=dict(book.last_fill_px),
            orders=[
                snap.OrderState(
                    o.cl_ord_id,
                    o.symbol,
                    str(o.side),
                    o.qty,
                    o.price,
                    o.ts_event,
                    str(o.state),
                    o.filled_qty,
                    o.notional_filled,
                    sorted(o.exec_ids),
                    o.cancels,
                )
                for o in live
            ],
            parked=[snap.ParkedState(p.id, p.parked_at_ns, p.expires_at_ns) for p in risk.reviews.waiting()],
            halts=risk.halts.export(),
            kill=risk.kill,
            engine_active=self.engine_active,
            feed_now=risk.feed_now,
            recent_sends=list(risk.recent_sends),
            windows=self.windows.export(),
            last_same=risk.recent_same(),
        )

    def load(self, state: snap.State) -> list[str]:
        """Take a snapshot back (before the records after it are replayed); returns the symbols
        that have no window in it."""
        book, risk = self.book, self.risk
        self.orders.session = state.session + 1  # the snapshot was taken in that session
        book.positions = dict(state.positions)
        book.last_fill_px = dict(state.last_fill_px)
        for o in state.orders:
            order = Order(o.id, o.symbol, wire.Side(o.side), o.qty, o.price, o.ts_event, 0)
            order.filled_qty, order.notional_filled = o.filled_qty, o.notional_filled
            order.exec_ids, order.cancels = set(o.exec_ids), o.cancels
            order.state = OrderState(o.state)
            book.add(order)
            if order.state not in (OrderState.INTENT, OrderState.PARKED):
                book.working[order.cl_ord_id] = order
                book.open_qty[order.symbol] = book.open_qty.get(order.symbol, 0) + order.signed_open_qty
        for p in state.parked:
            waiting = book.orders.get(p.id)
            if waiting is not None and waiting.state is OrderState.PARKED:
                risk.reviews.park(risk.parked(waiting, p.parked_at, p.expires_at))
        risk.halts.load(state.halts)
        risk.kill = state.kill
        self.engine_active = state.engine_active
        risk.feed_now = state.feed_now
        risk.recent_sends.extend(state.recent_sends)
        risk.load_same(state.last_same)
        return self.windows.load(state.windows)

    def begin_session(self) -> None:
        self.windows.mark_restored()  # this process's first bar of each symbol checks its gap
        wall = self.clock.wall_ns()
        self.journal.append(rec.Start(ts=wall, session=self.orders.session, after_fail_stop=self.fail_stopped))
        if self.fail_stopped:
            log.warning("restart_after_fail_stop", detail="the last process stopped itself; the journal was replayed")
        for order in list(self.book.orders.values()):
            if order.state is OrderState.PARKED and order.cl_ord_id not in self.reviews:
                # Approved, then the process stopped before the decision was journaled: the
                # approval is not taken late; the operator may see it denied and act again.
                self.orders.deny(order, "abandoned", "stopped between approval and decision")
                log.warning("approval_abandoned", id=order.cl_ord_id)
        self.orders.begin_session()

    def sent_order(self, cl_ord_id: str) -> wire.NewOrder | None:
        return self.orders.sent_order(cl_ord_id)

    def on_status(self, status: wire.Status) -> bool:
        """The broker's answer to the status request made at (re)connection; False if unasked."""
        if not self.orders.on_status(status):
            return False
        self._cancel_what_must_not_work()
        return True

    def _cancel_what_must_not_work(self) -> None:
        """After a reconciliation: a kill switch or halt that could not cancel while the broker
        was away (or whose cancels were lost with the connection) cancels now."""
        if self.risk.kill or self.halts.market is TradingState.HALTED:
            self.cancel_working(None)
        elif self.config.risk.halt.cancel_open_orders:
            for symbol in self.halts.halted_symbols():
                self.cancel_working(symbol)

    # -- market data ----------------------------------------------------------------------

    def on_bar(self, symbol: str, ts: int, open_: float, close: float, prev_close: float | None) -> None:
        self._record_halts(self.risk.on_bar(symbol, ts, open_, close, prev_close))

    def on_bars(
        self,
        idx: npt.NDArray[np.int64],
        ts: npt.NDArray[np.int64],
        open_: npt.NDArray[np.float64],
        close: npt.NDArray[np.float64],
        prev_close: npt.NDArray[np.float64],
    ) -> None:
        """``on_bar`` for a minute's bars of distinct symbols (NaN ``prev_close``: none)."""
        self._record_halts(self.risk.on_bars(idx, ts, open_, close, prev_close))

    def _record_halts(self, events: list[HaltEvent]) -> None:
        """The halt rule's events of a read: journaled together, written before any is acted on
        (a halt survives a restart) and fsynced without the minute waiting for the disk (the
        batch's own sync, before its orders leave, is behind them in the file)."""
        if not events:
            return
        synced = [event for event in events if self._journal_halt(event, uid=None)]
        if synced:
            self.journal.sync_soon()
        for event in synced:
            self._acted_on(event)

    def _record_halt(self, event: HaltEvent, uid: int | None, *, cancel: bool = True) -> None:
        if self._journal_halt(event, uid):
            self.journal.sync()
            self._acted_on(event, cancel=cancel)

    def _journal_halt(self, event: HaltEvent, uid: int | None) -> bool:
        """Append the event's record; True for a change of state (synced, then acted on), False
        for a reference price (journaled with the next sync)."""
        wall = self.clock.wall_ns()
        if event.action == "reference":
            self.journal.append(
                rec.ReferenceRecord(
                    ts=wall, symbol=event.symbol, reason=event.reason, ts_event=event.ts, close=event.close
                )
            )
            return False
        record = rec.HALT_RECORDS[event.action](
            ts=wall,
            symbol=event.symbol,
            reason=event.reason,
            ts_event=event.ts,
            close=event.close,
            reference=event.reference,
            uid=uid,
        )
        self.journal.append(record)
        return True

    def _acted_on(self, event: HaltEvent, *, cancel: bool = True) -> None:
        self.halt_log.append(event)
        if event.action == "halt":
            self.stats.halts += 1
        log.warning(
            {"halt": "halt", "reduce": "reducing_only"}.get(event.action, "halt_lifted"),
            symbol=event.symbol or "(market)",
            reason=event.reason,
            ts_event=event.ts,
        )
        if cancel and event.action == "halt" and self.config.risk.halt.cancel_open_orders:
            self.cancel_working(event.symbol)

    def cancel_working(self, symbol: str | None) -> int:
        """Cancel every working order (of ``symbol``, or all) once; cancels are never gated."""
        return self.orders.cancel_working(symbol)

    def _inconsistent(self, symbol: str, detail: str) -> None:
        """A report contradicted the book: the position is no longer certain, so the symbol may
        only shrink it until an operator has looked (``tradingd resume SYMBOL``)."""
        if self.halts.state.get(symbol) is not TradingState.ACTIVE:
            return
        event = self.halts.reduce(symbol, self.risk.feed_now or self.clock.wall_ns(), f"inconsistent report: {detail}")
        if event is not None:
            self._record_halt(event, uid=None)

    # -- signals to orders ----------------------------------------------------------------

    def risk_now(self) -> int:
        return self.risk.now()

    def on_signals(
        self,
        batch: Batch,
        rows: Iterable[int] | npt.NDArray[np.int64],
        cls: Sequence[int] | npt.NDArray[np.int64],
        conf: Sequence[float] | npt.NDArray[np.floating[Any]],
        timing: BatchTiming | None = None,
    ) -> None:
        """The batch's ``rows`` (their calls ``cls`` and confidences ``conf``, by batch row) to
        gated, journaled orders on the wire."""
        started = self.clock.mono_ns()
        self._gross = self.risk.gross(self.book)
        at = rows.astype(np.int64, copy=False) if isinstance(rows, np.ndarray) else np.fromiter(rows, dtype=np.int64)
        calls = np.asarray(cls, dtype=np.int64)
        confidence = np.asarray(conf, dtype=np.float64)
        if len(at) >= self.batch_gates_from and self.orders.can_send():
            self._signals_at_once(batch, at, calls, confidence)
        else:
            for row, c, p in zip(at.tolist(), calls[at].tolist(), confidence[at].tolist(), strict=True):
                self._signal(batch, row, c, p)
        decided = self.clock.mono_ns()
        self.stats.gates.record(decided - started)
        self.orders.commit(timing, decided)
        self.stats.send.record(self.clock.mono_ns() - decided)

    def _signals_at_once(
        self, batch: Batch, at: npt.NDArray[np.int64], cls: npt.NDArray[np.int64], conf: npt.NDArray[np.float64]
    ) -> None:
        """``_signal`` for each row, with the policy and the gates over arrays. The orders the
        batch gates pass become one block: one journal record, one write, and ``Order``s in the
        book once they are on the wire. The rest are decided one by one, in their place, exactly
        as ``_signal`` would (the batch gates never pass an order the scalar gates would stop),
        each seeing the running totals (gross exposure, orders sent) as of its place."""
        idx = batch.symbols[at]
        totals = self.book.exposure_totals
        assert totals is not None  # the desk indexed its book by the universe
        exposure = totals[idx]
        cls_all = cls[at]
        conf_all = conf[at]
        intents = self.policy.intents(cls_all, conf_all, batch.close[at], exposure)
        k = intents.rows
        if not len(k):
            return
        sym = idx[k]
        names: list[str] = self._names[sym].tolist()
        view = self.risk.batch_view(sym, names, exposure[k], self._gross, intents)
        ts_event = batch.ts_event[at[k]]
        orders = bg.BatchOrders(intents.side, intents.qty, intents.price, ts_event)
        go, _static, _stop = bg.passes(orders, self.risk.limits, view)
        change = np.where(go, bg.exposure_change(orders, view), 0.0)
        confidence = np.round(conf_all[k], 4)
        self.stats.intents += len(k)
        g = np.flatnonzero(go)
        if len(g):
            self.stats.orders_batch_gated += len(g)
            taken = at[k][g]
            ready = batch.ts_ready[taken] if len(batch.ts_ready) else np.zeros(len(g), np.int64)
            new = NewOrders(
                self.orders.id_prefix,
                self.orders.next_ids(len(g)),
                self.symbols,
                sym[g],
                intents.side[g].astype(np.int8),
                intents.qty[g],
                intents.price[g],
                0,
            )
            block = OrderBlock(
                new,
                [names[j] for j in g.tolist()],
                ts_event[g],
                batch.ts_recv[taken],
                ready,
                cls_all[k][g].astype(np.int8),
                confidence[g],
            )
            self.orders.queue_block(block)
        wall = self.clock.wall_ns()
        base, unpriced = self._gross.value, self._gross.unpriced
        gross_at = base + np.cumsum(change)  # before each order, with what went before it
        went_before = np.cumsum(go)
        counted, extra = 0, 0.0
        for j in np.flatnonzero(~go).tolist():
            upto = int(went_before[j])
            if upto > counted:
                self.risk.count_sends(upto - counted, wall)
                counted = upto
            before = float(gross_at[j]) + extra
            self._gross = Gross(before, unpriced)
            row = int(at[k[j]])
            order = Order(
                self.orders.next_id(),
                names[j],
                wire.Side.BUY if intents.side[j] > 0 else wire.Side.SELL,
                int(intents.qty[j]),
                float(intents.price[j]),
                int(batch.ts_event[row]),
                int(batch.ts_recv[row]),
                ts_ready=int(batch.ts_ready[row]) if len(batch.ts_ready) else 0,
            )
            signal, rounded = CLASS_NAMES[int(cls[row])], float(confidence[j])
            self.orders.intent(order, signal, rounded)
            self._decide(order, order.ts_event, review=True, signal=signal, confidence=rounded)
            extra += self._gross.value - before
        if len(g) > counted:
            self.risk.count_sends(len(g) - counted, wall)
        self._gross = Gross(float(gross_at[-1]) + extra, unpriced)

    def _signal(self, batch: Batch, row: int, cls: int, confidence: float) -> None:
        i = int(batch.symbols[row])
        symbol = self.symbols[i]
        intent = self.policy.intent(cls, confidence, float(batch.close[row]), self.book.exposure(symbol))
        if intent is None:
            return
        self.stats.intents += 1
        order = Order(
            self.orders.next_id(),
            symbol,
            intent.side,
            intent.qty,
            intent.price,
            int(batch.ts_event[row]),
            int(batch.ts_recv[row]),
            ts_ready=int(batch.ts_ready[row]) if len(batch.ts_ready) else 0,
        )
        self.orders.intent(order, CLASS_NAMES[cls], round(confidence, 4))
        self._decide(order, order.ts_event, review=True, signal=CLASS_NAMES[cls], confidence=round(confidence, 4))

    @staticmethod
    def _fields(order: Order, **extra: Any) -> dict[str, Any]:
        return {
            "id": order.cl_ord_id,
            "symbol": order.symbol,
            "side": str(order.side),
            "qty": order.qty,
            "price": order.price,
            **extra,
        }

    def _decide(self, order: Order, ts_event: int, *, review: bool, **extra: Any) -> None:
        """The risk engine's decision (gates 1-6, then review), then the broker."""
        position = self.book.exposure(order.symbol)
        decision = self.risk.decide(order, position, self._gross, ts_event, review=review)
        reason, detail = decision.reason, decision.detail
        if reason is None and not self.orders.can_send():
            reason, detail = "broker_disconnected", "no reconciled connection to the broker gateway"
        fields = self._fields(order, **extra)
        if reason is not None:
            self.stats.orders_denied[reason] += 1
            self.orders.deny(order, reason, detail)
            log.info("order_denied", reason=reason, detail=detail, **fields)
            return
        if decision.park:
            wall = self.clock.wall_ns()
            expires = wall + int(self.config.risk.review_ttl_s * NS)
            self.orders.park(order, wall, expires, decision.notional)
            self.reviews.park(self.risk.parked(order, wall, expires))
            self.stats.reviews_parked += 1
            log.warning("order_parked", notional=round(decision.notional, 2), **fields)
            return
        self._gross = Gross(self._gross.value + self.risk.exposure_change(order, position), self._gross.unpriced)
        self.orders.queue(order, fields)

    # -- broker ---------------------------------------------------------------------------

    def on_report(self, report: wire.ExecReport) -> None:
        self.orders.on_report(report)

    def on_broker_event(self, kind: str, detail: str) -> None:
        self.orders.on_broker_event(kind, detail)

    # -- engines --------------------------------------------------------------------------

    def record_failover(self, event: FailoverEvent, rows: int = 0, uid: int | None = None) -> None:
        """Journal, count and log an engine switch (automatic or by an operator)."""
        record = rec.Failover(
            ts=self.clock.wall_ns(),
            from_engine=event.from_engine,
            to=event.to_engine,
            reason=str(event.reason),
            detail=event.detail,
            rerun=event.rerun,
            rows=rows,
            uid=uid,
        )
        self.journal.append(record)
        self.journal.sync()
        self.engine_active = event.to_engine
        self.stats.failovers[str(event.reason)] += 1
        if event.rerun:
            self.stats.rerun_batches += 1
        log.error(
            "engine_failover",
            **{"from": event.from_engine, "to": event.to_engine},
            reason=str(event.reason),
            detail=event.detail,
            rerun=event.rerun,
            rows=rows,
            uid=uid,
        )

    # -- operators ------------------------------------------------------------------------

    def operator(self, uid: int, command: str, *, refused: bool = False, **args: Any) -> None:
        record = rec.Operator(ts=self.clock.wall_ns(), uid=uid, command=command, args=args, refused=refused)
        self.journal.append(record)

    def halt(self, symbol: str | None, uid: int, reducing: bool = False, *, cancel: bool = True) -> bool:
        """Halt (or, with ``reducing``, allow only position-shrinking orders for) a symbol or the market."""
        ts, reason = self.risk.feed_now or self.clock.wall_ns(), f"operator uid {uid}"
        event = self.halts.reduce(symbol, ts, reason) if reducing else self.halts.halt(symbol, ts, reason)
        if event is not None:
            self._record_halt(event, uid, cancel=cancel)
        return event is not None

    def resume(self, symbol: str | None, uid: int) -> bool:
        event = self.halts.resume(symbol, self.risk.feed_now or self.clock.wall_ns(), f"operator uid {uid}")
        if event is not None:
            self._record_halt(event, uid)
        lifted_kill = symbol is None and self.risk.kill
        if lifted_kill:
            self.risk.kill = False
            self.journal.append(rec.Kill(ts=self.clock.wall_ns(), on=False, uid=uid))
            self.journal.sync()
            log.warning("kill_switch_off", uid=uid)
        return event is not None or lifted_kill

    def kill_switch(self, uid: int) -> int:
        """Halt everything and cancel every working order once; returns how many cancels were sent."""
        self.risk.kill = True
        self.journal.append(rec.Kill(ts=self.clock.wall_ns(), on=True, uid=uid))
        self.stats.kills += 1
        log.error("kill_switch_on", uid=uid)
        self.halt(None, uid, cancel=False)
        return self.cancel_working(None)

    def trip(self, reason: str) -> int:
        """The daemon's own kill switch on a fault it cannot reason about (fail-stop): no new
        order from here on, every working order cancelled. Journaled as automatic, so the restart
        that follows trades again after replaying the journal; an operator's kill stays on."""
        self.risk.kill = True
        self.stats.kills += 1
        self.journal.append(rec.Kill(ts=self.clock.wall_ns(), on=True, reason=reason, automatic=True))
        return self.cancel_working(None)

    def approve(self, order_id: str, uid: int) -> str:
        """Take a parked order out of review and run gates 1-6 at the current price; returns its
        state. Its signal's age is its own bar's, not the symbol's latest."""
        parked = self.reviews.take(order_id)
        order = self.book.orders[parked.id]
        self.journal.append(rec.Review(ts=self.clock.wall_ns(), id=order_id, action="approved", uid=uid))
        self.stats.reviews_approved += 1
        log.warning("review_approved", id=order_id, uid=uid)
        order.ts_recv = 0  # an approved order's latency is the operator's, not the daemon's
        self._gross = self.risk.gross(self.book)
        self._decide(order, order.ts_event, review=False)
        self.orders.commit()
        return str(order.state)

    def reject(self, order_id: str, uid: int, reason: str) -> None:
        parked = self.reviews.take(order_id)
        self.journal.append(rec.Review(ts=self.clock.wall_ns(), id=order_id, action="rejected", uid=uid, reason=reason))
        self.journal.sync()
        self.book.deny(self.book.orders[parked.id])
        self.stats.reviews_rejected += 1
        log.warning("review_rejected", id=order_id, uid=uid, reason=reason)

    def expire_reviews(self) -> int:
        wall = self.clock.wall_ns()
        gone = self.reviews.expire(wall)
        for parked in gone:
            self.journal.append(rec.Review(ts=wall, id=parked.id, action="expired"))
            self.book.deny(self.book.orders[parked.id])
            self.stats.reviews_expired += 1
            log.warning("review_expired", id=parked.id)
        if gone:
            self.journal.sync()
        return len(gone)

    def status(self) -> dict[str, Any]:
        wall = self.clock.wall_ns()
        return {
            "kill": self.kill,
            "market": str(self.halts.market),
            "halted": self.halts.halted_symbols(),
            "reducing": [s for s, st in self.halts.state.items() if st is TradingState.REDUCING],
            "reconciled": self.reconciled,
            "broker_connected": bool(self.gateway and self.gateway.connected),
            "positions": {k: v for k, v in sorted(self.book.positions.items()) if v},
            "working_orders": len(self.book.working),
            "review_queue": len(self.reviews),
            "review_oldest_s": round(self.reviews.oldest_age_ns(wall) / NS, 1),
        }

    def review_list(self) -> list[dict[str, Any]]:
        wall = self.clock.wall_ns()
        return [
            {
                "id": p.id,
                "symbol": p.symbol,
                "side": "buy" if p.side > 0 else "sell",
                "qty": p.qty,
                "price": p.price,
                "notional": round(p.notional, 2),
                "age_s": round((wall - p.parked_at_ns) / NS, 1),
                "expires_in_s": round((p.expires_at_ns - wall) / NS, 1),
            }
            for p in self.reviews.waiting()
        ]
