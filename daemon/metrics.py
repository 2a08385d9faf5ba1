"""Prometheus exposition of ``Stats``: a collector that reads the counters at scrape time.

Nothing is computed per bar for Prometheus; the registry is injected so tests use a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from daemon.stats import LatencyRecorder, Stats


def _histogram(name: str, doc: str, rec: LatencyRecorder) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, n in zip(rec.bounds_ns, rec.buckets, strict=False):
        cumulative += n
        buckets.append((f"{bound / 1e9:.6g}", cumulative))
    buckets.append(("+Inf", rec.count))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=rec.sum_ns / 1e9)


class StatsCollector(Collector):
    def __init__(
        self, stats: Stats, active_engine: Callable[[], str], desk_state: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        self._stats = stats
        self._active_engine = active_engine
        self._desk_state = desk_state

    def collect(self) -> Iterator[Any]:
        s = self._stats
        bars = CounterMetricFamily("tradingd_bars", "Bars by outcome", labels=["outcome"])
        bars.add_metric(["accepted"], s.bars_accepted)
        bars.add_metric(["rejected"], sum(s.bars_rejected.values()))
        yield bars
        rejected = CounterMetricFamily("tradingd_bar_rejections", "Rejected bars by reason", labels=["reason"])
        for reason, n in s.bars_rejected.items():
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily("tradingd_feed_gaps", "Feed sequence gaps", value=s.seq_gaps)
        yield CounterMetricFamily("tradingd_feed_reconnects", "Feed connections made", value=s.feed_connects)
        yield CounterMetricFamily("tradingd_batches", "Inference batches", value=s.batches)
        signals = CounterMetricFamily("tradingd_signals", "Signals by class", labels=["class"])
        for cls, n in s.signals.items():
            signals.add_metric([cls], n)
        yield signals
        orders = CounterMetricFamily("tradingd_orders", "Orders by outcome", labels=["outcome"])
        orders.add_metric(["sent"], s.orders_sent)
        orders.add_metric(["denied"], sum(s.orders_denied.values()))
        orders.add_metric(["filled"], s.orders_filled)
        orders.add_metric(["rejected"], s.orders_rejected)
        yield orders
        denied = CounterMetricFamily("tradingd_order_denials", "Denied orders by reason", labels=["reason"])
        for reason, n in s.orders_denied.items():
            denied.add_metric([reason], n)
        yield denied
        yield _histogram("tradingd_tick_to_order_seconds", "Bar received to order sent", s.tick_to_order)
        yield _histogram("tradingd_inference_seconds", "Engine inference per batch", s.infer)
        yield _histogram("tradingd_batch_wait_seconds", "Bar received to batch start", s.batch_wait)
        for name, doc, value in (
            ("tradingd_halts", "Halts latched (symbol and market)", s.halts),
            ("tradingd_kills", "Kill switch activations", s.kills),
            ("tradingd_reviews_parked", "Orders parked for manual review", s.reviews_parked),
            ("tradingd_reviews_approved", "Parked orders approved", s.reviews_approved),
            ("tradingd_reviews_rejected", "Parked orders rejected", s.reviews_rejected),
            ("tradingd_reviews_expired", "Parked orders expired unanswered", s.reviews_expired),
            (
                "tradingd_reconcile_differences",
                "Differences found reconciling with the broker",
                s.reconcile_differences,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        if self._desk_state is not None:
            desk = self._desk_state()
            yield GaugeMetricFamily("tradingd_halted_symbols", "Symbols halted now", value=len(desk["halted"]))
            yield GaugeMetricFamily(
                "tradingd_market_halted", "1 while the whole market is halted", value=float(desk["market"] == "halted")
            )
            yield GaugeMetricFamily("tradingd_kill_switch", "1 while the kill switch is on", value=float(desk["kill"]))
            yield GaugeMetricFamily(
                "tradingd_review_queue_depth", "Orders waiting for review", value=desk["review_queue"]
            )
            yield GaugeMetricFamily(
                "tradingd_review_oldest_seconds",
                "Age of the oldest order waiting for review",
                value=desk["review_oldest_s"],
            )
            yield GaugeMetricFamily(
                "tradingd_broker_connected",
                "1 while the broker connection is up and reconciled",
                value=float(desk["broker_connected"] and desk["reconciled"]),
            )
        engine = GaugeMetricFamily("tradingd_active_engine", "Engine serving inference", labels=["engine"])
        engine.add_metric([self._active_engine()], 1)
        yield engine
