"""Ingest rate on one core: bytes read off the socket to symbols waiting for inference.

    python -m bench.ingest [--symbols 5000] [--minutes 20] [--chunk 65536]

Runs the daemon's own ingest over a prebuilt byte stream, in one thread, chunk by chunk as reads
would hand it over: the feed protocol (``FeedProtocol`` for msgpack v1, ``DbnFeedProtocol`` for
DBN) into a real ``Runtime``: validation, the feature windows, the halt rule, accuracy, the
journal's bar records (fsync none) and the batcher. No inference runs: the batcher never fills
and its timer never fires inside the timed loop. Baselines in the same run: msgpack frames
decoded one by one and bars taken one by one (``Runtime.on_bar``, the path of 2026-11-30),
frames decoded one by one and a read's bars at once (the path before msgspec decoded a read's
frames at once), and the DBN decoder alone.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np

from broker.errors import FrameError
from broker.journal import Journal
from daemon.backtest.baselines import RuleEngine
from daemon.clock import SystemClock
from daemon.config import BatchConfig, Config, FeedConfig, UniverseConfig
from daemon.engineset import EngineSet
from daemon.feed import dbn
from daemon.feed.columns import BarColumns, bounds_codes
from daemon.feed.dbn_ingest import DbnFeedProtocol
from daemon.feed.ingest import FeedProtocol, _BarRun
from daemon.feed.protocol import Bar, FeedBounds, bar_map, minute_end_map
from daemon.feed.synth import SynthParams, generate
from daemon.logs import configure_logging
from daemon.runtime import Runtime
from daemon.windows import FeatureWindows
from engines.chooser import DEFAULT_MODEL
from engines.manifest import load_manifest
from risk.failover import FailoverPolicy

NS = 1_000_000_000
T0 = 1_767_625_200 * NS


def _streams(
    symbols: int, minutes: int, chunk: int, warm: int
) -> tuple[list[str], tuple[list[bytes], list[bytes]], tuple[list[bytes], list[bytes]], int]:
    """The universe's names; the msgpack and DBN streams, each as (the first ``warm`` minutes
    with the DBN metadata, the rest) in reads of ``chunk`` bytes; the bars in the rest."""
    universe = generate(SynthParams(symbols=symbols, minutes=minutes, seed=3))
    names = list(universe)
    packer = msgpack.Packer()
    v1 = bytearray()
    v1_warm = b""
    seq = 0
    ids, ts, prices, volume = [], [], [], []
    for m in range(minutes):
        if m == warm:
            v1_warm, v1 = bytes(v1), bytearray()
        close_ts = T0 + m * 60 * NS
        for k, name in enumerate(names):
            o, h, lo, c, v = (float(x) for x in universe[name][m])
            seq += 1
            v1 += packer.pack(bar_map(Bar(seq, name, close_ts, o, h, lo, c, v)))
            ids.append(k + 1)
            ts.append(close_ts - 60 * NS)
            prices.append([round(x * 1e9) for x in (o, h, lo, c)])
            volume.append(int(v))
        seq += 1
        v1 += packer.pack(minute_end_map(seq, close_ts, len(names)))
    symbols_of = {k + 1: name for k, name in enumerate(names)}
    records = dbn.make_ohlcv(ids, ts, *zip(*prices, strict=True), volume)
    head = dbn.ohlcv_metadata(symbols_of, ts[0], ts[-1] + 60 * NS).encode()
    head += dbn.symbol_mapping_records(symbols_of, 3, ts[0], ts[-1] + 60 * NS)
    split = warm * symbols
    dbn_warm, body = head + records[:split].tobytes(), records[split:].tobytes()

    def cut(data: bytes | bytearray) -> list[bytes]:
        return [bytes(data[i : i + chunk]) for i in range(0, len(data), chunk)]

    return names, (cut(v1_warm), cut(v1)), (cut(dbn_warm), cut(body)), symbols * (minutes - warm)


def _runtime(names: list[str], work: Path) -> Runtime:
    manifest = load_manifest(DEFAULT_MODEL)
    config = Config(
        universe=UniverseConfig(symbols=tuple(names)),
        batch=BatchConfig(max_batch=8192, max_delay_us=60_000_000),
        feed=FeedConfig(max_future_s=86_400.0 * 365 * 10),
    )
    engines = EngineSet(
        RuleEngine("momentum", manifest, (8192,)), None, FailoverPolicy(10**12, 1, 1), time.perf_counter_ns
    )
    return Runtime(config, engines, SystemClock(), Journal(work / "journal.msgpack", "none"))


async def _measure(names: list[str], run: Callable[[Runtime, bool], None], bars: int) -> float:
    """Best of three: seconds for the stream after its warm-up minutes, each on a fresh runtime."""
    best = float("inf")
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            runtime = _runtime(names, Path(tmp))
            run(runtime, True)  # the connection's metadata and each symbol's first bars, untimed
            before = runtime.stats.bars_accepted
            t = time.perf_counter()
            run(runtime, False)
            best = min(best, time.perf_counter() - t)
            s = runtime.stats
            assert s.bars_accepted - before == bars, (s.bars_accepted, bars, dict(s.bars_rejected))
            runtime.drain_now()  # the batch started at the last minute's end, off the clock
            await asyncio.wait_for(runtime.idle_event.wait(), timeout=60)
            runtime.close()
    return best


class _ValidateAndWindow:
    """A DBN sink that does only what the ingest target names after the decoder: the runtime's
    checks (the decoder's own are in the columns already) and the feature windows, by the
    functions ``Runtime.on_bars`` calls, with nothing else (no halts, accuracy, journal, batcher)."""

    def __init__(self, names: list[str]) -> None:
        manifest = load_manifest(DEFAULT_MODEL)
        self.windows = FeatureWindows(tuple(names), manifest.window, manifest.features)
        f = FeedConfig(max_future_s=86_400.0 * 365 * 10)
        self.bounds = FeedBounds(
            f.min_price, f.max_price, f.max_volume, round(f.max_future_s * NS), round(f.max_ahead_s * NS)
        )
        self.feed_ts: int | None = None
        self.accepted = 0

    def on_bars(self, cols: BarColumns, ts_recv: int) -> None:
        codes = cols.codes.copy()
        bounds_codes(codes, cols, self.bounds, time.time_ns(), self.feed_ts)
        at = np.flatnonzero(codes == 0)
        pushed = self.windows.push_many(
            cols.idx[at],
            cols.ts[at],
            cols.open[at],
            cols.high[at],
            cols.low[at],
            cols.close[at],
            cols.volume[at],
            cols.prev_close[at],
        )
        self.accepted += int((pushed == 0).sum())
        self.feed_ts = max(self.feed_ts or 0, int(cols.ts.max()))

    def on_minute_complete(self, ts: int) -> None:
        pass

    def on_feed_connected(self, feed: DbnFeedProtocol) -> None:
        pass

    def on_feed_lost(self) -> None:
        pass

    def on_frame_error(self, error: FrameError) -> None:
        raise error

    def on_internal_error(self, exc: BaseException, where: str) -> None:
        raise exc


def _decode_validate_windows(names: list[str], chunks: tuple[list[bytes], list[bytes]], bars: int) -> float:
    """Best of three: seconds for the stream after its warm-up through ``DbnFeedProtocol`` into
    ``_ValidateAndWindow``."""
    best = float("inf")
    for _ in range(3):
        sink = _ValidateAndWindow(names)
        protocol = DbnFeedProtocol(sink, tuple(names), time.perf_counter_ns)
        for chunk in chunks[0]:
            protocol.data_received(chunk)
        before = sink.accepted
        t = time.perf_counter()
        for chunk in chunks[1]:
            protocol.data_received(chunk)
        best = min(best, time.perf_counter() - t)
        assert sink.accepted - before == bars, (sink.accepted - before, bars)
    return best


async def main_async(args: argparse.Namespace) -> None:
    names, v1, dbn_chunks, bars = _streams(args.symbols, args.minutes, args.chunk, args.warm)
    now = time.perf_counter_ns
    protocols: dict[int, object] = {}

    def fed(
        make: Callable[[Runtime], object], chunks: tuple[list[bytes], list[bytes]]
    ) -> Callable[[Runtime, bool], None]:
        def run(runtime: Runtime, warm: bool) -> None:
            if warm:
                protocols[id(runtime)] = make(runtime)
            protocol = protocols[id(runtime)]
            for chunk in chunks[0] if warm else chunks[1]:
                protocol.data_received(chunk)  # type: ignore[attr-defined]

        return run

    class _OneByOne(FeedProtocol):
        def _dispatch_bars(self, run: _BarRun, ts_recv: int) -> None:
            for bar in run.bars:
                self._sink.on_bar(bar, ts_recv)

    msgpack_bar_by_bar = fed(lambda rt: _OneByOne(rt, 4096, now, bulk_decode=False), v1)
    msgpack_frame_by_frame = fed(lambda rt: FeedProtocol(rt, 4096, now, bulk_decode=False), v1)
    msgpack_grouped = fed(lambda rt: FeedProtocol(rt, 4096, now), v1)
    dbn_path = fed(lambda rt: DbnFeedProtocol(rt, rt.symbols, now), dbn_chunks)

    def decoder_alone() -> float:
        best = float("inf")
        for _ in range(3):
            decoder = dbn.DbnDecoder()
            for chunk in dbn_chunks[0]:
                decoder.feed(chunk)
            t = time.perf_counter()
            n = sum(len(decoder.feed(chunk).bars) for chunk in dbn_chunks[1])
            best = min(best, time.perf_counter() - t)
            assert n == bars
        return best

    print(
        f"{bars} bars timed ({args.symbols} symbols x {args.minutes - args.warm} minutes, after {args.warm} minutes"
        f" of warm-up: the DBN metadata and each symbol's first bars of the session), reads of {args.chunk} bytes,"
        " one thread"
    )
    print()
    print("| path | bars/s | µs per bar | a 5,000-symbol minute, ms |")
    print("|---|---:|---:|---:|")
    rows = [
        ("msgpack v1, frames one by one, bar by bar (baseline)", await _measure(names, msgpack_bar_by_bar, bars)),
        (
            "msgpack v1, frames decoded one by one, a read's bars at once (baseline)",
            await _measure(names, msgpack_frame_by_frame, bars),
        ),
        ("msgpack v1, a read's frames decoded at once, its bars at once", await _measure(names, msgpack_grouped, bars)),
        ("DBN decoder alone (baseline)", decoder_alone()),
        (
            "DBN: decode, validate, windows (the target's scope: no halts, journal, accuracy, batcher)",
            _decode_validate_windows(names, dbn_chunks, bars),
        ),
        ("DBN: decode, validate, windows, halts, journal, batcher", await _measure(names, dbn_path, bars)),
    ]
    for name, seconds in rows:
        per = seconds / bars
        print(f"| {name} | {bars / seconds:,.0f} | {per * 1e6:.3f} | {per * 5000 * 1e3:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=5000)
    parser.add_argument("--minutes", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--warm", type=int, default=2, help="minutes fed before the clock starts")
    configure_logging("error")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
