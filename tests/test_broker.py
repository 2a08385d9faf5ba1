"""Orders and the native gateway: the state machine, and the client against the simulator."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from broker import protocol as wire
from broker.client import GatewayClient
from broker.errors import IllegalTransitionError
from broker.orders import Order, OrderBook, OrderState
from broker.reconnect import Backoff
from broker.sim import BrokerSimulator, SimConfig
from tests.helpers import wait_for


def _order(cl_ord_id: str = "O1", side: wire.Side = wire.Side.BUY, qty: int = 10) -> Order:
    return Order(cl_ord_id, "AAA", side, qty, 50.0, ts_event=1, ts_recv=2)


def _report(order: Order, status: wire.ExecStatus, last_qty: int = 0, cum: int = 0) -> wire.ExecReport:
    return wire.ExecReport(
        order.cl_ord_id,
        "E",
        status,
        order.symbol,
        order.side,
        last_qty,
        order.price,
        cum,
        order.qty - cum,
        0,
    )


def test_move_when_transition_is_illegal_names_both_states() -> None:
    order = _order()
    with pytest.raises(IllegalTransitionError, match="intent -> filled"):
        order.move(OrderState.FILLED)


def test_book_applies_ack_partial_and_full_fills_to_position_and_open_qty() -> None:
    book, order = OrderBook(), _order(qty=10)
    book.add(order)
    book.mark_sent(order, ts_send=3)
    assert book.exposure("AAA") == 10 and book.positions.get("AAA", 0) == 0
    assert book.apply(_report(order, wire.ExecStatus.NEW)) is None
    assert book.apply(_report(order, wire.ExecStatus.PARTIALLY_FILLED, 4, 4)) is None
    assert (book.positions["AAA"], book.open_qty["AAA"], order.state) == (
        4,
        6,
        OrderState.PARTIALLY_FILLED,
    )
    assert book.apply(_report(order, wire.ExecStatus.FILLED, 6, 10)) is None
    assert (book.positions["AAA"], book.open_qty["AAA"], order.state) == (10, 0, OrderState.FILLED)


def test_book_refuses_reports_that_make_no_sense_and_changes_nothing() -> None:
    book, order = OrderBook(), _order(side=wire.Side.SELL, qty=5)
    book.add(order)
    assert book.apply(_report(_order("nope"), wire.ExecStatus.NEW)) == "unknown_order"
    assert book.apply(_report(order, wire.ExecStatus.FILLED, 5, 5)) == "intent->filled"
    book.mark_sent(order, 1)
    assert book.apply(_report(order, wire.ExecStatus.PARTIALLY_FILLED, 6, 6)) == "overfill"
    assert book.apply(_report(order, wire.ExecStatus.FILLED, 5, 5)) is None
    assert book.apply(_report(order, wire.ExecStatus.CANCELED)) == "filled->canceled"
    assert book.positions["AAA"] == -5


def test_decode_when_gateway_message_is_malformed_says_what() -> None:
    assert isinstance(wire.decode({"type": "new_order", "cl_ord_id": "x"}), wire.Malformed)
    assert "unknown message type" in wire.decode({"type": "hello"}).detail  # type: ignore[union-attr]
    bad = {
        "type": "new_order",
        "cl_ord_id": "x",
        "symbol": "A",
        "side": "buy",
        "qty": 0,
        "price": 1.0,
        "ts": 1,
    }
    assert isinstance(wire.decode(bad), wire.Malformed)


async def _client_and_sim(
    tmp_path: Path, config: SimConfig
) -> tuple[GatewayClient, BrokerSimulator, list[wire.ExecReport], asyncio.Task[None]]:
    sim = BrokerSimulator(config, tmp_path / "orders.jsonl")
    port = await sim.start()
    reports: list[wire.ExecReport] = []
    client = GatewayClient(
        "127.0.0.1",
        port,
        on_report=reports.append,
        on_event=lambda k, d: None,
        backoff=Backoff(0.01, 0.05),
    )
    task = asyncio.create_task(client.run())
    await asyncio.wait_for(client.connected_event.wait(), 5)
    return client, sim, reports, task


async def test_simulator_acks_then_fills_in_parts_at_the_limit_and_logs_each_order(
    tmp_path: Path,
) -> None:
    client, sim, reports, task = await _client_and_sim(tmp_path, SimConfig(partial_fills=3))
    assert client.send(wire.NewOrder("A1", "AAA", wire.Side.BUY, 10, 12.5, ts=1))
    await wait_for(lambda: len(reports) == 4, what="ack and three fills")
    assert [r.status for r in reports] == ["new", "partially_filled", "partially_filled", "filled"]
    assert [r.last_qty for r in reports] == [0, 4, 3, 3] and reports[-1].cum_qty == 10
    assert {r.last_px for r in reports[1:]} == {12.5}
    logged = [json.loads(line) for line in (tmp_path / "orders.jsonl").read_text().splitlines()]
    assert [(x["cl_ord_id"], x["qty"], x["price"]) for x in logged] == [("A1", 10, 12.5)]
    client.stop()
    await task
    await sim.close()


async def test_simulator_rejects_with_a_reason(tmp_path: Path) -> None:
    client, sim, reports, task = await _client_and_sim(tmp_path, SimConfig(reject_rate=1.0))
    client.send(wire.NewOrder("R1", "AAA", wire.Side.SELL, 1, 1.0, ts=1))
    await wait_for(lambda: len(reports) == 1, what="reject")
    assert reports[0].status == "rejected" and reports[0].text == "simulated reject"
    client.stop()
    await task
    await sim.close()


async def test_client_reconnects_after_the_broker_drops_and_send_says_when_it_cannot(
    tmp_path: Path,
) -> None:
    client, sim, reports, task = await _client_and_sim(tmp_path, SimConfig())
    port = client.port
    await sim.close()
    await wait_for(lambda: not client.connected, what="disconnect")
    assert not client.send(wire.NewOrder("X", "AAA", wire.Side.BUY, 1, 1.0, ts=1))
    sim2 = BrokerSimulator(SimConfig())
    await sim2.start(port=port)
    await wait_for(lambda: client.connected, what="reconnect")
    assert client.send(wire.NewOrder("Y", "AAA", wire.Side.BUY, 1, 1.0, ts=1))
    await wait_for(lambda: len(reports) == 2, what="fill after reconnect")
    assert [o.cl_ord_id for o in sim2.received] == ["Y"]
    client.stop()
    await task
    await sim2.close()


def test_recover_journal_cuts_a_torn_last_record_so_appends_stay_readable(tmp_path: Path) -> None:
    from broker.journal import Journal, read_journal, recover_journal  # noqa: PLC0415

    path = tmp_path / "j.msgpack"
    journal = Journal(path, fsync="always")
    journal.append("intent", 1, id="A")
    journal.append("send", 2, id="A")
    journal.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])  # the process died mid-write
    records, cut = recover_journal(path)
    assert [r["kind"] for r in records] == ["intent"] and cut > 0
    journal = Journal(path, fsync="none")
    journal.append("send", 3, id="A")
    journal.close()
    assert [(r["kind"], r["ts"]) for r in read_journal(path)] == [("intent", 1), ("send", 3)]


def test_book_keeps_only_the_most_recent_final_orders() -> None:
    book = OrderBook(retain_final=3)
    orders = [_order(f"O{i}", qty=1) for i in range(6)]
    for order in orders:
        book.add(order)
        book.mark_sent(order, 1)
    for order in orders[:5]:
        assert book.apply(_report(order, wire.ExecStatus.FILLED, 1, 1)) is None
    assert list(book.orders) == ["O2", "O3", "O4", "O5"]  # three final, one working
    assert book.positions["AAA"] == 5
    assert book.apply(_report(orders[0], wire.ExecStatus.FILLED, 1, 1)) == "unknown_order"
