"""Latency figures mean what their labels say: ``ts_recv`` is the read, stages add up per order."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

from broker.errors import FrameError
from daemon.batcher import BatchTiming
from daemon.config import SignalConfig
from daemon.feed.ingest import FeedProtocol
from daemon.feed.protocol import Bar, Heartbeat, MinuteEnd, Rejected, UnknownType
from daemon.stats import STAGE_NAMES, STAGES, OrderStages
from tests.helpers import NS_PER_MIN, T0, ScriptedFeed, bar, pack, running_rig, wait_for


class _Recording:
    """A sink that records each message's ts_recv and pauses the feed after each minute_end."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self.feed: FeedProtocol | None = None
        self.connected = asyncio.Event()

    def on_bar(self, message: Bar, ts_recv: int) -> None:
        self.seen.append((f"bar{message.seq}", ts_recv))

    def on_bar_group(self, bars: list[Bar], ts_recv: int, values: object = None) -> None:
        for one in bars:
            self.on_bar(one, ts_recv)

    def on_minute_end(self, message: MinuteEnd, ts_recv: int) -> None:
        self.seen.append((f"end{message.seq}", ts_recv))
        assert self.feed is not None
        self.feed.pause()

    def on_heartbeat(self, message: Heartbeat, ts_recv: int) -> None:
        pass

    def on_rejected(self, rejected: Rejected, ts_recv: int) -> None:
        pass

    def on_unknown_type(self, message: UnknownType) -> None:
        pass

    def on_feed_connected(self, feed: FeedProtocol) -> None:
        self.feed = feed
        self.connected.set()

    def on_feed_lost(self) -> None:
        pass

    def on_frame_error(self, error: FrameError) -> None:
        pass

    def on_internal_error(self, exc: BaseException, where: str) -> None:
        raise AssertionError(f"{where}: {exc}")


async def test_ingest_when_a_read_waits_behind_a_pause_keeps_the_time_it_was_read() -> None:
    """Two minutes in one read: the second minute's bars are received when the bytes were read,
    not when the paused feed resumes, so their tick-to-order includes the wait."""
    clock = [1_000]
    feed = ScriptedFeed()
    port = await feed.start()
    sink = _Recording()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: FeedProtocol(sink, 1024, lambda: clock[0]), "127.0.0.1", port
    )
    try:
        writer = await feed.next_connection()
        writer.write(
            pack(
                bar(1, "AAA", 0),
                {"type": "minute_end", "seq": 2, "ts": T0, "count": 1},
                bar(3, "AAA", 1),
                {"type": "minute_end", "seq": 4, "ts": T0 + NS_PER_MIN, "count": 1},
            )
        )
        await writer.drain()
        for _ in range(100):
            if sink.seen:
                break
            await asyncio.sleep(0.01)
        assert [name for name, _ in sink.seen] == ["bar1", "end2"]
        clock[0] = 9_000  # time passes while the feed is paused
        protocol.resume()
        assert sink.seen == [("bar1", 1_000), ("end2", 1_000), ("bar3", 1_000), ("end4", 1_000)]
    finally:
        transport.close()
        await feed.close()


def test_order_stages_when_recorded_add_up_to_tick_to_order_and_overhead_is_per_order() -> None:
    stages = OrderStages(capacity=4)
    # Two orders of one batch: the same batch stages, different bars.
    timing = BatchTiming(started_ns=5_000, back_ns=9_000, engine_ns=3_000, rows=2, bucket=8)
    stages.record(1_000, 2_000, timing, 9_500, 10_000, 10_200)
    stages.record(4_000, 4_500, timing, 9_500, 10_000, 10_400)
    table = stages.table()
    t2o, parts = table[:, 0], table[:, 1 : 1 + len(STAGE_NAMES)]
    assert (parts.sum(axis=1) == t2o).all() and list(t2o) == [9_200, 6_400]
    summary = stages.summary_us()
    assert summary["overhead_us"]["p50"] == round(((9_200 - 3_000) + (6_400 - 3_000)) / 2 / 1000, 1)
    assert STAGES[8:] == ("rows", "bucket") and list(table[:, 9]) == [8, 8]
    for k in range(5):  # the ring keeps the newest
        stages.record(k, k, timing, 9_500, 10_000, 10_000 + k)
    assert len(stages.table()) == 4 and stages.table()[-1, 0] == 10_000 + 4 - 4


async def test_daemon_when_it_trades_records_stages_for_every_order_sent(tmp_path: Path) -> None:
    symbols = ("AAA", "BBB")
    async with running_rig(tmp_path, symbols, signal=SignalConfig(confidence_threshold=0.0)) as rig:
        seq = 0
        for minute in range(24):
            messages = []
            for k, symbol in enumerate(symbols):
                seq += 1
                close = 100.0 * math.exp(0.01 * math.sin(minute * (k + 1.3)))
                messages.append(bar(seq, symbol, minute, close=round(close, 2)))
            seq += 1
            messages.append({"type": "minute_end", "seq": seq, "ts": T0 + minute * NS_PER_MIN, "count": 2})
            rig.writer.write(pack(*messages))
        await rig.writer.drain()
        s = rig.daemon.stats
        runtime = rig.daemon.runtime
        assert runtime is not None
        await wait_for(lambda: s.minute_ends == 24 and runtime.idle_event.is_set(), what="all minutes")
        assert s.orders_sent > 0 and s.stages.count == s.orders_sent
        table = s.stages.table()
        assert (table[:, 1:7].sum(axis=1) == table[:, 0]).all()
        assert (table[:, 1:7] >= 0).all() and (table[:, 7] > 0).all()
        assert sum(s.batch_buckets.values()) == s.batches
