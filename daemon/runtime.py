"""The minute loop's owner: every task, queue and callback between the feed and the broker.

Ingest calls ``on_bar`` and friends on the event loop. Bars update the feature windows; symbols
with a full window wait in the batcher; a due batch is gathered into the engine's own input
buffer and run on the single inference thread, so the loop never waits on the model; results
come back to the loop as signals for the order desk (``daemon.desk``), which turns them into
gated, journaled orders. Only one batch is in flight at a time (its input buffer is the
engine's), and while it runs, at most one waiting entry per symbol can build up: the queue is
bounded by the universe, and the feed is paused while a closed minute is still being inferred
or a whole extra batch is already waiting.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import structlog

from broker import records as rec
from broker.errors import FrameError
from broker.journal import Journal
from broker.orders import OrderBook
from daemon.batcher import Batch, Batcher, BatchTiming
from daemon.clock import Clock
from daemon.config import Config
from daemon.desk import OrderDesk
from daemon.engineset import EngineSet, Outcome, RerunFailedError
from daemon.feed.columns import BarColumns, bounds_codes, from_bars
from daemon.feed.dbn import CHECK_REASONS
from daemon.feed.dbn_ingest import DbnFeedProtocol
from daemon.feed.ingest import FeedProtocol
from daemon.feed.protocol import (
    NS_PER_S,
    Bar,
    FeedBounds,
    Heartbeat,
    MinuteEnd,
    Rejected,
    RejectReason,
    UnknownType,
    check_bar,
)
from daemon.policy import CLASS_NAMES, HOLD, classify
from daemon.stats import Stats
from daemon.windows import FeatureWindows, Push
from engines.base import Engine

log = structlog.get_logger("tradingd.runtime")

# Unknown message types are counted by name for the first this-many names (each cut to a
# readable length), then together as "(other)": a feed cannot grow the table without bound.
UNKNOWN_TYPES_KEPT = 32
UNKNOWN_TYPE_CHARS = 64
OTHER_TYPES = "(other)"


_PUSH_REASONS = (None, RejectReason.OUT_OF_ORDER, RejectReason.NON_FINITE_FEATURE)  # windows.PUSH_CODES
_CHECK_BAR_REASONS = frozenset(
    {
        RejectReason.PRICE_OUT_OF_RANGE,
        RejectReason.VOLUME_OUT_OF_RANGE,
        RejectReason.FUTURE_TS,
        RejectReason.AHEAD_OF_FEED,
        RejectReason.UNKNOWN_SYMBOL,
    }
)


def _worth_logging(n: int) -> bool:
    """Log the first ten occurrences, then every thousandth: visible, never a flood."""
    return n <= 10 or n % 1000 == 0


@dataclass(slots=True)
class _InFlight:
    batch: Batch
    engine: Engine
    bucket: int
    started_ns: int


class Runtime:
    def __init__(
        self,
        config: Config,
        engines: EngineSet,
        clock: Clock,
        journal: Journal,
        stats: Stats | None = None,
    ) -> None:
        self.config = config
        self.engines = engines
        self.clock = clock
        self.stats = stats or Stats()
        manifest = engines.active.manifest  # both engines share window and features
        self.symbols = config.universe.symbols
        self.windows = FeatureWindows(self.symbols, manifest.window, manifest.features)
        max_batch = min(config.batch.max_batch, engines.max_rows)
        self.batcher = Batcher(len(self.symbols), max_batch, config.batch.max_delay_us * 1000)
        self.desk = OrderDesk(config, self.windows, clock, journal, self.stats)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tradingd-infer")
        self._inflight: _InFlight | None = None
        self._drain = False  # a minute_end asked for everything waiting to go now
        self._timer: asyncio.TimerHandle | None = None
        self._feed: FeedProtocol | DbnFeedProtocol | None = None
        self._feed_paused = False
        self._paused_since = 0
        self._last_seq: int | None = None
        f = config.feed
        self._bounds = FeedBounds(
            f.min_price, f.max_price, f.max_volume, round(f.max_future_s * NS_PER_S), round(f.max_ahead_s * NS_PER_S)
        )
        self._feed_ts: int | None = None  # the feed's current minute: the latest bar close accepted
        self.journal = journal
        # Bars accepted since they were last journaled (a ``Bars`` record per batch or minute),
        # so a restart rebuilds the windows from the snapshot plus these.
        self._bars: list[tuple[str, int, float, float, float, float, float, float]] = []
        # Whole minutes taken by ``on_bars``, in arrival order with the scalar bars before them.
        # Each: names (object array), ts, the five OHLCV columns, prev close; stacked at the flush.
        self._bar_chunks: list[
            tuple[
                npt.NDArray[np.object_],
                npt.NDArray[np.int64],
                tuple[npt.NDArray[np.float64], ...],
                npt.NDArray[np.float64],
            ]
        ] = []
        self._names = np.asarray(self.symbols, dtype=object)
        self._max_gap_ns = int(config.journal.window_max_gap_s * 1e9)
        self.idle_event = asyncio.Event()
        self.idle_event.set()
        self.feed_connected_event = asyncio.Event()  # set on the first feed connection
        # Sees every inferred batch's calls (a backtest scores them); None live.
        self.on_calls: Callable[[Batch, npt.NDArray[np.int64], npt.NDArray[np.float32]], None] | None = None

    # -- ingest ---------------------------------------------------------------------------

    def _seq(self, seq: int) -> None:
        last = self._last_seq
        if last is not None and seq != last + 1 and seq > last:
            self.stats.seq_gaps += 1
            if _worth_logging(self.stats.seq_gaps):
                log.warning("feed_seq_gap", expected=last + 1, got=seq, gaps=self.stats.seq_gaps)
        if last is None or seq > last:
            self._last_seq = seq

    def _reject(self, reason: RejectReason, detail: str, seq: int | None, symbol: str | None) -> None:
        s = self.stats
        s.bars_rejected[reason] += 1
        n = s.bars_rejected[reason]
        if _worth_logging(n):
            log.warning("bar_rejected", reason=str(reason), detail=detail, seq=seq, symbol=symbol, count=n)

    def _admit(self, bar: Bar) -> int | None:
        """The bar's symbol index once it is in its window, or None after counting why not."""
        self._seq(bar.seq)
        rejected = check_bar(bar, self._bounds, self.clock.wall_ns(), self._feed_ts)
        if rejected is not None:
            self._reject(rejected.reason, rejected.detail, bar.seq, bar.symbol)
            return None
        i = self.windows.index.get(bar.symbol)
        if i is None:
            self._reject(RejectReason.UNKNOWN_SYMBOL, bar.symbol, bar.seq, bar.symbol)
            return None
        windows = self.windows
        if windows.restored and i in windows.restored:
            gap = windows.resume(i, bar.ts, self._max_gap_ns)
            if gap is not None:
                self.stats.windows_stale += 1
                log.warning(
                    "window_stale",
                    symbol=bar.symbol,
                    gap_s=round(gap / 1e9),
                    max_gap_s=self._max_gap_ns // 1_000_000_000,
                    detail="restored window too old for this bar: warming up again",
                )
        pushed = windows.push(i, bar.ts, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.prev_close)
        if pushed is Push.NOT_AFTER_LAST:
            detail = f"ts {bar.ts} <= last {self.windows.last_ts[i]}"
            self._reject(RejectReason.OUT_OF_ORDER, detail, bar.seq, bar.symbol)
            return None
        if pushed is Push.NON_FINITE:
            detail = f"open={bar.open} high={bar.high} low={bar.low} close={bar.close} volume={bar.volume}"
            self._reject(RejectReason.NON_FINITE_FEATURE, detail, bar.seq, bar.symbol)
            return None
        if self._feed_ts is None or bar.ts > self._feed_ts:
            self._feed_ts = bar.ts
        prev = bar.prev_close
        self._bars.append(
            (bar.symbol, bar.ts, bar.open, bar.high, bar.low, bar.close, bar.volume, math.nan if prev is None else prev)
        )
        return i

    def _chunk_scalar_bars(self) -> None:
        bars, self._bars = self._bars, []
        symbols, ts, o, h, lo, c, v, prev = zip(*bars, strict=True)
        self._bar_chunks.append(
            (
                np.array(symbols, dtype=object),
                np.array(ts, dtype=np.int64),
                tuple(np.array(x, dtype=np.float64) for x in (o, h, lo, c, v)),
                np.array(prev, dtype=np.float64),
            )
        )

    def flush_bars(self) -> None:
        """Journal the bars accepted since the last call as one columnar record (synced with
        the next batch)."""
        if self._bars:
            self._chunk_scalar_bars()
        chunks = self._bar_chunks
        if not chunks:
            return
        self._bar_chunks = []
        if len(chunks) == 1:
            names, ts, columns, prev = chunks[0]
        else:
            names = np.concatenate([chunk[0] for chunk in chunks])
            ts = np.concatenate([chunk[1] for chunk in chunks])
            columns = tuple(np.concatenate([chunk[2][k] for chunk in chunks]) for k in range(5))
            prev = np.concatenate([chunk[3] for chunk in chunks])
        symbols: list[str] = names.tolist()
        ohlcv = np.stack(columns, axis=1)
        self.journal.append(
            rec.Bars(
                ts=self.clock.wall_ns(),
                symbols=symbols,
                bar_ts=ts.astype("<i8").tobytes(),
                ohlcv=np.ascontiguousarray(ohlcv, dtype="<f8").tobytes(),
                prev_close=prev.astype("<f8").tobytes(),
            )
        )

    def on_bars(self, cols: BarColumns, ts_recv: int) -> None:
        """A minute's bars read together, taken at once: the same rules, counts, windows, halts,
        journal and batching as ``on_bar`` bar by bar, over arrays. The rare minute that needs
        bar-by-bar care (a symbol twice, a window restored from a snapshot) goes bar by bar."""
        n = len(cols)
        if not n:
            return
        s = self.stats
        idx = cols.idx
        codes = cols.codes.copy()
        bounds_codes(codes, cols, self._bounds, self.clock.wall_ns(), self._feed_ts)
        ok = codes == 0
        candidates = idx[ok]
        if self.windows.restored or (len(candidates) > 1 and np.bincount(candidates).max() > 1):
            self._bars_one_by_one(cols, codes, ts_recv)
            return
        s.bars_received += n
        if cols.seq is not None:
            self._seqs(cols.seq)
        if not ok.all():
            self._reject_many(codes, cols, CHECK_REASONS)
        at = np.flatnonzero(ok)
        if len(at) == n:  # the usual read: every bar passed, and the columns serve as they are
            o, h, lo, c, v, prev, ts = cols.open, cols.high, cols.low, cols.close, cols.volume, cols.prev_close, cols.ts
        else:
            o, h, lo, c, v, prev = (
                x[at] for x in (cols.open, cols.high, cols.low, cols.close, cols.volume, cols.prev_close)
            )
            ts = cols.ts[at]
        pushed = self.windows.push_many(candidates, ts, o, h, lo, c, v, prev)
        added = pushed == 0
        if not added.all():
            refused = np.zeros(n, dtype=np.uint8)
            refused[at] = pushed
            self._reject_many(refused, cols, _PUSH_REASONS)
            candidates, ts, o, h, lo, c, v, prev = (x[added] for x in (candidates, ts, o, h, lo, c, v, prev))
        k = len(candidates)
        if not k:
            return
        top = int(ts.max())
        if self._feed_ts is None or top > self._feed_ts:
            self._feed_ts = top
        if self._bars:
            self._chunk_scalar_bars()
        self._bar_chunks.append((self._names[candidates], ts, (o, h, lo, c, v), prev))
        s.bars_accepted += k
        s.accuracy.next_close_many(candidates, c)
        self.desk.on_bars(candidates, ts, o, c, prev)
        ready = self.clock.mono_ns()
        s.feed_wait.record_repeated(ready - ts_recv, k)
        full = self.windows.count[candidates] >= self.windows.window
        s.bars_warmup += k - int(full.sum())
        go = candidates[full]
        if not len(go):
            return
        self.idle_event.clear()
        if self.batcher.add_many(go, ts_recv, ts[full], c[full], ready):
            self._flush()
        elif self._timer is None and self._inflight is None:
            self._arm_timer()

    def _bars_one_by_one(self, cols: BarColumns, codes: npt.NDArray[np.uint8], ts_recv: int) -> None:
        for k in range(len(cols)):
            reason = CHECK_REASONS[codes[k]]
            if reason is not None and reason not in _CHECK_BAR_REASONS:
                # Found by the DBN decoder's own rules (the v1 decoder's, which on_bar does not redo).
                self.stats.bars_received += 1
                self._reject(reason, f"bar {k} of a DBN read", None, cols.names[k])
            else:
                self.on_bar(cols.bar(k), ts_recv)

    def _seqs(self, seqs: npt.NDArray[np.int64]) -> None:
        self._seq(int(seqs[0]))
        if len(seqs) > 1:
            step = np.diff(seqs)
            gaps = int(((step != 1) & (step > 0)).sum())
            if gaps:
                self.stats.seq_gaps += gaps
                log.warning("feed_seq_gap", gaps_in_read=gaps, total=self.stats.seq_gaps)
            top = int(seqs.max())
            if self._last_seq is None or top > self._last_seq:
                self._last_seq = top

    def _reject_many(
        self, codes: npt.NDArray[np.uint8], cols: BarColumns, reasons: tuple[RejectReason | None, ...]
    ) -> None:
        counts = np.bincount(codes, minlength=len(reasons))
        for code in np.flatnonzero(counts[1:]).tolist():
            reason = reasons[code + 1]
            assert reason is not None
            before = self.stats.bars_rejected[reason]
            self.stats.bars_rejected[reason] = after = before + int(counts[code + 1])
            if before < 10 or after // 1000 > before // 1000:
                k = int(np.flatnonzero(codes == code + 1)[0])
                log.warning(
                    "bar_rejected",
                    reason=str(reason),
                    detail=f"ts={int(cols.ts[k])} open={cols.open[k]} high={cols.high[k]} low={cols.low[k]}"
                    f" close={cols.close[k]} volume={cols.volume[k]}",
                    symbol=cols.names[k],
                    in_read=int(counts[code + 1]),
                    count=after,
                )

    def on_bar(self, bar: Bar, ts_recv: int) -> None:
        s = self.stats
        s.bars_received += 1
        try:
            i = self._admit(bar)
        except Exception:
            # Counted before it goes on to fail-stop, so received = accepted + rejected even then.
            self._reject(RejectReason.INTERNAL_ERROR, "the daemon failed on this bar", bar.seq, bar.symbol)
            raise
        if i is None:
            return
        s.bars_accepted += 1
        s.accuracy.next_close(i, bar.close)
        self.desk.on_bar(bar.symbol, bar.ts, bar.open, bar.close, bar.prev_close)
        ready = self.clock.mono_ns()
        s.feed_wait.record(ready - ts_recv)
        if not self.windows.full(i):
            s.bars_warmup += 1
            return
        self.idle_event.clear()
        if self.batcher.add(i, ts_recv, bar.ts, bar.close, ready):
            self._flush()
        elif self._timer is None and self._inflight is None:
            self._arm_timer()

    def on_bar_group(self, bars: list[Bar], ts_recv: int, values: npt.NDArray[np.float64] | None = None) -> None:
        self.on_bars(from_bars(bars, self.windows.index, values), ts_recv)

    def on_rejected(self, rejected: Rejected, ts_recv: int) -> None:
        self.stats.bars_received += 1
        if rejected.seq is not None:
            self._seq(rejected.seq)
        self._reject(rejected.reason, rejected.detail, rejected.seq, rejected.symbol)

    def on_minute_end(self, message: MinuteEnd, ts_recv: int) -> None:
        self._seq(message.seq)
        self.flush_bars()
        self.stats.minute_ends += 1
        self._drain = True
        self._flush()

    def on_minute_complete(self, ts: int) -> None:
        """DBN's minute end: every symbol has reported the minute, or the next one began."""
        self.flush_bars()
        self.stats.minute_ends += 1
        self._drain = True
        self._flush()

    def on_heartbeat(self, message: Heartbeat, ts_recv: int) -> None:
        self._seq(message.seq)
        self.stats.heartbeats += 1

    def on_unknown_type(self, message: UnknownType) -> None:
        counts = self.stats.unknown_types
        name = message.type[:UNKNOWN_TYPE_CHARS]
        if name not in counts and len(counts) >= UNKNOWN_TYPES_KEPT:
            name = OTHER_TYPES
        counts[name] += 1
        if _worth_logging(counts[name]):
            log.info("feed_unknown_type", type=name, count=counts[name])

    def on_internal_error(self, exc: BaseException, where: str) -> None:
        """A feed callback raised (a bug, not bad data): count it and hand it to the event loop's
        exception handler, the daemon's fail-stop path."""
        self.stats.feed_internal_errors += 1
        log.error("feed_internal_error", where=where, error=f"{type(exc).__name__}: {exc}")
        asyncio.get_running_loop().call_exception_handler(
            {"message": f"feed {where} callback raised", "exception": exc, "where": where}
        )

    def on_feed_connected(self, feed: FeedProtocol | DbnFeedProtocol) -> None:
        self._feed = feed
        self._feed_paused = False
        self._last_seq = None  # a new session may restart its numbering
        self.stats.feed_connects += 1
        self.feed_connected_event.set()

    def on_feed_lost(self) -> None:
        self._feed = None
        self.stats.feed_disconnects += 1

    def on_frame_error(self, error: FrameError) -> None:
        self.stats.feed_frame_errors[error.reason] += 1
        log.error(
            "feed_frame_error",
            reason=error.reason,
            detail=error.detail,
            action="dropping connection",
        )

    def on_feed_event(self, kind: str, detail: str) -> None:
        log.info("feed_" + kind, detail=detail)

    # -- batching and inference -----------------------------------------------------------

    def _arm_timer(self) -> None:
        deadline = self.batcher.deadline_ns()
        if deadline is None:
            return
        delay = max(0.0, (deadline - self.clock.mono_ns()) / 1e9)
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._flush()

    def _flush(self) -> None:
        """Start the next batch if the engine is free and one is due; else arrange to look again."""
        if self._inflight is not None:
            self._backpressure()
            return
        if not len(self.batcher):
            self._drain = False
            self._check_idle()
            return
        if not (self._drain or self.batcher.due(self.clock.mono_ns())):
            if self._timer is None:
                self._arm_timer()
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._start(self.batcher.take())
        self._backpressure()

    def _start(self, batch: Batch) -> None:
        self.flush_bars()
        n = len(batch)
        engine, bucket, buf = self.engines.input_buffer(n)
        self.windows.gather(batch.symbols, buf[:n])
        ts_start = self.clock.mono_ns()
        self.stats.batch_wait.record_many(ts_start - batch.ts_recv)
        self._inflight = _InFlight(batch, engine, bucket, ts_start)
        future = asyncio.get_running_loop().run_in_executor(self._executor, self.engines.run, engine, bucket, n)
        future.add_done_callback(self._on_inferred)
        # The batch's bars reach the file while it infers, and the disk on the journal's thread:
        # the sync before its orders leave then has only their own records left to flush.
        self.journal.sync_soon()

    def _on_inferred(self, future: asyncio.Future[Outcome]) -> None:
        back = self.clock.mono_ns()
        inflight, self._inflight = self._inflight, None
        assert inflight is not None
        batch = inflight.batch
        n = len(batch)
        s = self.stats
        s.batches += 1
        s.batch_rows += n
        s.batch_size.record(n)
        exc = future.exception()
        if isinstance(exc, RerunFailedError):
            # The switch happened even though the standby failed too: journal it, or a restart
            # would go back to the failed primary.
            self.desk.record_failover(exc.event, rows=n)
        if exc is not None:
            s.infer_failures += 1
            log.error("inference_failed", engine=inflight.engine.name, rows=n, error=str(exc))
        else:
            outcome = future.result()
            s.infer.record(outcome.elapsed_ns)
            if outcome.event is not None:
                self.desk.record_failover(outcome.event, rows=n)
            timing = BatchTiming(inflight.started_ns, back, outcome.elapsed_ns, n, inflight.bucket)
            s.batch_buckets[inflight.bucket] += 1
            # The logits are the engine's buffer: copied, so the next batch can start inferring
            # on the thread while this one's orders are decided here.
            logits = outcome.logits[:n].copy()
            self._flush()
            self._act(batch, logits, outcome.engine, timing)
        self._flush()
        self._backpressure()

    def _backpressure(self) -> None:
        """Stop reading the feed while a batch runs and either a minute has closed or a whole
        batch waits behind it. Live, minutes are a minute apart and this never bites; replayed at
        full speed, it lets each minute be inferred before the next is read, instead of
        superseding it."""
        busy = self._inflight is not None
        pause = busy and (self._drain or len(self.batcher) >= self.batcher.max_batch)
        feed = self._feed
        if feed is None or pause == self._feed_paused:
            return
        self._feed_paused = pause
        self._paused_since = self.clock.mono_ns() if pause else 0
        if pause:
            feed.pause()
        else:
            # Not inline: resuming delivers held-back messages, which must not re-enter here.
            asyncio.get_running_loop().call_soon(feed.resume)

    def stalled(self, bound_ns: int) -> str | None:
        """Why the minute loop is making no progress, or None: a batch in inference past the
        bound, or the feed paused past the bound with nothing in flight to resume it. A daemon
        in either state looks alive and trades nothing; the supervisor stops it instead."""
        now = self.clock.mono_ns()
        inflight = self._inflight
        if inflight is not None and now - inflight.started_ns > bound_ns:
            return f"batch of {len(inflight.batch)} rows in inference for {(now - inflight.started_ns) / 1e9:.1f} s"
        if self._feed_paused and inflight is None and now - self._paused_since > bound_ns:
            return f"feed paused for {(now - self._paused_since) / 1e9:.1f} s with no batch in flight"
        return None

    def drain_now(self) -> None:
        """Send everything waiting to inference now (shutdown, end of a replay)."""
        self._drain = True
        self._flush()

    def trading_a_minute(self) -> bool:
        """A batch is in inference or bars wait for one: the minute's orders are still being made."""
        return self._inflight is not None or bool(len(self.batcher))

    def _check_idle(self) -> None:
        if self._inflight is None and not len(self.batcher):
            self.idle_event.set()

    # -- signals to orders ----------------------------------------------------------------

    @property
    def feed_connected(self) -> bool:
        return self._feed is not None

    @property
    def book(self) -> OrderBook:
        return self.desk.book

    def _act(self, batch: Batch, logits: npt.NDArray[np.float32], engine: str, timing: BatchTiming) -> None:
        s = self.stats
        if not np.isfinite(logits).all():
            s.infer_nonfinite += 1
            log.error("inference_nonfinite", engine=engine, rows=len(batch))
            return
        cls, conf = classify(logits)
        if self.on_calls is not None:
            self.on_calls(batch, cls, conf)
        counts = np.bincount(cls, minlength=3)
        for k, name in enumerate(CLASS_NAMES):
            s.signals[name] += int(counts[k])
        called = np.flatnonzero(cls != HOLD)
        closes = batch.close[called]
        s.accuracy.signal_many(batch.symbols[called], np.where(cls[called] > HOLD, 1, -1), closes)
        rows = np.flatnonzero((cls != HOLD) & (conf >= self.config.signal.confidence_threshold))
        if len(rows):
            self.desk.on_signals(batch, rows, cls, conf, timing)

    def close(self, *, wait: bool = True) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._executor.shutdown(wait=wait, cancel_futures=not wait)
