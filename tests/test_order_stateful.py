"""A Hypothesis stateful test of the order desk (risk engine + order manager) against a model
broker: random signals, partial fills, duplicated, reordered and contradictory execution reports,
cancels, the kill switch, broker drops and reconnects, and daemon restarts that lose whatever the
journal had not yet written. The same invariants hold after every step:

- no client order id reaches the broker twice, and no cancel id either;
- the daemon never believes more filled than the broker filled, order by order;
- its positions are exactly the fills it has been truthfully told of (delivered reports or the
  broker's word at a reconciliation): repeats, reorders and contradictions move nothing;
- with the kill switch on, no new order reaches the broker;
- once every report is delivered and the connection reconciled, positions equal the broker's and
  no order the broker has finished is still working at the daemon.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker import protocol as wire
from broker.bulk import FrameEncoder, NewOrders
from broker.journal import Journal, recover_journal
from broker.orders import FINAL
from daemon.batcher import Batch
from daemon.clock import FakeClock
from daemon.config import Config, HaltConfig, RiskConfig, SignalConfig, UniverseConfig
from daemon.desk import BATCH_GATES_FROM, OrderDesk
from daemon.stats import Stats
from daemon.windows import FeatureWindows
from engines.chooser import DEFAULT_MODEL
from engines.manifest import load_manifest

SYMBOLS = ("AAA", "BBB", "CCC")
NS_PER_MIN = 60_000_000_000
MANIFEST = load_manifest(DEFAULT_MODEL)
CONFIG = Config(
    universe=UniverseConfig(symbols=SYMBOLS),
    signal=SignalConfig(confidence_threshold=0.0, notional_per_signal=5_000.0),
    risk=RiskConfig(
        clock="feed",
        duplicate_window_ms=0,
        throttle_orders=10_000,
        review_threshold=1e12,
        max_gross_exposure=1e12,
        halt=HaltConfig(move_pct=90.0, cancel_open_orders=False),
    ),
)


@dataclass
class _BrokerOrder:
    order: wire.NewOrder
    cum: int = 0
    status: wire.ExecStatus = wire.ExecStatus.NEW


@dataclass
class ModelBroker:
    """The truth: what the broker received, filled and finished; reports wait in a queue."""

    connected: bool = True
    orders: dict[str, _BrokerOrder] = field(default_factory=dict)
    received: Counter[str] = field(default_factory=Counter)
    cancel_ids: Counter[str] = field(default_factory=Counter)
    positions: Counter[str] = field(default_factory=Counter)
    pending: list[wire.ExecReport] = field(default_factory=list)
    delivered: list[wire.ExecReport] = field(default_factory=list)
    exec_seq: int = 0

    def report(self, o: _BrokerOrder, last: int, text: str = "") -> wire.ExecReport:
        self.exec_seq += 1
        leaves = 0 if o.status in (wire.ExecStatus.CANCELED, wire.ExecStatus.REJECTED) else o.order.qty - o.cum
        r = wire.ExecReport(
            o.order.cl_ord_id, f"E{self.exec_seq}", o.status, o.order.symbol, o.order.side, last,
            o.order.price, o.cum, leaves, 0, text,
        )  # fmt: skip
        self.pending.append(r)
        return r

    def fill(self, cl_ord_id: str, qty: int) -> None:
        o = self.orders[cl_ord_id]
        if o.status not in (wire.ExecStatus.NEW, wire.ExecStatus.PARTIALLY_FILLED):
            return
        qty = max(1, min(qty, o.order.qty - o.cum))
        o.cum += qty
        o.status = wire.ExecStatus.FILLED if o.cum == o.order.qty else wire.ExecStatus.PARTIALLY_FILLED
        self.positions[o.order.symbol] += qty if o.order.side is wire.Side.BUY else -qty
        self.report(o, qty)

    def status(self, ids: list[str]) -> wire.Status:
        known = [
            wire.OrderStatus(
                i, o.order.symbol, o.order.side, o.order.qty, o.order.price, o.status, o.cum, o.order.price
            )
            for i in ids
            if (o := self.orders.get(i)) is not None
        ]
        unknown = [i for i in ids if i not in self.orders]
        return wire.Status(orders=known, unknown=unknown, positions=dict(self.positions), ts=0)


class ModelGateway:
    """The daemon's side of the model broker's connection (the fake of the gateway boundary)."""

    def __init__(self, broker: ModelBroker) -> None:
        self.broker = broker
        self.status_requests: list[wire.StatusRequest] = []

    @property
    def connected(self) -> bool:
        return self.broker.connected

    def cork(self) -> None:
        pass

    def uncork(self) -> None:
        pass

    def send(self, message: wire.NewOrder | wire.Cancel | wire.StatusRequest) -> bool:
        b = self.broker
        if not b.connected:
            return False
        match message:
            case wire.NewOrder():
                b.received[message.cl_ord_id] += 1
                if message.cl_ord_id not in b.orders:
                    o = b.orders[message.cl_ord_id] = _BrokerOrder(message)
                    b.report(o, 0)
            case wire.Cancel():
                b.cancel_ids[message.cl_ord_id] += 1
                o = b.orders.get(message.orig_cl_ord_id)
                if o is not None and o.status in (wire.ExecStatus.NEW, wire.ExecStatus.PARTIALLY_FILLED):
                    o.status = wire.ExecStatus.CANCELED
                    b.report(o, 0, "canceled")
            case wire.StatusRequest():
                self.status_requests.append(message)
        return True

    def send_new_orders(self, orders: NewOrders) -> bool:
        """A batch's block: its frames as the native gateway writes them, all or none."""
        if not self.broker.connected:
            return False
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(FrameEncoder(orders.universe).encode(orders))
        for frame in unpacker:
            message = wire.decode(frame)
            assert isinstance(message, wire.NewOrder)
            self.send(message)
        return True

    async def run(self) -> None:
        return None

    def stop(self) -> None:
        return None


class OrderDeskMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tradingd-stateful-"))
        self.clock = FakeClock()
        self.broker = ModelBroker()
        self.gateway = ModelGateway(self.broker)
        self.minute = 0
        self.prices = dict.fromkeys(SYMBOLS, 100.0)
        self.heard: dict[str, int] = {}  # order -> the largest cum_qty truthfully told to the daemon
        self.kill_sent_mark: int | None = None
        self.desk = self._start(records=[])
        self._connect()

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the daemon's life ----------------------------------------------------------------

    def _start(self, records: list[object]) -> OrderDesk:
        self.windows = FeatureWindows(SYMBOLS, MANIFEST.window, MANIFEST.features)
        self.journal = Journal(self.dir / "journal.msgpack", "none")
        desk = OrderDesk(CONFIG, self.windows, self.clock, self.journal, Stats())
        desk.restore(records)  # type: ignore[arg-type]
        desk.begin_session()
        desk.gateway = self.gateway
        return desk

    def _connect(self) -> None:
        self.broker.connected = True
        self.desk.on_broker_event("connected", "model")
        request = self.gateway.status_requests[-1]
        status = self.broker.status(request.cl_ord_ids)
        assert self.desk.on_status(status)
        self.stale_status = status
        # The broker's word is now the daemon's: every order it asked about, and positions.
        for s in status.orders:
            self.heard[s.cl_ord_id] = s.cum_qty
        self._positions_adopted = True

    # -- market and signals ---------------------------------------------------------------

    @initialize(buy=st.booleans())
    def an_order_is_working(self, buy: bool) -> None:
        self.next_minute([0.0, 0.0, 0.0])
        self.signal(0, buy)
        self.deliver_next()

    @rule(moves=st.lists(st.floats(-0.01, 0.01), min_size=3, max_size=3))
    def next_minute(self, moves: list[float]) -> None:
        self.minute += 1
        self.clock.advance(NS_PER_MIN)
        ts = 1_700_000_040_000_000_000 + self.minute * NS_PER_MIN
        for i, (symbol, move) in enumerate(zip(SYMBOLS, moves, strict=True)):
            price = round(self.prices[symbol] * (1.0 + move), 2)
            self.prices[symbol] = price
            self.windows.push(i, ts, price, price * 1.001, price * 0.999, price, 1000.0, None)
            self.desk.on_bar(symbol, ts, price, price, None)

    @precondition(lambda self: self.minute > 0)
    @rule(symbol=st.integers(0, 2), buy=st.booleans())
    def signal(self, symbol: int, buy: bool) -> None:
        ts = 1_700_000_040_000_000_000 + self.minute * NS_PER_MIN
        batch = Batch(np.array([symbol], dtype=np.int64), [0], [ts], [self.prices[SYMBOLS[symbol]]])
        before = sum(self.broker.received.values())
        self.desk.on_signals(batch, [0], [2 if buy else 0], [0.9])
        if self.desk.kill:
            assert sum(self.broker.received.values()) == before, "an order left with the kill switch on"

    @precondition(lambda self: self.minute > 0)
    @rule(buys=st.lists(st.booleans(), min_size=3, max_size=3))
    def signals_at_once(self, buys: list[bool]) -> None:
        """A batch of every symbol through the batch gates: what passes goes as one block
        (one journal record, one write, booked when the book is next read)."""
        ts = 1_700_000_040_000_000_000 + self.minute * NS_PER_MIN
        closes = [self.prices[s] for s in SYMBOLS]
        batch = Batch(np.arange(3, dtype=np.int64), [0, 0, 0], [ts] * 3, closes)
        before = sum(self.broker.received.values())
        self.desk.batch_gates_from = 1
        try:
            self.desk.on_signals(batch, [0, 1, 2], [2 if b else 0 for b in buys], [0.9] * 3)
        finally:
            self.desk.batch_gates_from = BATCH_GATES_FROM
        if self.desk.kill:
            assert sum(self.broker.received.values()) == before, "an order left with the kill switch on"

    # -- the broker -----------------------------------------------------------------------

    @precondition(lambda self: any(o.status in ("new", "partially_filled") for o in self.broker.orders.values()))
    @rule(pick=st.integers(0, 10_000), qty=st.integers(1, 30))
    def broker_fills(self, pick: int, qty: int) -> None:
        live = [i for i, o in self.broker.orders.items() if o.status in ("new", "partially_filled")]
        self.broker.fill(live[pick % len(live)], qty)

    def _deliver(self, report: wire.ExecReport) -> None:
        self.broker.delivered.append(report)
        self.desk.on_report(report)
        if report.cum_qty >= self.heard.get(report.cl_ord_id, 0):
            self.heard[report.cl_ord_id] = report.cum_qty

    @precondition(lambda self: self.broker.connected and self.broker.pending)
    @rule()
    def deliver_next(self) -> None:
        self._deliver(self.broker.pending.pop(0))

    @precondition(lambda self: self.broker.connected and len(self.broker.pending) >= 2)
    @rule()
    def deliver_out_of_order(self) -> None:
        self._deliver(self.broker.pending.pop(1))

    @precondition(lambda self: self.broker.connected and self.broker.delivered)
    @rule(pick=st.integers(0, 10_000))
    def repeat_a_report(self, pick: int) -> None:
        delivered = self.broker.delivered
        report = delivered[-1 - pick % min(3, len(delivered))]  # a recent one: its order is likely live
        self.desk.on_report(report)  # same ExecID: nothing may move

    @precondition(lambda self: self.broker.connected and self.broker.orders)
    @rule(
        pick=st.integers(0, 10_000),
        kind=st.sampled_from(["overfill", "backwards", "negative", "other_symbol", "unknown"]),
    )
    def contradictory_report(self, pick: int, kind: str) -> None:
        ids = list(self.broker.orders)
        o = self.broker.orders[ids[pick % len(ids)]].order
        status, last, cum, symbol, cl = wire.ExecStatus.PARTIALLY_FILLED, 1, 1, o.symbol, o.cl_ord_id
        match kind:
            case "overfill":
                status, last, cum = wire.ExecStatus.FILLED, o.qty + 1, o.qty + 1
            case "backwards":
                cum = -1
            case "negative":
                last = -3
            case "other_symbol":
                symbol = o.symbol + "X"
            case _:
                cl = "nobody"
        self.desk.on_report(wire.ExecReport(cl, f"G{pick}", status, symbol, o.side, last, o.price, cum, 0, 0))

    @precondition(lambda self: self.broker.connected and self.minute % 3 == 1)
    @rule()
    def broker_drops(self) -> None:
        self.broker.connected = False
        self.broker.pending.clear()  # what was in flight is lost with the connection
        self.desk.on_broker_event("disconnected", "model")

    @precondition(lambda self: not self.broker.connected)
    @rule()
    def broker_reconnects(self) -> None:
        self._connect()

    # -- operators and restarts -----------------------------------------------------------

    @precondition(lambda self: self.minute % 4 == 3)  # now and then: most steps trade
    @rule()
    def kill_switch(self) -> None:
        working = [o for o in self.desk.book.working.values() if not o.cancel_pending]
        cancels_before = sum(self.broker.cancel_ids.values())
        sent = self.desk.kill_switch(uid=0)
        if self.broker.connected:
            assert sent == len(working)
        assert sum(self.broker.cancel_ids.values()) == cancels_before + sent

    @precondition(lambda self: self.desk.kill)
    @rule()
    def operator_resumes(self) -> None:
        self.desk.resume(None, uid=0)

    @precondition(lambda self: self.minute % 3 == 2)
    @rule(clean=st.booleans())
    def daemon_restarts(self, clean: bool) -> None:
        """A restart; unclean, the records not yet written (since the last sync) are lost."""
        if clean:
            self.journal.close()
        else:
            os.close(self.journal._fd)
        records, _ = recover_journal(self.dir / "journal.msgpack")
        self.broker.pending.clear()
        self.desk = self._start(list(records))
        self.broker.connected = True
        self._connect()

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def nothing_twice_at_the_broker(self) -> None:
        assert all(n == 1 for n in self.broker.received.values())
        assert all(n == 1 for n in self.broker.cancel_ids.values())

    @invariant()
    def never_more_filled_than_the_broker_filled(self) -> None:
        for cl, order in self.desk.book.orders.items():
            truth = self.broker.orders.get(cl)
            assert order.filled_qty <= (truth.cum if truth else 0), cl
            assert order.filled_qty <= order.qty

    @invariant()
    def positions_are_the_fills_the_daemon_was_truthfully_told(self) -> None:
        told: Counter[str] = Counter()
        for cl, cum in self.heard.items():
            o = self.broker.orders[cl].order if cl in self.broker.orders else None
            if o is not None:
                told[o.symbol] += cum if o.side is wire.Side.BUY else -cum
        ours = {s: q for s, q in self.desk.book.positions.items() if q}
        assert ours == {s: q for s, q in told.items() if q}

    @invariant()
    def the_exposure_array_is_positions_plus_working(self) -> None:
        totals = self.desk.book.exposure_totals
        assert totals is not None
        assert totals.tolist() == [self.desk.book.exposure(s) for s in SYMBOLS]

    @invariant()
    def settled_means_equal_to_the_broker(self) -> None:
        if self.broker.pending or not self.broker.connected:
            return
        assert {s: q for s, q in self.desk.book.positions.items() if q} == {
            s: q for s, q in self.broker.positions.items() if q
        }
        for cl in self.desk.book.working:
            truth = self.broker.orders.get(cl)
            assert truth is not None and truth.status in ("new", "partially_filled"), cl
        for cl, truth in self.broker.orders.items():
            order = self.desk.book.orders.get(cl)
            if truth.status not in ("new", "partially_filled") and order is not None:
                assert order.state in FINAL, (cl, truth.status, order.state)


OrderDeskMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
test_order_desk_against_a_model_broker = OrderDeskMachine.TestCase
