"""One batch's orders, from signals to the socket: the block path against the order-by-order one.

    python -m bench.order_path [--signals 2500] [--reps 15] [--fsync batch]

In one process, with the daemon's own desk, risk engine, order manager, journal (``fsync`` as
given, default the daemon's "batch") and native gateway client connected over 127.0.0.1 to a
far side that reads and discards: a batch of ``--signals`` signals, every one of which makes an
order that passes every gate (each flips its symbol's position; shorts allowed, the duplicate
window off), is handed to ``OrderDesk.on_signals`` ``--reps`` times. Reported
per batch (median over the reps, µs, ``time.perf_counter_ns``): gates (signals to decisions),
journal (the group commit's write and fsync), send (frames encoded and written), and booking
(the sent orders made ``Order``s in the book, which the block path does when the book is next
read, after the write). Baseline in the same run: the same batches decided and sent one order at
a time (``batch_gates_from`` past the batch size: scalar gates, an ``Order``, two journal records
and a frame per order).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop

from broker.client import GatewayClient
from broker.journal import Journal
from broker.reconnect import Backoff
from daemon.batcher import Batch, BatchTiming
from daemon.clock import SystemClock
from daemon.config import Config, RiskConfig, SignalConfig, UniverseConfig
from daemon.desk import OrderDesk
from daemon.logs import configure_logging
from daemon.stats import Stats
from daemon.windows import FeatureWindows
from engines.chooser import DEFAULT_MODEL
from engines.manifest import load_manifest


async def _discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.read(1 << 20):
        pass
    writer.close()


async def _measure(n: int, reps: int, fsync: str, one_by_one: bool) -> dict[str, float]:
    symbols = tuple(f"S{i:05d}" for i in range(n))
    manifest = load_manifest(DEFAULT_MODEL)
    config = Config(
        universe=UniverseConfig(symbols=symbols),
        signal=SignalConfig(confidence_threshold=0.5, notional_per_signal=10_000.0, allow_short=True),
        risk=RiskConfig(throttle_orders=10**6, max_gross_exposure=1e15, review_threshold=1e12, duplicate_window_ms=0),
    )
    clock = SystemClock()
    windows = FeatureWindows(symbols, manifest.window, manifest.features)
    now = clock.wall_ns()
    for i in range(n):
        windows.push(i, now, 100.0, 100.0, 100.0, 100.0, 1.0, None)
    server = await asyncio.start_server(_discard, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rows: dict[str, list[float]] = {"gates": [], "journal": [], "send": [], "booking": []}
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "journal.msgpack", fsync, wall_ns=now)  # type: ignore[arg-type]
        desk = OrderDesk(config, windows, clock, journal, Stats())
        gateway = GatewayClient(
            "127.0.0.1", port, on_report=lambda r: None, on_event=lambda k, d: None, backoff=Backoff(0.05, 0.5)
        )
        task = asyncio.create_task(gateway.run())
        await gateway.connected_event.wait()
        desk.gateway = gateway
        desk.orders.reconciled = True
        desk.risk.feed_now = now
        desk.begin_session()
        if one_by_one:
            desk.batch_gates_from = n + 1
        for rep in range(reps + 1):
            ts = clock.wall_ns()
            mono = clock.mono_ns()
            times = np.full(n, mono, dtype=np.int64)
            batch = Batch(np.arange(n, dtype=np.int64), times, np.full(n, ts), np.full(n, 100.0), times)
            cls = np.where((np.arange(n) + rep) % 2, 2, 0)  # every signal flips the position
            timing = BatchTiming(mono, mono, 1000, n, 8192)
            # As the runtime hands them on: the rows, calls and confidences as arrays.
            desk.on_signals(batch, np.arange(n), cls, np.full(n, 0.9, dtype=np.float32), timing)
            t = time.perf_counter_ns()
            _ = desk.book.working  # whatever reads the book next books what was sent
            booked = time.perf_counter_ns() - t
            last = desk.stats.stages.table()[-1]
            if rep:  # the first batch warms up
                rows["gates"].append(last[4] / 1000)
                rows["journal"].append(last[5] / 1000)
                rows["send"].append(last[6] / 1000)
                rows["booking"].append(booked / 1000)
            await asyncio.sleep(0.01)  # the far side reads
        assert desk.stats.orders_sent == n * (reps + 1), desk.stats.orders_sent
        gateway.stop()
        await task
        journal.close()
    server.close()
    return {k: statistics.median(v) for k, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--signals", type=int, default=2500)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--fsync", choices=["none", "batch", "always"], default="batch")
    args = parser.parse_args()
    configure_logging("error")
    print(
        f"one batch of {args.signals} signals, each an order that passes every gate; fsync {args.fsync}; "
        f"median of {args.reps} batches; µs (perf_counter_ns)"
    )
    print()
    print("| path | gates | journal | send | to the socket | booking (after) | per order, to the socket |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, one_by_one in (("order by order (baseline)", True), ("block", False)):
        r = uvloop.run(_measure(args.signals, args.reps, args.fsync, one_by_one))
        wire = r["gates"] + r["journal"] + r["send"]
        print(
            f"| {label} | {r['gates']:,.0f} | {r['journal']:,.0f} | {r['send']:,.0f} | {wire:,.0f} | "
            f"{r['booking']:,.0f} | {wire / args.signals:.2f} |"
        )


if __name__ == "__main__":
    main()
