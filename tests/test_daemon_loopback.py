"""The daemon over real loopback sockets: bad input of every kind, reconnects, and orders that
reach the broker simulator. The daemon must keep running through all of it."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import msgpack

from broker.orders import FINAL
from broker.sim import SimConfig
from daemon.config import SignalConfig
from daemon.feed.protocol import RejectReason
from tests.helpers import Rig, bar, pack, running_rig, wait_for

WINDOW = 16


async def _send_minutes(rig: Rig, symbols: tuple[str, ...], minutes: range, seq: int = 0) -> int:
    """A random-walk minute per symbol, each minute closed by minute_end; returns the last seq."""
    for minute in minutes:
        messages = []
        for k, symbol in enumerate(symbols):
            seq += 1
            close = 100.0 * math.exp(0.01 * math.sin(minute * (k + 1.3)))
            messages.append(bar(seq, symbol, minute, close=round(close, 2)))
        seq += 1
        messages.append({"type": "minute_end", "seq": seq, "ts": messages[-1]["ts"], "count": len(symbols)})
        rig.writer.write(pack(*messages))
    await rig.writer.drain()
    return seq


async def test_full_windows_become_batches_signals_and_orders_at_the_broker(tmp_path: Path) -> None:
    symbols = ("AAA", "BBB", "CCC")
    async with running_rig(
        tmp_path, symbols, SimConfig(partial_fills=2), signal=SignalConfig(confidence_threshold=0.0)
    ) as rig:
        await _send_minutes(rig, symbols, range(WINDOW + 4))
        s = rig.daemon.stats
        await wait_for(
            lambda: s.minute_ends == WINDOW + 4 and rig.daemon.runtime.idle_event.is_set(),
            what="all minutes",
        )
        assert s.bars_accepted == 3 * (WINDOW + 4)
        assert s.bars_warmup == 3 * (WINDOW - 1)
        assert s.batches >= 5 and s.batch_rows == 3 * 5
        assert sum(s.signals.values()) == 15
        assert s.orders_sent >= 1 and s.orders_sent + sum(s.orders_denied.values()) == s.intents
        book = rig.daemon.runtime.book
        await wait_for(lambda: all(o.state in FINAL for o in book.orders.values()), what="fills")
        assert [o.cl_ord_id for o in rig.broker.received] == list(book.orders)
        assert s.fills == sum(min(2, o.qty) for o in rig.broker.received)
        assert s.orders_filled == len(rig.broker.received)
        for symbol in symbols:
            net = sum(o.qty if o.side == "buy" else -o.qty for o in rig.broker.received if o.symbol == symbol)
            assert book.positions.get(symbol, 0) == net
        assert s.tick_to_order.count == s.orders_sent and s.infer.count == s.batches


async def test_every_bad_bar_is_rejected_by_reason_and_good_bars_still_flow(tmp_path: Path) -> None:
    async with running_rig(tmp_path) as rig:
        bad = [
            bar(1, "AAA", 0, close=math.nan),
            bar(2, "AAA", 0, low=200.0),
            bar(3, "AAA", 0, volume=-5.0),
            bar(4, "AAA", 0, close=-1.0, open=-1.0, low=-1.0),
            bar(5, "AAA", 0, ts="now"),
            {k: v for k, v in bar(6, "AAA", 0).items() if k != "high"},
            bar(7, "ZZZ", 0),
            [1, 2, 3],
            bar(8, "AAA", 1),
            bar(9, "AAA", 1),  # same minute again
            bar(10, "AAA", 0),  # older than the last
            {"type": "trade", "seq": 11},
            bar(20, "BBB", 1),  # seq jumps 11 -> 20
        ]
        rig.writer.write(pack(*bad))
        await rig.writer.drain()
        s = rig.daemon.stats
        await wait_for(lambda: s.bars_received == 12, what="12 bars")
        assert dict(s.bars_rejected) == {
            RejectReason.NON_FINITE: 1,
            RejectReason.INCONSISTENT_OHLC: 1,
            RejectReason.NEGATIVE_VOLUME: 1,
            RejectReason.NON_POSITIVE_PRICE: 1,
            RejectReason.BAD_TYPE: 1,
            RejectReason.MISSING_FIELD: 1,
            RejectReason.UNKNOWN_SYMBOL: 1,
            RejectReason.NOT_A_MAP: 1,
            RejectReason.OUT_OF_ORDER: 2,
        }
        assert s.bars_accepted == 2
        assert s.unknown_types == {"trade": 1}
        assert s.seq_gaps == 1
        assert s.feed_connects == 1, "bad messages must not cost the connection"


async def _assert_reconnects_after(rig: Rig, poison: bytes, reason: str) -> None:
    s = rig.daemon.stats
    rig.writer.write(pack(bar(1, "AAA", 0)) + poison + pack(bar(2, "AAA", 1)))
    await rig.writer.drain()
    second = await rig.feed.next_connection()
    await wait_for(lambda: s.feed_connects == 2, what="reconnect")
    assert s.feed_frame_errors == {reason: 1}
    assert s.bars_accepted == 1, "nothing after the bad frame may be trusted"
    second.write(pack(bar(3, "AAA", 2), bar(4, "BBB", 2)))
    await second.drain()
    await wait_for(lambda: s.bars_accepted == 3, what="bars on the new connection")


async def test_garbage_bytes_drop_the_connection_and_the_daemon_reconnects(tmp_path: Path) -> None:
    async with running_rig(tmp_path) as rig:
        await _assert_reconnects_after(rig, b"\xc1GET / HTTP/1.1\r\n", "not_msgpack")


async def test_oversized_frame_drops_the_connection_and_the_daemon_reconnects(
    tmp_path: Path,
) -> None:
    async with running_rig(tmp_path) as rig:  # max_frame_bytes = 1024 in the rig
        await _assert_reconnects_after(rig, msgpack.packb({"type": "bar", "symbol": "A" * 5000}), "oversized_frame")


async def test_feed_that_closes_is_reconnected_and_resumed(tmp_path: Path) -> None:
    async with running_rig(tmp_path) as rig:
        rig.writer.write(pack(bar(1, "AAA", 0)))
        await rig.writer.drain()
        s = rig.daemon.stats
        await wait_for(lambda: s.bars_accepted == 1, what="first bar")
        rig.writer.close()
        second = await rig.feed.next_connection()
        second.write(pack(bar(2, "AAA", 1)))
        await second.drain()
        await wait_for(lambda: s.bars_accepted == 2, what="bar after reconnect")
        assert s.feed_connects == 2 and s.feed_disconnects == 1


async def test_orders_while_the_broker_is_gone_are_denied_with_a_reason_not_lost(
    tmp_path: Path,
) -> None:
    symbols = ("AAA", "BBB", "CCC")
    async with running_rig(tmp_path, symbols, signal=SignalConfig(confidence_threshold=0.0)) as rig:
        await rig.broker.close()
        s = rig.daemon.stats
        await wait_for(lambda: s.broker_disconnects >= 1, what="broker loss noticed")
        await _send_minutes(rig, symbols, range(WINDOW + 2))
        await wait_for(
            lambda: s.minute_ends == WINDOW + 2 and rig.daemon.runtime.idle_event.is_set(),
            what="minutes",
        )
        assert s.intents >= 1
        assert s.orders_sent == 0
        assert s.orders_denied == {"broker_disconnected": s.intents}


async def test_intents_are_journaled_before_send_and_metrics_are_scrapeable(tmp_path: Path) -> None:
    import urllib.request  # noqa: PLC0415

    from broker.journal import read_journal  # noqa: PLC0415
    from daemon.config import MetricsConfig  # noqa: PLC0415

    symbols = ("AAA", "BBB", "CCC")
    async with running_rig(
        tmp_path, symbols, signal=SignalConfig(confidence_threshold=0.0), metrics=MetricsConfig(port=0)
    ) as rig:
        await _send_minutes(rig, symbols, range(WINDOW + 3))
        s = rig.daemon.stats
        book = rig.daemon.runtime.book
        await wait_for(lambda: s.minute_ends == WINDOW + 3 and rig.daemon.runtime.idle_event.is_set(), what="minutes")
        await wait_for(lambda: all(o.state in FINAL for o in book.orders.values()), what="fills")
        url = f"http://127.0.0.1:{rig.daemon.metrics_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert s.orders_sent >= 1
    assert f'tradingd_orders_total{{outcome="sent"}} {float(s.orders_sent)}' in body
    assert f'tradingd_bars_total{{outcome="accepted"}} {float(s.bars_accepted)}' in body
    assert f"tradingd_inference_seconds_count {float(s.batches)}" in body
    assert 'tradingd_tick_to_order_seconds_bucket{le="0.005"}' in body

    records = list(read_journal(tmp_path / "journal.msgpack"))
    position = {(r["kind"], r["id"]): k for k, r in enumerate(records) if "id" in r}
    for order in rig.broker.received:
        assert position[("intent", order.cl_ord_id)] < position[("send", order.cl_ord_id)]
        assert ("report", order.cl_ord_id) in position
    assert sum(1 for r in records if r["kind"] == "intent") == s.intents
