"""Restart and reconciliation, in process: the journal rebuilds the desk, and the broker's word
on what happened while the daemon was away is applied before trading resumes."""

from __future__ import annotations

from pathlib import Path

from broker.journal import read_journal
from broker.orders import FINAL
from broker.sim import BrokerSimulator, SimConfig
from daemon.app import Daemon
from daemon.config import RiskConfig, SignalConfig
from tests.helpers import Rig, ScriptedFeed, rig_config, running_rig, wait_for
from tests.test_daemon_loopback import WINDOW, _send_minutes

SYMBOLS = ("AAA", "BBB", "CCC")


async def test_restart_reconciles_fills_that_happened_while_the_daemon_was_away(tmp_path: Path) -> None:
    # The broker answers 300 ms after each order: the daemon stops before hearing any fill.
    broker = BrokerSimulator(SimConfig(latency_us=300_000))
    broker_port = await broker.start()
    feed = ScriptedFeed()
    feed_port = await feed.start()
    config = rig_config(tmp_path, feed_port, broker_port, SYMBOLS, signal=SignalConfig(confidence_threshold=0.0))
    first = Daemon(config)
    await first.start()
    rig = Rig(first, feed, broker, await feed.next_connection())
    await _send_minutes(rig, SYMBOLS, range(WINDOW + 2))
    await wait_for(lambda: first.stats.orders_sent >= 1 and first.runtime.idle_event.is_set(), what="orders sent")
    sent = list(first.runtime.book.working)
    assert sent and first.stats.fills == 0
    await first.shutdown(deadline_s=0.1)
    await wait_for(
        lambda: sum(1 for w in broker._working.values() if w.status == "filled") == len(sent), what="fills at broker"
    )

    second = Daemon(config)
    try:
        await second.start()
        book = second.runtime.book
        assert all(book.orders[i].state in FINAL for i in sent)
        expected = {s: q for s, q in broker.positions.items() if q}
        assert {s: q for s, q in book.positions.items() if q} == expected
        assert second.runtime.desk.session == 2
    finally:
        await second.shutdown()
        await feed.close()
        await broker.close()
    reconciles = [r for r in read_journal(tmp_path / "journal.msgpack") if r["kind"] == "reconcile"]
    assert len(reconciles) == 2
    assert any("filled while away" in d for d in reconciles[1]["differences"])


async def test_a_halt_cancels_the_symbols_working_orders(tmp_path: Path) -> None:
    sim = SimConfig(latency_us=50_000, partial_fills=1)
    async with running_rig(tmp_path, SYMBOLS, sim, signal=SignalConfig(confidence_threshold=0.0)) as rig:
        await _send_minutes(rig, SYMBOLS, range(WINDOW + 1))
        await wait_for(
            lambda: rig.daemon.runtime.idle_event.is_set() and rig.daemon.stats.orders_sent >= 1, what="orders"
        )
        book = rig.daemon.runtime.book
        working = list(book.working.values())
        assert working
        desk = rig.daemon.runtime.desk
        assert desk.halt(None, uid=0)
        assert rig.daemon.stats.cancels_sent == len(working)
        await wait_for(lambda: rig.broker.cancels == len(working), what="cancels at the broker")


async def test_restart_restores_halts_parked_orders_and_the_kill_switch(tmp_path: Path) -> None:
    risk = RiskConfig(clock="feed", review_threshold=1.0)
    async with running_rig(tmp_path, SYMBOLS, signal=SignalConfig(confidence_threshold=0.0), risk=risk) as rig:
        await _send_minutes(rig, SYMBOLS, range(WINDOW + 2))
        await wait_for(lambda: rig.daemon.runtime.idle_event.is_set() and rig.daemon.stats.reviews_parked >= 1)
        desk = rig.daemon.runtime.desk
        desk.halt("BBB", uid=0)
        desk.halt("CCC", uid=0, reducing=True)
        desk.kill_switch(uid=0)
        parked = {p.id for p in desk.reviews.waiting()}
    async with running_rig(tmp_path, SYMBOLS, risk=risk) as rig:
        desk = rig.daemon.runtime.desk
        assert desk.kill and desk.halts.market == "halted"
        assert "BBB" in desk.halts.halted_symbols()
        assert desk.halts.state["CCC"] == "reducing"
        assert {p.id for p in desk.reviews.waiting()} == parked


async def test_a_broker_that_vanishes_mid_order_is_reconciled_on_reconnect(tmp_path: Path) -> None:
    sim = SimConfig(latency_us=500_000)  # orders stay working long enough to lose the broker
    async with running_rig(tmp_path, SYMBOLS, sim, signal=SignalConfig(confidence_threshold=0.0)) as rig:
        await _send_minutes(rig, SYMBOLS, range(WINDOW + 1))
        desk = rig.daemon.runtime.desk
        await wait_for(lambda: rig.daemon.runtime.idle_event.is_set() and len(desk.book.working) >= 1, what="working")
        working = list(desk.book.working)
        port = rig.daemon.config.broker.port
        await rig.broker.close()  # gone before answering: its orders are lost with it
        replacement = BrokerSimulator(SimConfig())
        await replacement.start(port=port)
        try:
            await wait_for(lambda: desk.reconciled and rig.daemon.stats.broker_connects == 2, what="reconnect")
            assert all(desk.book.orders[i].state == "rejected" for i in working)
            assert not desk.book.working
            assert rig.daemon.stats.reconcile_differences >= len(working)
            assert replacement.received == [], "nothing is resent blindly"
        finally:
            await replacement.close()
