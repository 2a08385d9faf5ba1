"""Prometheus exposition of ``Stats``: a collector that reads the counters at scrape time.

Nothing is computed per bar for Prometheus; the registry is injected so tests use a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from daemon.stats import LatencyRecorder, Stats

if TYPE_CHECKING:
    from engines.gpu_health import GpuMonitor

ENGINE_ROLES = ("primary", "standby")
FAILOVER_REASONS = ("exception", "nonfinite", "deadline", "gpu_health", "unavailable", "operator")


def _histogram(name: str, doc: str, rec: LatencyRecorder) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, n in zip(rec.bounds_ns, rec.buckets, strict=False):
        cumulative += n
        buckets.append((f"{bound / 1e9:.6g}", cumulative))
    buckets.append(("+Inf", rec.count))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=rec.sum_ns / 1e9)


class StatsCollector(Collector):
    def __init__(
        self,
        stats: Stats,
        engines_state: Callable[[], dict[str, Any]] | None = None,
        desk_state: Callable[[], dict[str, Any]] | None = None,
        gpu: GpuMonitor | None = None,
    ) -> None:
        self._stats = stats
        self._engines_state = engines_state
        self._desk_state = desk_state
        self._gpu = gpu

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
        failovers = CounterMetricFamily("tradingd_failovers", "Engine switches by reason", labels=["reason"])
        for reason in FAILOVER_REASONS:
            failovers.add_metric([reason], s.failovers[reason])
        yield failovers
        yield CounterMetricFamily(
            "tradingd_failover_rerun_batches",
            "Batches re-run on the standby after a primary fault",
            value=s.rerun_batches,
        )
        if self._engines_state is not None:
            state = self._engines_state()
            active = GaugeMetricFamily(
                "tradingd_active_engine", "1 for the engine serving inference", labels=["engine"]
            )
            loaded = GaugeMetricFamily("tradingd_engine_loaded", "1 for each engine loaded and warm", labels=["engine"])
            for role in ENGINE_ROLES:
                active.add_metric([role], float(state["active"] == role))
                one = state.get(role)
                loaded.add_metric([role], float(bool(one and one.get("loaded"))))
            yield active
            yield loaded
        if self._gpu is not None and self._gpu.latest is not None:
            yield from _gpu_metrics(self._gpu)


def _gpu_metrics(monitor: GpuMonitor) -> Iterator[Any]:
    g = monitor.latest
    assert g is not None
    gpu = str(g.index)
    for name, doc, value in (
        ("tradingd_gpu_temperature_celsius", "GPU temperature", g.temperature_c),
        (
            "tradingd_gpu_utilization_ratio",
            "GPU utilisation (0-1)",
            None if g.utilization_pct is None else g.utilization_pct / 100,
        ),
        ("tradingd_gpu_memory_used_bytes", "GPU memory in use", g.memory_used_bytes),
        ("tradingd_gpu_memory_total_bytes", "GPU memory", g.memory_total_bytes),
        ("tradingd_gpu_sm_clock_hertz", "GPU SM clock", None if g.sm_clock_mhz is None else g.sm_clock_mhz * 1e6),
        ("tradingd_gpu_power_watts", "GPU power draw", g.power_w),
        ("tradingd_gpu_ecc_enabled", "1 while ECC is on", None if g.ecc_enabled is None else float(g.ecc_enabled)),
        (
            "tradingd_gpu_remapped_rows_uncorrectable",
            "Rows remapped for uncorrectable errors",
            g.remapped_rows_uncorrectable,
        ),
        ("tradingd_gpu_faulted", "1 once a GPU health fault was seen", float(monitor.faulted is not None)),
    ):
        if value is not None:
            family = GaugeMetricFamily(name, doc, labels=["gpu"])
            family.add_metric([gpu], float(value))
            yield family
    ecc = GaugeMetricFamily("tradingd_gpu_ecc_errors", "ECC error counts", labels=["gpu", "kind", "counter"])
    for kind in ("uncorrected", "corrected"):
        for counter in ("volatile", "aggregate"):
            value = getattr(g, f"ecc_{counter}_{kind}")
            if value is not None:
                ecc.add_metric([gpu, kind, counter], float(value))
    yield ecc
    xids = CounterMetricFamily("tradingd_gpu_xid_events", "Xid critical error events seen", labels=["gpu"])
    xids.add_metric([gpu], len(monitor.xids))
    yield xids
