"""The order path under fault: repeated and contradictory execution reports, sends the gateway
cannot write, the kill switch, an engine set whose standby fails too, restored positions with no
price, and what another thread may read. Each test fails on the order path before issue 12."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from broker import protocol as wire
from broker import records as rec
from broker.journal import Journal, read_journal, recover_journal
from broker.orders import FINAL, Order, OrderState
from broker.sim import SimConfig
from daemon.clock import FakeClock
from daemon.config import Config, RiskConfig, SignalConfig, UniverseConfig
from daemon.desk import HALT_LOG, OrderDesk
from daemon.engineset import EngineSet, RerunFailedError
from daemon.metrics import _histogram
from daemon.order_manager import OrderManager
from daemon.risk_engine import Gross, RiskEngine
from daemon.stats import LatencyRecorder, Stats
from daemon.windows import FeatureWindows
from engines.base import EngineHealth
from engines.manifest import load_manifest
from risk.failover import FailoverPolicy, FailoverReason
from tests.helpers import running_rig, wait_for
from tests.test_daemon_loopback import WINDOW, _send_minutes

SYMBOLS = ("AAA", "BBB", "CCC")


# -- a gateway whose far side is gone: the fake of the boundary -------------------------------


class DroppingGateway:
    """Says it is connected, and writes the first ``writes`` messages only (a transport that
    closes under the daemon's feet); raises on write number ``raise_on`` if set."""

    def __init__(self, writes: int = 0, raise_on: int | None = None) -> None:
        self.writes = writes
        self.raise_on = raise_on
        self.written: list[wire.NewOrder | wire.Cancel | wire.StatusRequest] = []
        self.calls = 0

    @property
    def connected(self) -> bool:
        return True

    def cork(self) -> None:
        pass

    def uncork(self) -> None:
        pass

    def send(self, message: wire.NewOrder | wire.Cancel | wire.StatusRequest) -> bool:
        self.calls += 1
        if self.raise_on is not None and self.calls == self.raise_on:
            raise RuntimeError("transport broke mid-batch")
        if len(self.written) >= self.writes:
            return False
        self.written.append(message)
        return True

    async def run(self) -> None:
        return None

    def stop(self) -> None:
        return None


def _manager(tmp_path: Path, gateway: DroppingGateway) -> tuple[OrderManager, Journal]:
    journal = Journal(tmp_path / "j.msgpack", "none")
    manager = OrderManager(FakeClock(), journal, Stats())
    manager.gateway = gateway
    manager.reconciled = True
    manager.begin_session()
    return manager, journal


def _queue(manager: OrderManager, n: int) -> list[Order]:
    orders = []
    for _ in range(n):
        order = Order(manager.next_id(), "AAA", wire.Side.BUY, 10, 100.0, 1, 1)
        manager.intent(order, "buy", 0.9)
        manager.queue(order, {"id": order.cl_ord_id})
        orders.append(order)
    return orders


def test_commit_when_the_gateway_cannot_write_closes_the_order_as_never_sent(tmp_path: Path) -> None:
    manager, journal = _manager(tmp_path, DroppingGateway(writes=1))
    first, second = _queue(manager, 2)
    manager.commit()
    assert first.state is OrderState.SENT and second.state is OrderState.DENIED
    assert manager.stats.orders_sent == 1 and manager.stats.sends_failed == 1
    assert list(manager.book.working) == [first.cl_ord_id]
    journal.close()
    abandoned = [r for r in read_journal(tmp_path / "j.msgpack") if r["kind"] == "abandoned"]
    assert [r["id"] for r in abandoned] == [second.cl_ord_id]


def test_commit_when_a_write_raises_mid_batch_never_sends_the_batch_again(tmp_path: Path) -> None:
    gateway = DroppingGateway(writes=10, raise_on=2)
    manager, _ = _manager(tmp_path, gateway)
    _queue(manager, 3)
    with pytest.raises(RuntimeError):
        manager.commit()
    manager.commit()  # the next batch: nothing of the broken one is left to go out
    assert [m.cl_ord_id for m in gateway.written if isinstance(m, wire.NewOrder)] == [f"{manager._id_prefix}-1"]


def test_cancel_working_twice_sends_one_cancel_per_order_each_with_its_own_journaled_id(tmp_path: Path) -> None:
    gateway = DroppingGateway(writes=100)
    manager, journal = _manager(tmp_path, gateway)
    orders = _queue(manager, 3)
    manager.commit()
    assert manager.cancel_working(None) == 3
    assert manager.cancel_working(None) == 0  # a halt after the kill: nothing in flight twice
    cancels = [m for m in gateway.written if isinstance(m, wire.Cancel)]
    assert sorted(c.orig_cl_ord_id for c in cancels) == sorted(o.cl_ord_id for o in orders)
    assert len({c.cl_ord_id for c in cancels}) == 3
    journal.close()
    journaled = [r["cancel_id"] for r in read_journal(tmp_path / "j.msgpack") if r["kind"] == "cancel"]
    assert sorted(journaled) == sorted(c.cl_ord_id for c in cancels)


async def test_kill_switch_sends_exactly_one_cancel_per_working_order(tmp_path: Path) -> None:
    async with running_rig(
        tmp_path, SYMBOLS, SimConfig(rest=True), signal=SignalConfig(confidence_threshold=0.0)
    ) as rig:
        await _send_minutes(rig, SYMBOLS, range(WINDOW + 1))
        await wait_for(lambda: rig.daemon.runtime.idle_event.is_set() and rig.daemon.stats.orders_acked >= 1)
        desk = rig.daemon.runtime.desk
        working = sorted(desk.book.working)
        assert working
        assert desk.kill_switch(uid=0) == len(working)
        await wait_for(lambda: not desk.book.working, what="every working order cancelled")
        assert rig.broker is not None
        assert sorted(rig.broker._working[c].order.cl_ord_id for c in working) == working
        assert rig.broker.cancels == len(working)
        assert len(set(rig.broker.cancel_ids)) == len(working)
        assert desk.kill_switch(uid=0) == 0  # nothing left working: no cancel at all


@pytest.mark.parametrize(
    "hostile",
    [
        SimConfig(partial_fills=3, duplicate_rate=1.0),
        SimConfig(partial_fills=3, reorder_rate=1.0, seed=3),
        SimConfig(partial_fills=3, garble_rate=0.5, seed=5),
        SimConfig(partial_fills=4, duplicate_rate=0.3, reorder_rate=0.3, garble_rate=0.3, seed=11),
    ],
    ids=["repeats", "reorders", "garbles", "all"],
)
async def test_a_hostile_broker_never_moves_positions_away_from_the_fills_that_happened(
    tmp_path: Path, hostile: SimConfig
) -> None:
    async with running_rig(tmp_path, SYMBOLS, hostile, signal=SignalConfig(confidence_threshold=0.0)) as rig:
        await _send_minutes(rig, SYMBOLS, range(WINDOW + 6))
        broker, desk, stats = rig.broker, rig.daemon.runtime.desk, rig.daemon.stats
        assert broker is not None
        await wait_for(
            lambda: (
                stats.minute_ends == WINDOW + 6 and rig.daemon.runtime.idle_event.is_set() and not desk.book.working
            ),
            what="every order final",
        )
        assert broker.received and broker.hostile > 0
        truth = {s: q for s, q in broker.positions.items() if q}
        assert {s: q for s, q in desk.book.positions.items() if q} == truth
        assert all(desk.book.orders[o.cl_ord_id].state in FINAL for o in broker.received)
        if hostile.duplicate_rate:
            assert stats.reports_ignored["duplicate_exec_id"] > 0
        if hostile.garble_rate:
            assert sum(stats.reports_inconsistent.values()) > 0
            assert desk.status()["reducing"], "a symbol with a contradictory report trades reducing-only"
    records = list(read_journal(tmp_path / "journal.msgpack"))
    applied = [(r["id"], r["exec_id"]) for r in records if r["kind"] == "report"]
    assert len(applied) == len(set(applied)), "an execution applied twice"


def test_restore_when_a_duplicate_report_was_journaled_rebuilds_the_same_position(tmp_path: Path) -> None:
    """A journal replay applies reports by the same rules: a restart cannot double-count either."""
    gateway = DroppingGateway(writes=10)
    manager, journal = _manager(tmp_path, gateway)
    (order,) = _queue(manager, 1)
    manager.commit()
    fill = wire.ExecReport(
        order.cl_ord_id, "X1", wire.ExecStatus.PARTIALLY_FILLED, "AAA", order.side, 4, 100.0, 4, 6, 0
    )
    manager.on_report(fill)
    manager.on_report(fill)
    journal.close()
    records, _ = recover_journal(tmp_path / "j.msgpack")
    reports = [r for r in records if isinstance(r, rec.Report)]
    assert len(reports) == 1
    config = Config(universe=UniverseConfig(symbols=("AAA",)))
    manifest = load_manifest_for_tests()
    desk = OrderDesk(
        config,
        FeatureWindows(("AAA",), manifest.window, manifest.features),
        FakeClock(),
        Journal(tmp_path / "j2.msgpack", "none"),
        Stats(),
    )
    desk.restore(records + records[1:])  # even a journal read twice
    assert desk.book.positions == {"AAA": 4} and desk.book.orders[order.cl_ord_id].filled_qty == 4


def load_manifest_for_tests():  # type: ignore[no-untyped-def]
    from engines.chooser import DEFAULT_MODEL  # noqa: PLC0415

    return load_manifest(DEFAULT_MODEL)


# -- exposure after a restart -----------------------------------------------------------------


def _risk(tmp_path: Path) -> tuple[RiskEngine, OrderManager]:
    manifest = load_manifest_for_tests()
    config = Config(
        universe=UniverseConfig(symbols=SYMBOLS), risk=RiskConfig(clock="feed", max_gross_exposure=1_000_000.0)
    )
    windows = FeatureWindows(SYMBOLS, manifest.window, manifest.features)
    manager = OrderManager(FakeClock(), Journal(tmp_path / "j.msgpack", "none"), Stats())
    return RiskEngine(config, windows, FakeClock()), manager


def test_gross_when_a_restored_position_has_no_price_is_unknown_and_the_gate_fails_closed(tmp_path: Path) -> None:
    risk, manager = _risk(tmp_path)
    manager.book.positions["AAA"] = 50_000  # restored from the journal; no bar since the restart
    gross = risk.gross(manager.book)
    assert gross == Gross(float("inf"), "AAA")
    order = Order("X", "BBB", wire.Side.BUY, 10, 100.0, 0, 0)
    risk.windows.push(1, 60, 100.0, 100.0, 100.0, 100.0, 1.0, None)
    risk.feed_now = 60
    decision = risk.decide(order, 0, gross, ts_event=60, review=False)
    assert decision.reason == "max_gross_exposure" and "AAA" in decision.detail


def test_gross_when_a_restored_position_has_a_fill_price_values_it_there(tmp_path: Path) -> None:
    risk, manager = _risk(tmp_path)
    manager.book.positions["AAA"] = 50_000
    manager.book.last_fill_px["AAA"] = 30.0
    assert risk.gross(manager.book) == Gross(1_500_000.0)


# -- engines ----------------------------------------------------------------------------------


class _Raising:
    """An engine whose every inference raises (for the standby that fails too)."""

    backend = "onnxruntime"

    def __init__(self, name: str, on_infer: object = None) -> None:
        self.name = name
        self.buckets = (1, 8)
        self.manifest = load_manifest_for_tests()
        self._buf = np.zeros((8, self.manifest.window, len(self.manifest.features)), dtype=np.float32)
        self.on_infer = on_infer

    def bucket_for(self, n: int) -> int:
        return 1 if n <= 1 else 8

    def input_buffer(self, bucket: int) -> npt.NDArray[np.float32]:
        return self._buf[:bucket]

    def infer(self, bucket: int) -> npt.NDArray[np.float32]:
        if callable(self.on_infer):
            self.on_infer()
        raise RuntimeError(f"{self.name} is broken")

    def warm_up(self) -> None:
        return None

    def health(self) -> EngineHealth:
        return EngineHealth(ok=False, detail="broken", inferences=0, failures=0)

    def close(self) -> None:
        return None


def test_run_when_the_standby_fails_the_rerun_still_reports_the_switch() -> None:
    engines = EngineSet(_Raising("primary"), _Raising("standby"), FailoverPolicy(1_000_000, 3, 20), lambda: 0)  # type: ignore[arg-type]
    with pytest.raises(RerunFailedError) as caught:
        engines.run(engines.primary, 1, 1)  # type: ignore[arg-type]
    assert caught.value.event.to_engine == "standby" and engines.active.name == "standby"


def test_run_when_an_operator_switched_during_the_batch_judges_nothing_twice() -> None:
    engines: EngineSet

    def operator_switch() -> None:
        engines.switch("standby", FailoverReason.OPERATOR, "operator uid 0")

    standby = _Raising("standby")
    standby.infer = lambda bucket: np.zeros((bucket, 3), dtype=np.float32)  # type: ignore[method-assign]
    engines = EngineSet(
        _Raising("primary", operator_switch),  # type: ignore[arg-type]
        standby,  # type: ignore[arg-type]
        FailoverPolicy(1_000_000, 3, 20),
        lambda: 0,
    )
    outcome = engines.run(engines.primary, 1, 1)  # type: ignore[arg-type]
    assert outcome.engine == "standby" and outcome.event is None
    assert engines.failovers == 1  # the operator's switch only


# -- what the metrics thread reads ------------------------------------------------------------


def test_histogram_when_a_scrape_lands_between_bucket_and_count_stays_monotonic() -> None:
    recorder = LatencyRecorder(capacity=16)
    recorder.record(50_000)
    recorder.buckets[3] += 1  # ``record`` has incremented the bucket; its count is not yet updated
    family = _histogram("x_seconds", "x", recorder)
    counts = [s.value for s in family.samples if s.name == "x_seconds_bucket"]
    assert counts == sorted(counts) and counts[-1] == max(counts)


def test_journal_when_a_record_cannot_be_encoded_raises_a_journal_error(tmp_path: Path) -> None:
    from broker.errors import JournalError  # noqa: PLC0415

    journal = Journal(tmp_path / "j.msgpack", "none")
    with pytest.raises(JournalError, match="encode Intent"):
        journal.append(rec.Intent(ts=0, id="A", symbol="AAA", side="buy", qty=10**30, price=1.0, ts_event=0))


# -- what must stay bounded in a process that runs for months ---------------------------------


def test_halt_log_when_halts_pile_up_keeps_only_the_latest(tmp_path: Path) -> None:
    manifest = load_manifest_for_tests()
    desk = OrderDesk(
        Config(universe=UniverseConfig(symbols=("AAA",))),
        FeatureWindows(("AAA",), manifest.window, manifest.features),
        FakeClock(),
        Journal(tmp_path / "j.msgpack", "none"),
        Stats(),
    )
    for _ in range(700):
        desk.halt("AAA", uid=0)
        desk.resume("AAA", uid=0)
    assert len(desk.halt_log) == HALT_LOG and desk.stats.halts == 700


def test_engine_events_when_switched_many_times_keep_the_latest_and_count_all() -> None:
    standby = _Raising("standby")
    engines = EngineSet(_Raising("primary"), standby, FailoverPolicy(1_000_000, 3, 20), lambda: 0)  # type: ignore[arg-type]
    for _ in range(150):
        engines.switch("standby", FailoverReason.OPERATOR, "drill")
        engines.switch("primary", FailoverReason.OPERATOR, "drill")
    assert engines.failovers == 300 and len(engines.events) == 100
    assert engines.status()["failovers"] == 300


def test_the_repository_tracks_no_profiler_dumps() -> None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    assert not [f for f in tracked if Path(f).name.startswith("onnxruntime_profile_")]


# -- found by an adversarial review --------------------------------------------------------------


class SwitchableGateway(DroppingGateway):
    """Writes everything while up; refuses while down."""

    def __init__(self) -> None:
        super().__init__(writes=10_000)
        self.up = True

    @property
    def connected(self) -> bool:
        return self.up

    def cork(self) -> None:
        pass

    def uncork(self) -> None:
        pass

    def send(self, message: wire.NewOrder | wire.Cancel | wire.StatusRequest) -> bool:
        return self.up and super().send(message)


def _desk(tmp_path: Path, symbols: tuple[str, ...] = ("AAA",)) -> OrderDesk:
    manifest = load_manifest_for_tests()
    return OrderDesk(
        Config(universe=UniverseConfig(symbols=symbols), risk=RiskConfig(clock="feed")),
        FeatureWindows(symbols, manifest.window, manifest.features),
        FakeClock(),
        Journal(tmp_path / "j.msgpack", "none"),
        Stats(),
    )


def _working_order(desk: OrderDesk, gateway: SwitchableGateway) -> Order:
    desk.gateway = gateway
    desk.on_broker_event("connected", "test")
    assert desk.on_status(wire.Status(orders=[], unknown=[], positions={}, ts=0))
    order = Order(desk.orders.next_id(), "AAA", wire.Side.BUY, 10, 100.0, 0, 0)
    desk.orders.intent(order, "buy", 0.9)
    desk.orders.queue(order, {})
    desk.orders.commit()
    return order


def test_kill_switch_while_the_broker_is_away_cancels_once_it_is_back(tmp_path: Path) -> None:
    desk, gateway = _desk(tmp_path), SwitchableGateway()
    desk.orders.begin_session()
    order = _working_order(desk, gateway)
    gateway.up = False
    desk.on_broker_event("disconnected", "test")
    assert desk.kill_switch(uid=0) == 0  # nothing can be written now
    gateway.up = True
    desk.on_broker_event("connected", "test")
    status = wire.OrderStatus(order.cl_ord_id, "AAA", order.side, 10, 100.0, wire.ExecStatus.NEW, 0, 0.0)
    assert desk.on_status(wire.Status(orders=[status], unknown=[], positions={}, ts=0))
    cancels = [m for m in gateway.written if isinstance(m, wire.Cancel)]
    assert [c.orig_cl_ord_id for c in cancels] == [order.cl_ord_id]


def test_a_status_nobody_asked_for_is_ignored_and_moves_no_position(tmp_path: Path) -> None:
    desk, gateway = _desk(tmp_path), SwitchableGateway()
    desk.orders.begin_session()
    order = _working_order(desk, gateway)
    old = wire.Status(orders=[], unknown=[], positions={"AAA": 0}, ts=0)
    fill = wire.ExecReport(order.cl_ord_id, "E1", wire.ExecStatus.FILLED, "AAA", order.side, 10, 100.0, 10, 0, 0)
    desk.on_report(fill)
    assert not desk.on_status(old)  # a repeat of the answer at connection
    assert desk.book.positions == {"AAA": 10} and desk.stats.reports_ignored["unsolicited_status"] == 1


def test_reconcile_when_the_broker_holds_symbols_outside_the_universe_does_not_adopt_them(tmp_path: Path) -> None:
    desk, gateway = _desk(tmp_path), SwitchableGateway()
    desk.orders.begin_session()
    desk.gateway = gateway
    desk.on_broker_event("connected", "test")
    assert desk.on_status(wire.Status(orders=[], unknown=[], positions={"AAA": 5, "ZZZ": 100}, ts=0))
    assert desk.book.positions == {"AAA": 5}
    desk.book.last_fill_px["AAA"] = 10.0
    assert desk.risk.gross(desk.book) == Gross(50.0)


def test_begin_session_when_an_approval_was_journaled_without_its_decision_closes_the_order(tmp_path: Path) -> None:
    wall = 1_700_000_000_000_000_000
    records: list[rec.Record] = [
        rec.Intent(ts=wall, id="A-1", symbol="AAA", side="buy", qty=10, price=100.0, ts_event=wall),
        rec.Parked(ts=wall, id="A-1", expires_at=wall + 10**12, notional=1000.0),
        rec.Review(ts=wall, id="A-1", action="approved", uid=0),
    ]
    desk = _desk(tmp_path)
    desk.restore(records)
    desk.begin_session()
    assert desk.book.orders["A-1"].state is OrderState.DENIED and not len(desk.reviews)


async def test_a_background_task_that_fails_fail_stops_the_daemon(tmp_path: Path) -> None:
    async def broken() -> None:
        raise RuntimeError("the review expiry broke")

    async with running_rig(tmp_path, SYMBOLS) as rig:
        rig.daemon._task(broken(), "review-expiry")
        await wait_for(lambda: rig.daemon.fatal is not None, what="fail-stop")
        assert "review-expiry" in (rig.daemon.fatal or "") and rig.daemon.runtime.desk.kill


def test_journal_after_a_failed_write_writes_nothing_more_and_stays_readable(tmp_path: Path) -> None:
    """A file-size limit makes the kernel refuse a write part way (EFBIG), as a full disk would."""
    script = f"""
import resource, signal
from pathlib import Path
from broker import records as rec
from broker.errors import JournalError
from broker.journal import Journal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = Path({str(tmp_path / "j.msgpack")!r})
journal = Journal(path, "batch")
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
failed = None
for i in range(1000):
    journal.append(rec.Send(ts=i, id="order-" + "x" * 40 + str(i)))
    try:
        journal.sync()
    except JournalError as exc:
        failed = exc
        break
assert failed is not None
size = path.stat().st_size
for attempt in (lambda: journal.sync(), lambda: journal.append(rec.Send(ts=0, id="later"))):
    try:
        attempt()
    except JournalError:
        pass
    else:
        raise AssertionError("wrote after a failed write")
journal.close()
assert path.stat().st_size == size
print("ok", size)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr
    records, _ = recover_journal(tmp_path / "j.msgpack")  # a torn tail at most: cut, the rest reads
    assert isinstance(records[0], rec.Header) and all(isinstance(r, rec.Send) for r in records[1:])
