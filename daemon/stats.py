"""The daemon's counters and latency recorders: plain values, cheap to update on the hot path.

Prometheus reads them at scrape time (``daemon.metrics``) and the demo summary reads them at the
end, so each event is counted exactly once.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

# Latency buckets in ns: dense from 10 us to 10 ms, then a tail to 1 s.
LATENCY_BOUNDS_NS: tuple[int, ...] = tuple(
    int(us * 1000)
    for us in (
        10,
        25,
        50,
        75,
        100,
        150,
        200,
        300,
        400,
        500,
        750,
        1000,
        1500,
        2000,
        2500,
        3000,
        4000,
        5000,
        7500,
        10_000,
        25_000,
        100_000,
        1_000_000,
    )
)


BATCH_SIZE_BOUNDS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class LatencyRecorder:
    """Cumulative bucket counts since start, plus the most recent samples for percentiles."""

    def __init__(self, capacity: int = 1 << 18, bounds_ns: tuple[int, ...] = LATENCY_BOUNDS_NS) -> None:
        self.bounds_ns = bounds_ns
        self.buckets = [0] * (len(bounds_ns) + 1)
        self.count = 0
        self.sum_ns = 0
        self.max_ns = 0
        # Written through now (np.full, not calloc's untouched pages), so a fresh daemon's first
        # minutes do not page-fault their way through the samples on the hot path.
        self._samples = np.full(capacity, 0, dtype=np.int64)

    def record(self, ns: int) -> None:
        self.buckets[bisect.bisect_left(self.bounds_ns, ns)] += 1
        self._samples[self.count % len(self._samples)] = ns
        self.count += 1
        self.sum_ns += ns
        self.max_ns = max(self.max_ns, ns)

    def record_repeated(self, ns: int, n: int) -> None:
        """``record(ns)`` ``n`` times (the bars of one read, all ready at once)."""
        if n <= 0:
            return
        self.buckets[bisect.bisect_left(self.bounds_ns, ns)] += n
        cap = len(self._samples)
        start = self.count % cap
        if n >= cap:
            self._samples[:] = ns
        elif start + n <= cap:
            self._samples[start : start + n] = ns
        else:
            self._samples[start:] = ns
            self._samples[: start + n - cap] = ns
        self.count += n
        self.sum_ns += ns * n
        self.max_ns = max(self.max_ns, ns)

    def record_many(self, ns: npt.NDArray[np.int64]) -> None:
        """``record`` for each of ``ns`` (a minute's bars at once)."""
        n = len(ns)
        if not n:
            return
        counts = np.bincount(np.searchsorted(self.bounds_ns, ns, side="left"), minlength=len(self.buckets))
        for k in np.flatnonzero(counts).tolist():
            self.buckets[k] += int(counts[k])
        cap = len(self._samples)
        at = (self.count + np.arange(n)) % cap if n < cap else np.arange(self.count, self.count + n) % cap
        self._samples[at[-cap:]] = ns[-cap:]
        self.count += n
        self.sum_ns += int(ns.sum())
        self.max_ns = max(self.max_ns, int(ns.max()))

    def samples(self) -> np.ndarray:
        return self._samples[: min(self.count, len(self._samples))]

    def summary_us(self) -> dict[str, float | int | None]:
        """p50, p99, max in microseconds (percentiles over the retained samples)."""
        s = self.samples()
        if not len(s):
            return {"count": 0, "p50": None, "p99": None, "max": None}
        p50, p99 = np.percentile(s, [50, 99])
        return {
            "count": self.count,
            "p50": round(float(p50) / 1000, 1),
            "p99": round(float(p99) / 1000, 1),
            "max": round(self.max_ns / 1000, 1),
        }


class SignalAccuracy:
    """Rolling direction accuracy over the last ``window`` judged signals, by the one definition
    the backtest, the report and the alert use (``daemon.backtest.metrics.ACCURACY_DEFINITION``):
    a buy or sell signal is right when the symbol's next close moves its way; a flat next close
    counts as wrong; holds are not judged."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._hits: deque[bool] = deque(maxlen=window)
        # Per symbol slot: the pending signal's direction (+1 buy, -1 sell, 0 none) and close.
        self._direction = np.zeros(0, dtype=np.int8)
        self._then = np.zeros(0, dtype=np.float64)
        self.judged = 0

    def _fit(self, n: int) -> None:
        if n > len(self._direction):
            size = max(n, 2 * len(self._direction))
            self._direction = np.concatenate((self._direction, np.zeros(size - len(self._direction), np.int8)))
            self._then = np.concatenate((self._then, np.zeros(size - len(self._then))))

    def signal(self, symbol: int, direction: int, close: float) -> None:
        self._fit(symbol + 1)
        self._direction[symbol] = direction
        self._then[symbol] = close

    def signal_many(self, symbols: npt.NDArray[np.int64], directions: npt.NDArray[np.int64], closes: Any) -> None:
        if len(symbols):
            self._fit(int(symbols.max()) + 1)
            self._direction[symbols] = directions
            self._then[symbols] = closes

    def next_close(self, symbol: int, close: float) -> None:
        if symbol >= len(self._direction) or not self._direction[symbol]:
            return
        direction, then = self._direction[symbol], self._then[symbol]
        self._direction[symbol] = 0
        self._hits.append(bool(close > then if direction > 0 else close < then))
        self.judged += 1

    def next_close_many(self, symbols: npt.NDArray[np.int64], closes: npt.NDArray[np.float64]) -> None:
        """``next_close`` for bars of distinct symbols."""
        if not len(symbols):
            return
        self._fit(int(symbols.max()) + 1)
        direction = self._direction[symbols]
        pending = direction != 0
        if not pending.any():
            return
        at, d, now = symbols[pending], direction[pending], closes[pending]
        self._hits.extend(np.where(d > 0, now > self._then[at], now < self._then[at]).tolist())
        self._direction[at] = 0
        self.judged += len(at)

    def value(self) -> float | None:
        return sum(self._hits) / len(self._hits) if self._hits else None


# Per order, in this order: tick-to-order, its stages (which add up to it), the engine's own time
# for the order's batch, and that batch's rows and bucket.
STAGES = ("t2o", "feed_wait", "batch_wait", "inference", "gates", "journal", "send", "engine", "rows", "bucket")
STAGE_NAMES = STAGES[1:7]


class OrderStages:
    """Every order's latency split into stages, kept in a ring of the newest ``capacity``:

    - ``feed_wait``: bar read from the socket -> in its feature window;
    - ``batch_wait``: -> its batch handed to the inference thread;
    - ``inference``: -> the batch's result back on the event loop (the engine's ``engine`` time
      and the thread hand-offs);
    - ``gates``: -> the batch's decisions made;
    - ``journal``: -> the batch's records synced (the fsync policy's cost);
    - ``send``: -> this order written to the gateway.

    Overhead per order is its tick-to-order less its own batch's engine time: what the daemon
    costs. Percentiles are taken over these per-order values, never differences of percentiles.
    """

    def __init__(self, capacity: int = 1 << 18) -> None:
        self._rows = np.full((capacity, len(STAGES)), 0, dtype=np.int64)  # touched now, as LatencyRecorder's
        self.count = 0

    def record(self, ts_recv: int, ts_ready: int, timing: Any, decided: int, synced: int, sent: int) -> None:
        """One order's stages (``record_many`` of one)."""
        self.record_many(np.array([ts_recv]), np.array([ts_ready]), timing, decided, synced, sent)

    def record_many(
        self,
        ts_recv: npt.NDArray[np.int64],
        ts_ready: npt.NDArray[np.int64],
        timing: Any,
        decided: int,
        synced: int,
        sent: int,
    ) -> None:
        """``record`` for orders of one batch, sent together."""
        n = len(ts_recv)
        if not n:
            return
        cap = len(self._rows)
        rows = np.empty((n, len(STAGES)), dtype=np.int64)
        rows[:, 0] = sent - ts_recv
        rows[:, 1] = ts_ready - ts_recv
        rows[:, 2] = timing.started_ns - ts_ready
        rows[:, 3] = timing.back_ns - timing.started_ns
        rows[:, 4] = decided - timing.back_ns
        rows[:, 5] = synced - decided
        rows[:, 6] = sent - synced
        rows[:, 7] = timing.engine_ns
        rows[:, 8] = timing.rows
        rows[:, 9] = timing.bucket
        at = np.arange(self.count, self.count + n) % cap
        self._rows[at[-cap:]] = rows[-cap:]
        self.count += n

    def table(self) -> npt.NDArray[np.int64]:
        """The retained rows, [n, len(STAGES)], oldest first."""
        n, cap = self.count, len(self._rows)
        if n <= cap:
            return self._rows[:n].copy()
        k = n % cap
        return np.concatenate((self._rows[k:], self._rows[:k]))

    def summary_us(self) -> dict[str, Any]:
        """Percentiles (µs) of tick-to-order, overhead and each stage over the retained orders."""
        t = self.table()

        def pct(values: npt.NDArray[np.int64], qs: tuple[float, ...] = (50, 99)) -> dict[str, float | None]:
            if not len(values):
                return {f"p{q:g}".replace(".", ""): None for q in qs}
            got = np.percentile(values / 1000.0, qs)
            return {f"p{q:g}".replace(".", ""): round(float(v), 1) for q, v in zip(qs, got, strict=True)}

        return {
            "orders": len(t),
            "t2o_us": {
                **pct(t[:, 0], (50, 90, 99, 99.9)),
                "max": round(float(t[:, 0].max()) / 1000, 1) if len(t) else None,
            },
            "overhead_us": pct(t[:, 0] - t[:, 7]),
            "stages_us": {name: pct(t[:, k + 1]) for k, name in enumerate(STAGE_NAMES)},
        }


@dataclass(slots=True)
class Stats:
    bars_received: int = 0
    bars_accepted: int = 0
    bars_rejected: Counter[str] = field(default_factory=Counter)
    bars_warmup: int = 0  # accepted while the symbol's window was still filling
    # By name for the first runtime.UNKNOWN_TYPES_KEPT names, the rest under "(other)".
    unknown_types: Counter[str] = field(default_factory=Counter)
    feed_internal_errors: int = 0  # feed callbacks that raised (bugs, sent to fail-stop)
    seq_gaps: int = 0
    minute_ends: int = 0
    heartbeats: int = 0
    feed_connects: int = 0
    feed_disconnects: int = 0
    feed_frame_errors: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    infer_failures: int = 0
    infer_nonfinite: int = 0
    batch_rows: int = 0
    signals: Counter[str] = field(default_factory=lambda: Counter({"sell": 0, "hold": 0, "buy": 0}))
    intents: int = 0
    orders_sent: int = 0
    orders_denied: Counter[str] = field(default_factory=Counter)
    orders_acked: int = 0
    orders_filled: int = 0
    orders_rejected: int = 0
    orders_canceled: int = 0
    fills: int = 0
    reports_ignored: Counter[str] = field(default_factory=Counter)  # repeats, late words, unknown orders
    reports_inconsistent: Counter[str] = field(default_factory=Counter)  # contradictions: symbol -> REDUCING
    fail_stops: int = 0
    windows_stale: int = 0  # restored windows too old for the next bar: warming up again
    snapshots: int = 0
    restore_skipped: int = 0  # journal records about symbols no longer in the universe
    sends_failed: int = 0  # orders the gateway could not write (closed as never sent)
    broker_connects: int = 0
    reconcile_differences: int = 0
    halts: int = 0
    kills: int = 0
    cancels_sent: int = 0
    reviews_parked: int = 0
    reviews_approved: int = 0
    reviews_rejected: int = 0
    reviews_expired: int = 0
    broker_disconnects: int = 0
    failovers: Counter[str] = field(default_factory=Counter)
    rerun_batches: int = 0
    # The stages of tick-to-order: bar read -> bar in its window (feed_wait) -> batch start
    # (batch_wait) -> logits (infer) -> orders decided (gates) -> journaled and written (send).
    tick_to_order: LatencyRecorder = field(default_factory=LatencyRecorder)
    feed_wait: LatencyRecorder = field(default_factory=LatencyRecorder)
    batch_wait: LatencyRecorder = field(default_factory=LatencyRecorder)
    infer: LatencyRecorder = field(default_factory=LatencyRecorder)
    gates: LatencyRecorder = field(default_factory=LatencyRecorder)
    send: LatencyRecorder = field(default_factory=LatencyRecorder)
    batch_size: LatencyRecorder = field(default_factory=lambda: LatencyRecorder(1 << 12, BATCH_SIZE_BOUNDS))
    accuracy: SignalAccuracy = field(default_factory=lambda: SignalAccuracy(500))
    stages: OrderStages = field(default_factory=OrderStages)
    orders_batch_gated: int = 0  # orders the batch gates let go at once (the rest: one by one)
    batch_buckets: Counter[int] = field(default_factory=Counter)  # batches by the bucket they ran in
    # The deploy gate's word on the model serving (set at start): qualified or traded anyway,
    # the accuracy it qualified with, and the live accuracy the alert fires under.
    model_qualified: bool | None = None
    qualified_accuracy: float | None = None
    accuracy_alert_below: float | None = None
