"""Orders and the native gateway: the state machine, and the client against the simulator."""

from __future__ import annotations

import asyncio
import itertools
import socket
from pathlib import Path

import msgpack
import pytest

from broker import protocol as wire
from broker import records as rec
from broker.client import REPORTS_PER_TURN, GatewayClient
from broker.errors import IllegalTransitionError, JournalError
from broker.orders import Order, OrderBook, OrderState, Refusal
from broker.reconnect import Backoff
from broker.sim import MESSAGES_PER_TURN, BrokerSimulator, SimConfig, _SimProtocol, read_orders
from tests.helpers import wait_for


def _order(cl_ord_id: str = "O1", side: wire.Side = wire.Side.BUY, qty: int = 10) -> Order:
    return Order(cl_ord_id, "AAA", side, qty, 50.0, ts_event=1, ts_recv=2)


def _report(
    order: Order, status: wire.ExecStatus, last_qty: int = 0, cum: int = 0, exec_id: str | None = None
) -> wire.ExecReport:
    return wire.ExecReport(
        order.cl_ord_id,
        exec_id or f"E-{status}-{cum}",
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


def _code(refusal: Refusal | None) -> str | None:
    return None if refusal is None else refusal.code


def test_book_refuses_reports_that_make_no_sense_and_changes_nothing() -> None:
    book, order = OrderBook(), _order(side=wire.Side.SELL, qty=5)
    book.add(order)
    assert _code(book.apply(_report(_order("nope"), wire.ExecStatus.NEW))) == "unknown_order"
    assert _code(book.apply(_report(order, wire.ExecStatus.FILLED, 5, 5))) == "not_sent"
    book.mark_sent(order, 1)
    assert _code(book.apply(_report(order, wire.ExecStatus.PARTIALLY_FILLED, 6, 6))) == "overfill"
    assert book.apply(_report(order, wire.ExecStatus.FILLED, 5, 5)) is None
    assert _code(book.apply(_report(order, wire.ExecStatus.CANCELED, 0, 5))) == "stale"
    assert book.positions["AAA"] == -5


def test_apply_when_a_report_repeats_its_exec_id_moves_the_position_once() -> None:
    book, order = OrderBook(), _order(qty=10)
    book.add(order)
    book.mark_sent(order, 1)
    partial = _report(order, wire.ExecStatus.PARTIALLY_FILLED, 4, 4, exec_id="X1")
    assert book.apply(partial) is None
    refusal = book.apply(partial)
    assert refusal is not None and refusal.code == "duplicate_exec_id" and not refusal.inconsistent
    assert book.apply(_report(order, wire.ExecStatus.FILLED, 6, 10, exec_id="X2")) is None
    assert (book.positions["AAA"], order.state, order.filled_qty) == (10, OrderState.FILLED, 10)
    assert not book.working


@pytest.mark.parametrize(
    ("late", "cum"),
    [(wire.ExecStatus.NEW, 0), (wire.ExecStatus.PARTIALLY_FILLED, 4)],
    ids=["ack after a fill", "partial after a later partial"],
)
def test_apply_when_an_older_report_arrives_late_is_stale_not_inconsistent(late: wire.ExecStatus, cum: int) -> None:
    book, order = OrderBook(), _order(qty=10)
    book.add(order)
    book.mark_sent(order, 1)
    assert book.apply(_report(order, wire.ExecStatus.PARTIALLY_FILLED, 7, 7, exec_id="later")) is None
    refusal = book.apply(_report(order, late, cum, cum, exec_id="earlier"))
    assert refusal is not None and refusal.code == "stale" and not refusal.inconsistent
    assert (book.positions["AAA"], order.filled_qty) == (7, 7)


def test_apply_when_a_partly_filled_order_is_rejected_in_the_end_closes_it() -> None:
    book, order = OrderBook(), _order(qty=10)
    book.add(order)
    book.mark_sent(order, 1)
    assert book.apply(_report(order, wire.ExecStatus.PARTIALLY_FILLED, 4, 4)) is None
    assert book.apply(_report(order, wire.ExecStatus.REJECTED, 0, 4)) is None
    assert order.state is OrderState.REJECTED and not book.working and book.open_qty["AAA"] == 0


def test_apply_when_the_same_fill_comes_under_a_new_exec_id_takes_cum_qty_not_last_qty() -> None:
    book, order = OrderBook(), _order(qty=10)
    book.add(order)
    book.mark_sent(order, 1)
    assert book.apply(_report(order, wire.ExecStatus.PARTIALLY_FILLED, 4, 4, exec_id="A")) is None
    again = book.apply(_report(order, wire.ExecStatus.PARTIALLY_FILLED, 4, 4, exec_id="B"))
    assert again is not None and again.inconsistent and book.positions["AAA"] == 4


def test_apply_when_a_report_was_missed_takes_the_fill_from_cum_qty() -> None:
    book, order = OrderBook(), _order(qty=10)
    book.add(order)
    book.mark_sent(order, 1)
    assert book.apply(_report(order, wire.ExecStatus.FILLED, 6, 10)) is None  # the 4-lot report was lost
    assert (book.positions["AAA"], order.state) == (10, OrderState.FILLED)


@pytest.mark.parametrize(
    ("status", "last", "cum", "code"),
    [
        (wire.ExecStatus.CANCELED, 0, 2, "cum_qty_backwards"),
        (wire.ExecStatus.PARTIALLY_FILLED, -1, 5, "negative_qty"),
        (wire.ExecStatus.FILLED, 6, 11, "overfill"),
        (wire.ExecStatus.FILLED, 1, 6, "filled_short"),
        (wire.ExecStatus.NEW, 1, 5, "fill_without_fill_status"),
    ],
)
def test_apply_when_a_report_contradicts_the_book_is_inconsistent_and_changes_nothing(
    status: wire.ExecStatus, last: int, cum: int, code: str
) -> None:
    book, order = OrderBook(), _order(qty=10)
    book.add(order)
    book.mark_sent(order, 1)
    assert book.apply(_report(order, wire.ExecStatus.PARTIALLY_FILLED, 4, 4)) is None
    refusal = book.apply(_report(order, status, last, cum, exec_id="bad"))
    assert refusal is not None and (refusal.code, refusal.inconsistent) == (code, True)
    assert (book.positions["AAA"], order.filled_qty, order.state) == (4, 4, OrderState.PARTIALLY_FILLED)


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
    logged = read_orders(tmp_path / "orders.jsonl")
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
    journal.append(rec.Denied(ts=1, id="A", reason="x"))
    journal.append(rec.Send(ts=2, id="A"))
    journal.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])  # the process died mid-write
    records, cut = recover_journal(path)
    assert [type(r) for r in records] == [rec.Header, rec.Denied] and cut > 0
    journal = Journal(path, fsync="none")
    journal.append(rec.Send(ts=3, id="A"))
    journal.close()
    assert [(r["kind"], r["ts"]) for r in read_journal(path)][1:] == [("denied", 1), ("send", 3)]


def test_recover_journal_when_the_format_is_unknown_refuses_it(tmp_path: Path) -> None:
    from broker.journal import recover_journal  # noqa: PLC0415

    path = tmp_path / "j.msgpack"
    path.write_bytes(msgpack.packb({"kind": "header", "ts": 0, "format": 99}))
    with pytest.raises(JournalError, match="format 99"):
        recover_journal(path)


def test_journal_when_a_write_fails_raises_a_journal_error_naming_the_file() -> None:
    from broker.journal import Journal  # noqa: PLC0415

    with pytest.raises(JournalError, match="/dev/full"):
        Journal(Path("/dev/full"), fsync="batch")


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
    assert _code(book.apply(_report(orders[0], wire.ExecStatus.FILLED, 1, 1))) == "unknown_order"


async def test_gateway_when_a_burst_of_reports_arrives_handles_it_over_several_turns_in_order_and_loses_none(
    tmp_path: Path,
) -> None:
    """A batch's acks and fills arrive in one read; they are applied a few per turn of the loop
    (so the next batch's orders are not held up behind them), in order, every one of them, even
    when the broker hangs up right after a second burst."""
    n = 500

    def burst(first: int) -> bytes:
        return b"".join(
            msgpack.packb(
                wire.encode(
                    wire.ExecReport(f"O{k}", f"E{k}", wire.ExecStatus.NEW, "AAA", wire.Side.BUY, 0, 0.0, 0, 1, 0)
                )
            )
            for k in range(first, first + n)
        )

    first_applied = asyncio.Event()

    async def two_bursts_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(burst(0))
        await writer.drain()
        await first_applied.wait()
        writer.write(burst(n))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(two_bursts_then_hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reports: list[wire.ExecReport] = []
    events: list[tuple[str, int]] = []
    turns: list[int] = []
    client = GatewayClient(
        "127.0.0.1",
        port,
        on_report=reports.append,
        on_event=lambda kind, _detail: events.append((kind, len(reports))),
        backoff=Backoff(5.0, 5.0),
    )

    async def count_turns() -> None:
        while len(reports) < n:
            turns.append(len(reports))
            await asyncio.sleep(0)
        first_applied.set()

    task = asyncio.create_task(client.run())
    counter = asyncio.create_task(count_turns())
    await wait_for(lambda: any(kind == "disconnected" for kind, _ in events), what="the hang-up")
    client.stop()
    await task
    await counter
    server.close()
    assert [r.cl_ord_id for r in reports] == [f"O{k}" for k in range(2 * n)]
    assert ("disconnected", 2 * n) in events  # the second burst applied whole before the hang-up is known
    steps = [b - a for a, b in itertools.pairwise(turns) if b > a]
    assert len(steps) >= n // REPORTS_PER_TURN and max(steps) <= REPORTS_PER_TURN


async def test_gateway_holds_reports_while_told_to_but_never_past_the_bound(tmp_path: Path) -> None:
    """Reports wait while the daemon trades a minute (``hold``), each at most ``hold_s`` after it
    was read; once the hold ends they are applied at once."""
    frames = b"".join(
        msgpack.packb(
            wire.encode(wire.ExecReport(f"O{k}", f"E{k}", wire.ExecStatus.NEW, "AAA", wire.Side.BUY, 0, 0.0, 0, 1, 0))
        )
        for k in range(3)
    )
    sent = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(frames)
        await writer.drain()
        sent.set()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    holding = [True]
    reports: list[wire.ExecReport] = []

    def client_with(hold_s: float) -> GatewayClient:
        return GatewayClient(
            "127.0.0.1",
            port,
            on_report=reports.append,
            on_event=lambda k, d: None,
            backoff=Backoff(5.0, 5.0),
            hold=lambda: holding[0],
            hold_s=hold_s,
        )

    # Held, then released by the daemon: applied as soon as the hold ends.
    client = client_with(10.0)
    task = asyncio.create_task(client.run())
    await sent.wait()
    await asyncio.sleep(0.1)
    assert reports == []
    holding[0] = False
    await wait_for(lambda: len(reports) == 3, what="the held reports, once released")
    client.stop()
    await task

    # Held for ever by the daemon: applied anyway once the bound has passed.
    reports.clear()
    sent.clear()
    holding[0] = True
    client = client_with(0.05)
    task = asyncio.create_task(client.run())
    await sent.wait()
    t0 = asyncio.get_running_loop().time()
    await wait_for(lambda: len(reports) == 3, what="the reports, after the bound")
    assert asyncio.get_running_loop().time() - t0 >= 0.03
    client.stop()
    await task
    server.close()


async def test_simulator_stamps_its_receipt_once_per_read(tmp_path: Path) -> None:
    """Orders written together are received together: the simulator's receipt time is when it
    read the bytes, not after its own work on the orders before them in the same read."""
    client, sim, _reports, task = await _client_and_sim(tmp_path, SimConfig())
    client.cork()
    for k in range(20):
        assert client.send(wire.NewOrder(f"B{k}", "AAA", wire.Side.BUY, 1, 10.0, ts=1))
    client.uncork()  # one write
    await wait_for(lambda: len(read_orders(tmp_path / "orders.jsonl")) == 20, what="the 20 orders")
    assert len({o["ts_recv"] for o in read_orders(tmp_path / "orders.jsonl")}) == 1
    client.stop()
    await task
    await sim.close()


async def test_simulator_handles_a_read_a_slice_per_turn_so_later_reads_are_stamped_as_they_come(
    tmp_path: Path,
) -> None:
    """A read of many orders is handled MESSAGES_PER_TURN at a time, with the loop free to read
    (and stamp) the socket between slices; every order is still handled, in order."""
    sim = BrokerSimulator(SimConfig(), tmp_path / "orders.jsonl")
    protocol = _SimProtocol(sim)
    ours, theirs = socket.socketpair()
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, ours)
    packer = msgpack.Packer()
    first = b"".join(
        packer.pack(wire.encode(wire.NewOrder(f"A{k}", "AAA", wire.Side.BUY, 1, 10.0, ts=1))) for k in range(100)
    )
    protocol.data_received(first)
    assert len(sim.received) == MESSAGES_PER_TURN  # the rest waits for later turns
    protocol.data_received(packer.pack(wire.encode(wire.NewOrder("B0", "AAA", wire.Side.BUY, 1, 10.0, ts=1))))
    assert len(sim.received) == MESSAGES_PER_TURN  # read now, handled after the first read's rest
    await wait_for(lambda: len(sim.received) == 101, what="every order")
    assert [o.cl_ord_id for o in sim.received] == [f"A{k}" for k in range(100)] + ["B0"]
    stamps = [o["ts_recv"] for o in read_orders(tmp_path / "orders.jsonl")]
    assert len(set(stamps[:100])) == 1 and stamps[100] >= stamps[0]
    transport.close()
    theirs.close()
    await sim.close()


async def test_simulator_closing_with_a_read_still_being_handled_receives_and_logs_all_of_it(tmp_path: Path) -> None:
    """What the simulator read before it vanished counts as received, however many slices of it
    were still waiting their turn."""
    sim = BrokerSimulator(SimConfig(), tmp_path / "orders.jsonl")
    port = await sim.start()
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    packer = msgpack.Packer()
    writer.write(
        b"".join(
            packer.pack(wire.encode(wire.NewOrder(f"C{k}", "AAA", wire.Side.BUY, 1, 1.0, ts=1))) for k in range(300)
        )
    )
    await writer.drain()
    await wait_for(lambda: len(sim.received) > 0, what="the first slice")
    await sim.close()
    assert len(sim.received) == 300
    assert [o["cl_ord_id"] for o in read_orders(tmp_path / "orders.jsonl")] == [f"C{k}" for k in range(300)]
    writer.close()
