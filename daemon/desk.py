"""The order desk: signals to orders, through the gates, the review queue and the halts, to the
broker, with every step journaled first. It also rebuilds itself from the journal at start-up and
reconciles with the broker before it trades.

Synchronous: the runtime calls it on the event loop; it never awaits. Operators reach it through
the admin socket; every operator action is journaled with the caller's uid.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

import structlog

from broker import protocol as wire
from broker.client import Gateway
from broker.journal import Journal
from broker.orders import FINAL, Order, OrderBook, OrderState
from daemon.batcher import Batch
from daemon.clock import Clock
from daemon.config import Config, RiskConfig
from daemon.engineset import FailoverEvent
from daemon.policy import CLASS_NAMES, SignalPolicy
from daemon.stats import Stats
from daemon.windows import FeatureWindows
from risk.gates import Limits, OrderCheck, RiskView, SymbolLimits, check_order, needs_review
from risk.halts import HaltBook, HaltEvent, HaltRule
from risk.review import Parked, ReviewQueue
from risk.states import TradingState

log = structlog.get_logger("tradingd.desk")

NS = 1_000_000_000


def limits_from_config(risk: RiskConfig) -> Limits:
    default = SymbolLimits(risk.max_order_qty, risk.max_order_notional, risk.max_position, risk.collar_pct)
    per_symbol = {
        symbol: SymbolLimits(
            o.max_order_qty or default.max_order_qty,
            o.max_order_notional or default.max_order_notional,
            o.max_position or default.max_position,
            o.collar_pct or default.collar_pct,
        )
        for symbol, o in risk.symbols.items()
    }
    return Limits(
        default=default,
        per_symbol=per_symbol,
        max_gross_exposure=risk.max_gross_exposure,
        max_signal_age_ns=int(risk.max_signal_age_s * NS),
        max_price_age_ns=int(risk.max_price_age_s * NS),
        throttle_orders=risk.throttle_orders,
        throttle_window_ns=risk.throttle_window_ms * 1_000_000,
        duplicate_window_ns=risk.duplicate_window_ms * 1_000_000,
        review_notional=risk.review_threshold,
    )


def _sign(side: wire.Side) -> int:
    return 1 if side is wire.Side.BUY else -1


class OrderDesk:
    def __init__(self, config: Config, windows: FeatureWindows, clock: Clock, journal: Journal, stats: Stats) -> None:
        self.config = config
        self.windows = windows
        self.symbols = windows.symbols
        self.clock = clock
        self.journal = journal
        self.stats = stats
        self.policy = SignalPolicy(config.signal)
        self.limits = limits_from_config(config.risk)
        halt = config.risk.halt
        self.halts = HaltBook(
            HaltRule(
                halt.move_pct, halt.benchmark, halt.market_share, int(halt.cooloff_s * NS) if halt.cooloff_s else None
            ),
            self.symbols,
        )
        self.reviews = ReviewQueue()
        self.book = OrderBook()
        self.kill = False
        self.gateway: Gateway | None = None
        self.reconciled = False
        self.session = 1
        self._order_seq = 0
        self._id_prefix = ""
        self._recent_sends: deque[int] = deque()
        self._last_same: dict[tuple[str, str, int, float], int] = {}
        self._feed_now = 0
        self._gross = 0.0
        self._outbox: list[tuple[Order, dict[str, Any]]] = []
        self.halt_log: list[HaltEvent] = []
        self.engine_active: str | None = None  # the journal's word on which engine was serving

    # -- start-up -------------------------------------------------------------------------

    def restore(self, records: Iterable[dict[str, Any]]) -> None:
        """Rebuild orders, positions, parked orders, halts and the kill switch from the journal."""
        book = self.book
        for r in records:
            kind, oid = r.get("kind"), r.get("id")
            order = book.orders.get(oid) if isinstance(oid, str) else None
            match kind:
                case "start":
                    self.session = max(self.session, int(r["session"]) + 1)
                case "intent":
                    book.add(Order(r["id"], r["symbol"], wire.Side(r["side"]), r["qty"], r["price"], r["ts_event"], 0))
                case "denied" | "abandoned" if order is not None and order.state is not OrderState.SENT:
                    book.deny(order)
                case "abandoned" if order is not None:
                    book.apply(self._report(order, wire.ExecStatus.REJECTED, 0, 0.0, r.get("detail", "")))
                case "parked" if order is not None:
                    order.move(OrderState.PARKED)
                    self.reviews.park(self._parked(order, r["ts"], r["expires_at"]))
                case "review" if order is not None:
                    if order.cl_ord_id in self.reviews:
                        self.reviews.take(order.cl_ord_id)
                    if r["action"] != "approved":
                        book.deny(order)
                case "send" if order is not None:
                    book.mark_sent(order, 0)
                    self._remember_send(order, r["ts"])
                case "report" if order is not None:
                    book.apply(
                        self._report(
                            order, wire.ExecStatus(r["status"]), r["last_qty"], r["last_px"], r.get("text", "")
                        )
                    )
                case "halt" | "reduce" | "lift" | "reference":
                    self.halts.restore(HaltEvent(kind, r.get("symbol"), r["ts_event"], r["reason"], r.get("close")))
                case "kill":
                    self.kill = bool(r["on"])
                case "failover":
                    self.engine_active = str(r["to"])
                case "reconcile" if "positions" in r:
                    # The broker's positions, as adopted then; later fills move them on.
                    book.positions = dict(r["positions"])

    def begin_session(self) -> None:
        wall = self.clock.wall_ns()
        self._id_prefix = f"{wall // NS:x}{self.session}"
        self.journal.append("start", wall, session=self.session)
        for order in self.book.orders.values():
            if order.state is OrderState.INTENT:
                # The process stopped between journaling the intent and deciding on it: the
                # decision is closed as abandoned, never taken late.
                self.journal.append("abandoned", wall, id=order.cl_ord_id, detail="stopped before the decision")
                self.book.deny(order)
                log.warning("intent_abandoned", id=order.cl_ord_id, detail="stopped before the decision")
        self.journal.sync()

    def sent_order(self, cl_ord_id: str) -> wire.NewOrder | None:
        """An order as it was sent, from the book (which the journal rebuilt); None if unknown."""
        order = self.book.orders.get(cl_ord_id)
        if order is None:
            return None
        return wire.NewOrder(order.cl_ord_id, order.symbol, order.side, order.qty, order.price, order.ts_send)

    def status_request(self) -> wire.StatusRequest:
        """Ask the broker about every order sent and not yet final: the book's working orders."""
        return wire.StatusRequest(cl_ord_ids=list(self.book.working), ts=self.clock.wall_ns())

    def reconcile(self, status: wire.Status) -> list[str]:
        """Bring orders and positions in line with the broker's word; returns the differences."""
        differences: list[str] = []
        wall = self.clock.wall_ns()
        for s in status.orders:
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
            if missing > 0 or moved:
                self._apply_report(self._report(order, s.status, max(missing, 0), s.avg_px, "reconciled"), wall)
                differences.append(f"{s.cl_ord_id}: {s.status} at the broker, {max(missing, 0)} filled while away")
        for cl_ord_id in status.unknown:
            order = self.book.orders.get(cl_ord_id)
            if order is None or order.state in FINAL:
                continue
            # Journaled as sent, but the broker never received it: the process died in between.
            # The signal is stale now; it is closed, never resent blindly.
            self.journal.append("abandoned", wall, id=cl_ord_id, detail="never reached the broker")
            self.book.apply(self._report(order, wire.ExecStatus.REJECTED, 0, 0.0, "never reached the broker"))
            differences.append(f"{cl_ord_id}: never reached the broker; closed, not resent")
        broker_positions = status.positions if status.positions is not None else self.book.positions
        for symbol in sorted(set(broker_positions) | set(self.book.positions)):
            ours, theirs = self.book.positions.get(symbol, 0), broker_positions.get(symbol, 0)
            if ours != theirs:
                differences.append(f"position {symbol}: journal {ours}, broker {theirs}; taking the broker's")
                self.book.positions[symbol] = theirs
        self.journal.append("reconcile", wall, differences=differences, positions=dict(self.book.positions))
        self.journal.sync()
        self.stats.reconcile_differences += len(differences)
        for d in differences:
            log.error("reconcile_difference", detail=d)
        log.info("reconciled", orders_checked=len(status.orders) + len(status.unknown), differences=len(differences))
        self.reconciled = True
        return differences

    # -- market data ----------------------------------------------------------------------

    def on_bar(self, symbol: str, ts: int, open_: float, close: float, prev_close: float | None) -> None:
        self._feed_now = max(self._feed_now, ts)
        events = self.halts.on_bar(symbol, ts, open_, close, prev_close)
        if events:
            for event in events:
                self._record_halt(event, uid=None)

    def _record_halt(self, event: HaltEvent, uid: int | None) -> None:
        if event.action == "reference":
            self.journal.append(
                "reference",
                self.clock.wall_ns(),
                symbol=event.symbol,
                reason=event.reason,
                ts_event=event.ts,
                close=event.close,
            )
            return
        self.journal.append(
            event.action,
            self.clock.wall_ns(),
            symbol=event.symbol,
            reason=event.reason,
            ts_event=event.ts,
            close=event.close,
            reference=event.reference,
            uid=uid,
        )
        self.journal.sync()
        self.halt_log.append(event)
        if event.action == "halt":
            self.stats.halts += 1
        log.warning(
            {"halt": "halt", "reduce": "reducing_only"}.get(event.action, "halt_lifted"),
            symbol=event.symbol or "(market)",
            reason=event.reason,
            ts_event=event.ts,
        )
        if event.action == "halt" and self.config.risk.halt.cancel_open_orders:
            self.cancel_working(event.symbol)

    def cancel_working(self, symbol: str | None) -> int:
        """Ask the broker to cancel every working order (of ``symbol``, or all); cancels are never gated."""
        gateway = self.gateway
        n = 0
        for order in list(self.book.working.values()):
            if symbol is not None and order.symbol != symbol:
                continue
            wall = self.clock.wall_ns()
            self.journal.append("cancel", wall, id=order.cl_ord_id)
            if gateway is not None and gateway.send(
                wire.Cancel(f"{order.cl_ord_id}-C", order.cl_ord_id, order.symbol, wall)
            ):
                n += 1
        self.stats.cancels_sent += n
        return n

    # -- signals to orders ----------------------------------------------------------------

    def risk_now(self) -> int:
        return self._feed_now if self.config.risk.clock == "feed" else self.clock.wall_ns()

    def _gross_exposure(self) -> float:
        index, closes = self.windows.index, self.windows.last_close
        symbols = set(self.book.positions) | set(self.book.open_qty)
        return sum(abs(self.book.exposure(s)) * closes[index[s]] for s in symbols if s in index)

    def on_signals(self, batch: Batch, rows: Iterable[int], cls: list[int], conf: list[float]) -> None:
        started = self.clock.mono_ns()
        self._gross = self._gross_exposure()
        for row in rows:
            self._signal(batch, row, cls[row], conf[row])
        decided = self.clock.mono_ns()
        self.stats.gates.record(decided - started)
        self._commit()
        self.stats.send.record(self.clock.mono_ns() - decided)

    def _signal(self, batch: Batch, row: int, cls: int, confidence: float) -> None:
        s = self.stats
        i = int(batch.symbols[row])
        symbol = self.symbols[i]
        exposure = self.book.exposure(symbol)
        intent = self.policy.intent(cls, confidence, batch.close[row], exposure)
        if intent is None:
            return
        s.intents += 1
        self._order_seq += 1
        order = Order(
            f"{self._id_prefix}-{self._order_seq}",
            symbol,
            intent.side,
            intent.qty,
            intent.price,
            batch.ts_event[row],
            batch.ts_recv[row],
        )
        fields = {
            "id": order.cl_ord_id,
            "symbol": symbol,
            "side": str(intent.side),
            "qty": intent.qty,
            "price": intent.price,
            "signal": CLASS_NAMES[cls],
            "confidence": round(confidence, 4),
        }
        self.journal.append("intent", self.clock.wall_ns(), ts_event=order.ts_event, **fields)
        self.book.add(order)
        self._decide(order, fields, self.risk_now(), order.ts_event)

    def _view(self, order: Order, now: int) -> RiskView:
        i = self.windows.index[order.symbol]
        wall = self.clock.wall_ns()
        window_start = wall - self.limits.throttle_window_ns
        recent = self._recent_sends
        while recent and recent[0] <= window_start:
            recent.popleft()
        return RiskView(
            now_ns=now,
            wall_ns=wall,
            kill=self.kill,
            market=self.halts.market,
            symbol_state=self.halts.state[order.symbol],
            ref_price=self.windows.last_close[i] or None,
            ref_price_ts=self.windows.last_ts[i] if self.windows.count[i] else None,
            position=self.book.exposure(order.symbol),
            gross_exposure=self._gross,
            recent_order_ts=tuple(recent),
            last_same_order_ts=self._last_same.get((order.symbol, order.side, order.qty, order.price)),
        )

    def _decide(self, order: Order, fields: dict[str, Any], now: int, ts_event: int, review: bool = True) -> None:
        """Gates 1-6, then review (gate 7), then the broker."""
        s = self.stats
        check = OrderCheck(order.symbol, _sign(order.side), order.qty, order.price, ts_event)
        view = self._view(order, now)
        denial = check_order(check, self.limits, view)
        reason, detail = (str(denial.reason), denial.detail) if denial else (None, "")
        gateway = self.gateway
        if reason is None and review and self.reviews.has_symbol(order.symbol):
            reason, detail = "review_pending", f"{order.symbol} already has an order waiting for review"
        if reason is None and (gateway is None or not gateway.connected or not self.reconciled):
            reason, detail = "broker_disconnected", "no reconciled connection to the broker gateway"
        wall = self.clock.wall_ns()
        if reason is not None:
            s.orders_denied[reason] += 1
            self.journal.append("denied", wall, id=order.cl_ord_id, reason=reason, detail=detail)
            self.book.deny(order)
            log.info("order_denied", reason=reason, detail=detail, **fields)
            return
        if review and needs_review(check, self.limits, view):
            expires = wall + int(self.config.risk.review_ttl_s * NS)
            self.journal.append("parked", wall, id=order.cl_ord_id, expires_at=expires, notional=check.notional)
            order.move(OrderState.PARKED)
            self.reviews.park(self._parked(order, wall, expires))
            s.reviews_parked += 1
            log.warning("order_parked", notional=round(check.notional, 2), **fields)
            return
        self.journal.append("send", wall, id=order.cl_ord_id)
        self._remember_send(order, wall)
        self._gross += (abs(view.position + check.side * check.qty) - abs(view.position)) * (
            view.ref_price or order.price
        )
        self._outbox.append((order, fields))

    def _commit(self) -> None:
        """Group commit: the batch's records reach the journal file (and the disk, per the fsync
        policy) before any of its orders leaves, so a crash can lose an order's send but never
        send an order the journal does not know."""
        self.journal.sync()
        if not self._outbox:
            return
        gateway = self.gateway
        assert gateway is not None
        s = self.stats
        latencies: list[int | None] = []
        for order, _ in self._outbox:
            gateway.send(
                wire.NewOrder(order.cl_ord_id, order.symbol, order.side, order.qty, order.price, self.clock.wall_ns())
            )
            ts_send = self.clock.mono_ns()
            self.book.mark_sent(order, ts_send)
            s.orders_sent += 1
            latency = ts_send - order.ts_recv if order.ts_recv else None
            if latency is not None:
                s.tick_to_order.record(latency)
            latencies.append(latency)
        # Logged after the whole batch is on the wire: a log line never delays the next order.
        for (_, fields), latency in zip(self._outbox, latencies, strict=True):
            log.info("order_sent", tick_to_order_us=latency // 1000 if latency is not None else None, **fields)
        self._outbox.clear()

    def _remember_send(self, order: Order, wall: int) -> None:
        self._recent_sends.append(wall)
        last_same = self._last_same
        last_same[(order.symbol, order.side, order.qty, order.price)] = wall
        if len(last_same) > 4 * len(self.symbols) + 1024:
            # Only sends inside the duplicate window matter; forget the rest.
            horizon = wall - self.limits.duplicate_window_ns
            self._last_same = {k: ts for k, ts in last_same.items() if ts > horizon}

    @staticmethod
    def _parked(order: Order, wall: int, expires: int) -> Parked:
        return Parked(
            order.cl_ord_id, order.symbol, _sign(order.side), order.qty, order.price, order.ts_event, wall, expires
        )

    # -- broker ---------------------------------------------------------------------------

    @staticmethod
    def _report(order: Order, status: wire.ExecStatus, last_qty: int, last_px: float, text: str) -> wire.ExecReport:
        cum = order.filled_qty + last_qty
        return wire.ExecReport(
            order.cl_ord_id, "", status, order.symbol, order.side, last_qty, last_px, cum, order.qty - cum, 0, text
        )

    def on_report(self, report: wire.ExecReport) -> None:
        self._apply_report(report, self.clock.wall_ns())

    def _apply_report(self, report: wire.ExecReport, wall: int) -> None:
        s = self.stats
        known = self.book.orders.get(report.cl_ord_id)
        was_sent = known is not None and known.state is OrderState.SENT
        problem = self.book.apply(report)
        if problem is not None:
            s.reports_ignored[problem] += 1
            log.warning("exec_report_ignored", id=report.cl_ord_id, status=str(report.status), problem=problem)
            return
        self.journal.append(
            "report",
            wall,
            id=report.cl_ord_id,
            exec_id=report.exec_id,
            status=str(report.status),
            last_qty=report.last_qty,
            last_px=report.last_px,
            text=report.text,
        )
        if report.last_qty:
            s.fills += 1
            log.info(
                "fill",
                id=report.cl_ord_id,
                symbol=report.symbol,
                qty=report.last_qty,
                px=report.last_px,
                position=self.book.positions.get(report.symbol, 0),
            )
        state = self.book.orders[report.cl_ord_id].state
        if was_sent and state is not OrderState.REJECTED:
            s.orders_acked += 1  # the broker's first word on the order, and not a refusal
        if state is OrderState.FILLED:
            s.orders_filled += 1
        elif state is OrderState.REJECTED:
            s.orders_rejected += 1
            log.warning("order_rejected", id=report.cl_ord_id, reason=report.text)
        elif state is OrderState.CANCELED:
            s.orders_canceled += 1

    def on_broker_event(self, kind: str, detail: str) -> None:
        if kind == "connected":
            self.stats.broker_connects += 1
            # Every (re)connection is reconciled before orders flow again.
            self.reconciled = False
            if self.gateway is not None:
                self.gateway.send(self.status_request())
        elif kind == "disconnected":
            self.stats.broker_disconnects += 1
            self.reconciled = False
        log.info("broker_" + kind, detail=detail)

    # -- engines --------------------------------------------------------------------------

    def record_failover(self, event: FailoverEvent, rows: int = 0, uid: int | None = None) -> None:
        """Journal, count and log an engine switch (automatic or by an operator)."""
        fields = {
            "from": event.from_engine,
            "to": event.to_engine,
            "reason": str(event.reason),
            "detail": event.detail,
            "rerun": event.rerun,
            "rows": rows,
            "uid": uid,
        }
        self.journal.append("failover", self.clock.wall_ns(), **fields)
        self.journal.sync()
        self.engine_active = event.to_engine
        self.stats.failovers[str(event.reason)] += 1
        if event.rerun:
            self.stats.rerun_batches += 1
        log.error("engine_failover", **fields)

    # -- operators ------------------------------------------------------------------------

    def operator(self, uid: int, command: str, **args: Any) -> None:
        self.journal.append("operator", self.clock.wall_ns(), uid=uid, command=command, **args)

    def halt(self, symbol: str | None, uid: int, reducing: bool = False) -> bool:
        """Halt (or, with ``reducing``, allow only position-shrinking orders for) a symbol or the market."""
        ts, reason = self._feed_now or self.clock.wall_ns(), f"operator uid {uid}"
        event = self.halts.reduce(symbol, ts, reason) if reducing else self.halts.halt(symbol, ts, reason)
        if event is not None:
            self._record_halt(event, uid)
        return event is not None

    def resume(self, symbol: str | None, uid: int) -> bool:
        event = self.halts.resume(symbol, self._feed_now or self.clock.wall_ns(), f"operator uid {uid}")
        if event is not None:
            self._record_halt(event, uid)
        lifted_kill = symbol is None and self.kill
        if lifted_kill:
            self.kill = False
            self.journal.append("kill", self.clock.wall_ns(), on=False, uid=uid)
            self.journal.sync()
            log.warning("kill_switch_off", uid=uid)
        return event is not None or lifted_kill

    def kill_switch(self, uid: int) -> int:
        """Halt everything and cancel every working order; returns how many cancels were sent."""
        self.kill = True
        self.journal.append("kill", self.clock.wall_ns(), on=True, uid=uid)
        self.stats.kills += 1
        log.error("kill_switch_on", uid=uid)
        self.halt(None, uid)
        cancels = self.cancel_working(None)
        self.journal.sync()
        return cancels

    def approve(self, order_id: str, uid: int) -> str:
        """Take a parked order out of review and run gates 1-6 at the current price; returns its state."""
        parked = self.reviews.take(order_id)
        order = self.book.orders[parked.id]
        wall = self.clock.wall_ns()
        self.journal.append("review", wall, id=order_id, action="approved", uid=uid)
        self.stats.reviews_approved += 1
        log.warning("review_approved", id=order_id, uid=uid)
        order.ts_recv = 0  # an approved order's latency is the operator's, not the daemon's
        i = self.windows.index[order.symbol]
        fields = {
            "id": order.cl_ord_id,
            "symbol": order.symbol,
            "side": str(order.side),
            "qty": order.qty,
            "price": order.price,
        }
        self._gross = self._gross_exposure()
        self._decide(order, fields, self.risk_now(), self.windows.last_ts[i], review=False)
        self._commit()
        return str(order.state)

    def reject(self, order_id: str, uid: int, reason: str) -> None:
        parked = self.reviews.take(order_id)
        self.journal.append("review", self.clock.wall_ns(), id=order_id, action="rejected", uid=uid, reason=reason)
        self.journal.sync()
        self.book.deny(self.book.orders[parked.id])
        self.stats.reviews_rejected += 1
        log.warning("review_rejected", id=order_id, uid=uid, reason=reason)

    def expire_reviews(self) -> int:
        wall = self.clock.wall_ns()
        gone = self.reviews.expire(wall)
        for parked in gone:
            self.journal.append("review", wall, id=parked.id, action="expired")
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
