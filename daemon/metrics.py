"""Prometheus exposition: one collector that reads the daemon's plain counters at scrape time.

Nothing is computed per bar for Prometheus, and the registry is injected (tests use a fresh
one). Every label value is known at start-up (reasons are enums, engines are primary and
standby), and each is exported from the first scrape on, at zero, so no per-bar or per-symbol
label can appear and every rate() has a series to start from.

Latency histograms have explicit buckets dense from 10 µs to 10 ms (``daemon.stats``), one per
stage of tick-to-order: feed wait (bar read to bar in its window), batch wait (to batch start),
inference, gates (logits to orders decided) and send (journal commit and socket writes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from daemon.feed.protocol import RejectReason
from daemon.stats import LatencyRecorder, Stats
from daemon.version import build_info
from risk.failover import FailoverReason
from risk.gates import DenyReason

if TYPE_CHECKING:
    from engines.gpu_health import GpuMonitor

ENGINE_ROLES = ("primary", "standby")
STAGES = ("feed_wait", "batch_wait", "infer", "gates", "send")


def _histogram(name: str, doc: str, rec: LatencyRecorder, scale: float = 1e-9) -> HistogramMetricFamily:
    # One copy of the counts (a single C-level copy, atomic under the GIL while the loop records),
    # and +Inf is their sum: the buckets are monotonic and end at the count by construction, however
    # a scrape interleaves with ``record``.
    counts = list(rec.buckets)
    cumulative, buckets = 0, []
    for bound, n in zip(rec.bounds_ns, counts, strict=False):
        cumulative += n
        buckets.append((f"{bound * scale:.6g}", cumulative))
    buckets.append(("+Inf", sum(counts)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=rec.sum_ns * scale)


def _counter(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, n in values.items():
        family.add_metric([key], n)
    return family


class StatsCollector(Collector):
    def __init__(
        self,
        stats: Stats,
        engines_state: Callable[[], dict[str, Any]] | None = None,
        desk_state: Callable[[], dict[str, Any]] | None = None,
        gpu: GpuMonitor | None = None,
        journal_bytes: Callable[[], int] | None = None,
    ) -> None:
        self._stats = stats
        self._engines_state = engines_state
        self._desk_state = desk_state
        self._gpu = gpu
        self._journal_bytes = journal_bytes
        self._build = build_info().fields()

    def collect(self) -> Iterator[Any]:
        s = self._stats
        yield InfoMetricFamily(
            "tradingd_build",
            "The running build: version, git commit, and the ONNX Runtime, numpy, TensorRT and cuda-bindings in use",
            value=self._build,
        )
        yield _counter(
            "tradingd_bars",
            "Bars by outcome",
            "outcome",
            {"accepted": s.bars_accepted, "rejected": sum(s.bars_rejected.values()), "warmup": s.bars_warmup},
        )
        yield _counter(
            "tradingd_bar_rejections",
            "Rejected bars by reason",
            "reason",
            {str(r): s.bars_rejected[str(r)] for r in RejectReason},
        )
        yield CounterMetricFamily("tradingd_feed_gaps", "Feed sequence gaps", value=s.seq_gaps)
        yield CounterMetricFamily(
            "tradingd_feed_minute_ends", "Minutes closed by the feed (minute_end)", value=s.minute_ends
        )
        yield _counter(
            "tradingd_reconnects",
            "Connections made, by peer",
            "peer",
            {"feed": s.feed_connects, "broker": s.broker_connects},
        )
        yield _counter(
            "tradingd_disconnects",
            "Connections lost, by peer",
            "peer",
            {"feed": s.feed_disconnects, "broker": s.broker_disconnects},
        )
        yield CounterMetricFamily("tradingd_batches", "Inference batches", value=s.batches)
        yield _counter(
            "tradingd_inference_failures",
            "Batches whose inference failed (after any failover re-run)",
            "kind",
            {"exception": s.infer_failures, "nonfinite": s.infer_nonfinite},
        )
        yield _counter(
            "tradingd_signals", "Signals by class", "class", {c: s.signals[c] for c in ("sell", "hold", "buy")}
        )
        yield _counter(
            "tradingd_orders",
            "Orders by outcome",
            "outcome",
            {
                "sent": s.orders_sent,
                "denied": sum(s.orders_denied.values()),
                "parked": s.reviews_parked,
                "filled": s.orders_filled,
                "rejected": s.orders_rejected,
                "canceled": s.orders_canceled,
            },
        )
        yield _counter(
            "tradingd_order_denials",
            "Denied orders by reason",
            "reason",
            {str(r): s.orders_denied[str(r)] for r in DenyReason} | dict(s.orders_denied),
        )
        yield CounterMetricFamily("tradingd_fills", "Execution reports with a fill", value=s.fills)
        yield _counter(
            "tradingd_exec_reports_refused",
            "Execution reports not applied: repeats and late words (ignored), contradictions (inconsistent)",
            "kind",
            {"ignored": sum(s.reports_ignored.values()), "inconsistent": sum(s.reports_inconsistent.values())},
        )
        yield CounterMetricFamily(
            "tradingd_feed_internal_errors",
            "Feed messages whose handling raised (counted as rejected bars; the daemon fail-stops on them)",
            value=s.feed_internal_errors,
        )
        yield CounterMetricFamily(
            "tradingd_sends_failed", "Orders the gateway could not write (closed as never sent)", value=s.sends_failed
        )
        yield _counter(
            "tradingd_reviews",
            "Orders through manual review, by action",
            "action",
            {
                "parked": s.reviews_parked,
                "approved": s.reviews_approved,
                "rejected": s.reviews_rejected,
                "expired": s.reviews_expired,
            },
        )
        yield _histogram("tradingd_tick_to_order_seconds", "Bar read to order written to the broker", s.tick_to_order)
        stage = {
            "feed_wait": s.feed_wait,
            "batch_wait": s.batch_wait,
            "infer": s.infer,
            "gates": s.gates,
            "send": s.send,
        }
        docs = {
            "feed_wait": "Bar read from the socket to bar in its window",
            "batch_wait": "Bar read to its batch starting inference",
            "infer": "Engine inference per batch (a failover re-run included)",
            "gates": "Logits to every order of the batch decided",
            "send": "Journal group commit and socket writes per batch",
        }
        for name in STAGES:
            metric = "inference" if name == "infer" else name
            yield _histogram(f"tradingd_{metric}_seconds", docs[name], stage[name])
        yield _histogram("tradingd_batch_size", "Rows per inference batch", s.batch_size, scale=1.0)
        for name, doc, value in (
            ("tradingd_halts", "Halts latched (symbol and market)", s.halts),
            ("tradingd_kills", "Kill switch activations", s.kills),
            (
                "tradingd_reconcile_differences",
                "Differences found reconciling with the broker",
                s.reconcile_differences,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield _counter(
            "tradingd_failovers",
            "Engine switches by reason",
            "reason",
            {str(r): s.failovers[str(r)] for r in FailoverReason},
        )
        yield CounterMetricFamily(
            "tradingd_failover_rerun_batches",
            "Batches re-run on the standby after a primary fault",
            value=s.rerun_batches,
        )
        accuracy = s.accuracy.value()
        if accuracy is not None:
            yield GaugeMetricFamily(
                "tradingd_signal_accuracy",
                f"Share of the last {s.accuracy.window} buy/sell signals the next close-to-close move confirmed",
                value=accuracy,
            )
        yield CounterMetricFamily(
            "tradingd_signals_judged", "Buy/sell signals judged against the next move", value=s.accuracy.judged
        )
        if s.accuracy_alert_below is not None:
            yield GaugeMetricFamily(
                "tradingd_signal_accuracy_alert_below",
                "The live accuracy the model must keep: the larger of the configured floor and its qualified"
                " accuracy less the margin ([qualification])",
                value=s.accuracy_alert_below,
            )
        if s.qualified_accuracy is not None:
            yield GaugeMetricFamily(
                "tradingd_model_qualified_accuracy",
                "Direction accuracy the serving model qualified with (tradingd backtest)",
                value=s.qualified_accuracy,
            )
        if s.model_qualified is not None:
            yield GaugeMetricFamily(
                "tradingd_model_unqualified",
                "1 when the serving model has no passing qualification and trades only because"
                " engine.allow_unqualified = true",
                value=0.0 if s.model_qualified else 1.0,
            )
        if self._journal_bytes is not None:
            yield GaugeMetricFamily("tradingd_journal_bytes", "Size of the journal file", value=self._journal_bytes())
        if self._desk_state is not None:
            yield from _desk_metrics(self._desk_state())
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


def _desk_metrics(desk: dict[str, Any]) -> Iterator[Any]:
    yield GaugeMetricFamily("tradingd_halted_symbols", "Symbols halted now", value=len(desk["halted"]))
    yield GaugeMetricFamily(
        "tradingd_market_halted", "1 while the whole market is halted", value=float(desk["market"] == "halted")
    )
    yield GaugeMetricFamily("tradingd_kill_switch", "1 while the kill switch is on", value=float(desk["kill"]))
    yield GaugeMetricFamily("tradingd_review_queue_depth", "Orders waiting for review", value=desk["review_queue"])
    yield GaugeMetricFamily(
        "tradingd_review_oldest_seconds", "Age of the oldest order waiting for review", value=desk["review_oldest_s"]
    )
    yield GaugeMetricFamily(
        "tradingd_broker_connected",
        "1 while the broker connection is up and reconciled",
        value=float(desk["broker_connected"] and desk["reconciled"]),
    )
    yield GaugeMetricFamily("tradingd_working_orders", "Orders sent and not yet final", value=desk["working_orders"])


def _gpu_metrics(monitor: GpuMonitor) -> Iterator[Any]:
    g = monitor.latest
    assert g is not None
    gpu = str(g.index)
    util = None if g.utilization_pct is None else g.utilization_pct / 100
    for name, doc, value in (
        ("tradingd_gpu_temperature_celsius", "GPU temperature", g.temperature_c),
        ("tradingd_gpu_utilization_ratio", "GPU utilisation (0-1)", util),
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
