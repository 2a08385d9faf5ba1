"""Open-loop tick-to-order harness: feed → daemon → broker simulator, all on 127.0.0.1.

    python -m bench.harness --scenario burst --symbols 100 --minutes 60 [--budget-ms 5] [--json-out F]

The harness is the feed. Every bar has an *intended* send time fixed before the run (minute m
of the scenario at ``t0 + m * period``, its bars spread over the first ``--burst-ms`` of it);
it sends each bar at that time or, when it falls behind, as soon as it can, and a late send
counts against the system, not as a skipped sample (no coordinated omission). Tick-to-order is
the broker simulator's receive time of an order minus the intended send time of the bar that
caused it (the daemon's journal links the order to its bar). The daemon runs as its own process
(``tradingd run``), and the broker simulator as another.

Scenarios: ``steady`` (one symbol, one bar per period), ``burst`` (S symbols each minute, then
``minute_end``), ``overload`` (a burst at 10x the rate), ``real`` (a CSV of real minute bars,
``--minutes 0`` for all of it). Baselines: ``--no-batching`` (one
inference per bar), ``--loop asyncio`` (the default event loop instead of uvloop).
``--stall-ms`` stops the daemon (SIGSTOP) for that long at the middle minute, to show that the
harness reports what the stall cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
from hdrh.histogram import HdrHistogram

from broker.journal import read_journal
from broker.records import per_order
from broker.sim import read_orders
from daemon.admin import request
from daemon.feed.protocol import Bar, bar_map, minute_end_map
from daemon.feed.replay import load_csv, symbols_of
from daemon.feed.synth import SynthParams, generate

NS = 1_000_000_000
T_FIRST = 1_767_625_200 * NS  # feed time of the first bar's close (2026-01-05 14:00 UTC)


@dataclass(frozen=True)
class Options:
    scenario: str = "burst"
    symbols: int = 100
    minutes: int = 60
    period_ms: float = 250.0  # wall time between two feed minutes
    burst_ms: float = 5.0  # the bars of a minute go out over this long
    batching: bool = True
    loop: str = "uvloop"
    stall_ms: float = 0.0
    seed: int = 1
    data: str = ""  # the CSV of the "real" scenario
    sample_s: float = 0.0  # soak: sample the daemon's RSS and open fds this often (0: off)
    engine: str = "onnxruntime"  # or "timing": sleeps the H200's GPU time per bucket, costs no CPU
    feed: str = "msgpack"  # or "dbn"
    fsync: str = "batch"  # the journal's fsync policy (the daemon's default)
    max_delay_us: int = 1000  # batch.max_delay_us (0: a batch starts whenever the engine is free)
    switch_interval_us: int = 500  # process.switch_interval_us (the daemon's default)
    pin: bool = False  # the daemon on CPUs 1.., the harness and broker simulator on CPU 0


@dataclass
class Report:
    options: dict[str, Any]
    bars_sent: int = 0
    orders: int = 0
    orders_per_s: float = 0.0
    drops: dict[str, int] = field(default_factory=dict)
    tick_to_order_us: dict[str, float] = field(default_factory=dict)
    daemon_us: dict[str, Any] = field(default_factory=dict)
    engine: str = ""
    model_qualified: bool | None = None
    orders_latency: dict[str, Any] = field(default_factory=dict)
    batches: dict[str, Any] = field(default_factory=dict)
    soak: dict[str, Any] = field(default_factory=dict)
    late_sends: int = 0
    max_send_lag_us: float = 0.0
    wall_s: float = 0.0


def _plan(o: Options) -> tuple[list[str], list[list[Bar]]]:
    if o.scenario == "real":
        loaded = load_csv(Path(o.data))
        return list(symbols_of(loaded)), [list(m.bars) for m in loaded[: o.minutes or None]]
    symbols_n = 1 if o.scenario == "steady" else o.symbols
    universe = generate(SynthParams(symbols=symbols_n, minutes=o.minutes, seed=o.seed))
    names = list(universe)
    minutes: list[list[Bar]] = []
    seq = 0
    for m in range(o.minutes):
        ts = T_FIRST + m * 60 * NS
        bars = []
        for name in names:
            op, hi, lo, cl, vol = (float(x) for x in universe[name][m])
            seq += 1
            bars.append(Bar(seq, name, ts, op, hi, lo, cl, vol))
        seq += 1
        minutes.append(bars)
    return names, minutes


class Driver:
    """The feed server: sends each bar at its intended time, open-loop."""

    def __init__(self, o: Options, minutes: list[list[Bar]]) -> None:
        self.o = o
        self.minutes = minutes
        self.slot: dict[tuple[str, int], tuple[int, int]] = {}  # (symbol, ts_event) -> (minute, place in it)
        self.t0: int | None = None  # wall ns the first minute starts
        self.done = asyncio.Event()
        self.finished = asyncio.Event()
        self.connected = asyncio.Event()
        self.late = 0
        self.max_lag_ns = 0
        self.daemon_pid: int | None = None
        period = self.o.period_ms / (10.0 if o.scenario == "overload" else 1.0)
        self.period_ns = int(period * 1e6)

    def _dbn(self) -> tuple[bytes, list[list[bytes]]]:
        """The minutes as DBN: the metadata and symbol mappings, then each bar's 56-byte record."""
        from daemon.feed import dbn  # noqa: PLC0415

        names = sorted({b.symbol for m in self.minutes for b in m})
        ids = {name: k for k, name in enumerate(names, start=1)}
        first = self.minutes[0][0].ts - 60 * NS
        end = self.minutes[-1][0].ts
        symbols = {k: name for name, k in ids.items()}
        prologue = dbn.ohlcv_metadata(symbols, first, end).encode() + dbn.symbol_mapping_records(symbols, 3, first, end)
        out = []
        for bars in self.minutes:
            records = dbn.make_ohlcv(
                [ids[b.symbol] for b in bars],
                [b.ts - 60 * NS for b in bars],
                *([round(getattr(b, f) * 1e9) for b in bars] for f in ("open", "high", "low", "close")),
                [int(b.volume) for b in bars],
            )
            out.append([r.tobytes() for r in records])
        return prologue, out

    def _payloads(self) -> tuple[bytes, list[tuple[bytes, npt.NDArray[np.int64]]]]:
        """Before the run: the prologue (DBN metadata, or nothing) and each minute's bytes, with
        the end offset of each bar's bytes in it (msgpack v1 adds its ``minute_end`` after)."""
        if self.o.feed == "dbn":
            prologue, records = self._dbn()
        else:
            packer = msgpack.Packer()
            prologue, records = b"", [[packer.pack(bar_map(bar)) for bar in bars] for bars in self.minutes]
        out = []
        for bars, encoded in zip(self.minutes, records, strict=True):
            ends = np.cumsum(np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded)))
            out.append((b"".join(encoded), ends))
            for k, bar in enumerate(bars):
                self.slot[(bar.symbol, bar.ts)] = (len(out) - 1, k)
        return prologue, out

    def intended_ns(self, key: tuple[str, int]) -> int | None:
        """The bar's intended send time (wall ns), fixed before the run."""
        at = self.slot.get(key)
        if at is None or self.t0 is None:
            return None
        m, k = at
        return self.t0 + m * self.period_ns + k * self._spread(m)

    def _spread(self, m: int) -> int:
        return int(self.o.burst_ms * 1e6 / max(1, len(self.minutes[m])))

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Each minute's bars go out at their intended times: every bar due (within 0.2 ms) is
        written at once, then the feed sleeps until the next is due. The work per write is a
        slice of bytes made before the run, so the harness's own cost does not delay the bars."""
        self.connected.set()
        prologue, payloads = self._payloads()
        if prologue:
            writer.write(prologue)
        packer = msgpack.Packer()
        seq = 0
        self.t0 = t0 = time.time_ns() + 200_000_000
        for m, (payload, ends) in enumerate(payloads):
            start = t0 + m * self.period_ns
            spread = self._spread(m)
            n = len(ends)
            if self.o.stall_ms and m == len(payloads) * 2 // 3 and self.daemon_pid:
                asyncio.get_running_loop().call_later(
                    max(0.0, (start - time.time_ns()) / NS), _stall, self.daemon_pid, self.o.stall_ms
                )
            k = 0
            while k < n:
                now = time.time_ns()
                due_k = start + k * spread
                if due_k > now + 200_000:
                    await asyncio.sleep((due_k - now) / NS)
                    continue
                j = n if not spread else min(n, (now + 200_000 - start) // spread + 1)
                lag = now - (start + np.arange(k, j, dtype=np.int64) * spread)
                late = lag > 1_000_000
                if late.any():
                    self.late += int(late.sum())
                    self.max_lag_ns = max(self.max_lag_ns, int(lag.max()))
                writer.write(payload[int(ends[k - 1]) if k else 0 : int(ends[j - 1])])
                k = j
            bars = self.minutes[m]
            seq = bars[-1].seq
            if self.o.feed != "dbn":  # DBN has no minute_end: the daemon ends a minute when all reported
                writer.write(packer.pack(minute_end_map(seq + 1, bars[0].ts, len(bars))))
            await writer.drain()
        self.done.set()
        await reader.read()  # keep the connection until the daemon goes
        writer.close()
        self.finished.set()


def _stall(pid: int, ms: float) -> None:
    """Freeze the daemon for ``ms``; the feed goes on sending meanwhile, as a real one would."""
    os.kill(pid, signal.SIGSTOP)
    asyncio.get_running_loop().call_later(ms / 1000.0, os.kill, pid, signal.SIGCONT)


async def _sample(pid: int, out: list[tuple[float, int, int]], t0: float, every_s: float) -> None:
    """Record the daemon's resident memory (kB) and open file descriptors every ``every_s``."""
    while True:
        try:
            status = Path(f"/proc/{pid}/status").read_text()  # noqa: ASYNC240 - procfs, never blocks
            rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration):
            return
        out.append((round(time.monotonic() - t0, 1), rss, fds))
        await asyncio.sleep(every_s)


def plot_soak(report: Report, path: Path) -> None:
    """RSS and open descriptors over the run, as a PNG (needs matplotlib, in the dev extra)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t, rss, fds = zip(*report.soak["samples"], strict=True)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([x / 60 for x in t], [r / 1024 for r in rss], label="RSS (MiB)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(0, max(rss) / 1024 * 1.2)
    ax2 = ax.twinx()
    ax2.plot([x / 60 for x in t], fds, color="tab:orange", label="open fds")
    ax2.set_ylabel("open file descriptors")
    ax2.set_ylim(0, max(fds) * 1.5)
    o = report.options
    ax.set_title(
        f"tradingd soak: {o['symbols']} symbols, a minute every {o['period_ms']:.0f} ms; "
        f"RSS growth {report.soak['rss_growth_pct']}%"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def spawn_server(args: list[str], log: Any) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``tradingd <server command>`` and read its port from the ``LISTENING`` line."""
    proc = subprocess.Popen([sys.executable, "-m", "daemon", *args], stdout=subprocess.PIPE, stderr=log)
    assert proc.stdout is not None
    with proc.stdout:
        line = proc.stdout.readline().decode()
    if not line.startswith("LISTENING "):
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def admin_status(sock: Path) -> dict[str, Any] | None:
    """The daemon's status over its admin socket, or None while it does not answer."""
    try:
        reply = request(str(sock), {"cmd": "status"}, timeout=5)
    except OSError:
        return None
    return reply.get("result") if reply.get("ok") else None


def _pinning(o: Options) -> tuple[set[int], set[int]] | None:
    """(the harness's and broker simulator's CPUs, the daemon's), or None when not pinning."""
    if not o.pin:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least two CPUs")
    return {cpus[0]}, set(cpus[1:])


async def run(o: Options, work: Path) -> Report:
    names, minutes = _plan(o)
    pinning = _pinning(o)
    unpinned = os.sched_getaffinity(0)
    if pinning is not None:
        os.sched_setaffinity(0, pinning[0])  # the feed, and the broker simulator it starts
    driver = Driver(o, minutes)
    server = await asyncio.start_server(driver.serve, "127.0.0.1", 0)
    feed_port = server.sockets[0].getsockname()[1]
    log = (work / "processes.log").open("ab")
    broker_log, journal, sock = work / "broker.jsonl", work / "journal.msgpack", work / "admin.sock"
    broker, broker_port = spawn_server(["broker-sim", "--port", "0", "--log", str(broker_log)], log)
    config = work / "tradingd.toml"
    config.write_text(
        f"""
[feed]
format = "{o.feed}"
port = {feed_port}
max_frame_bytes = 4096
[broker]
port = {broker_port}
[universe]
symbols = {json.dumps(names)}
[batch]
max_batch = {(8192 if o.engine == "timing" else 256) if o.batching else 1}
max_delay_us = {o.max_delay_us}
[engine]
allow_unqualified = true  # the shipped model is not qualified; the harness measures the daemon
[engine.primary]
backend = "{o.engine}"
[signal]
confidence_threshold = 0.0
notional_per_signal = 10000.0
[risk]
clock = "feed"
duplicate_window_ms = 0
throttle_orders = 1000000
max_gross_exposure = 1e12
[metrics]
enabled = false
[admin]
socket = "{sock}"
operators = [{os.getuid()}]
[journal]
path = "{journal}"
fsync = "{o.fsync}"
[log]
level = "error"
[process]
switch_interval_us = {o.switch_interval_us}
"""
    )
    daemon_cpus = pinning[1] if pinning is not None else None
    daemon = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measured run
        [sys.executable, "-m", "daemon", "run", "--config", str(config), "--loop", o.loop],
        stderr=log,
        preexec_fn=(lambda: os.sched_setaffinity(0, daemon_cpus)) if daemon_cpus else None,  # noqa: PLW1509
    )
    driver.daemon_pid = daemon.pid
    started = time.monotonic()
    samples: list[tuple[float, int, int]] = []
    sampler = asyncio.create_task(_sample(daemon.pid, samples, started, o.sample_s)) if o.sample_s else None
    try:
        await asyncio.wait_for(driver.connected.wait(), timeout=120)
        await driver.done.wait()
        # The last minute is still being traded: an admin status (its summaries over every
        # order) is not asked for until it has had two periods.
        await asyncio.sleep(2 * driver.period_ns / NS)
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            status = await asyncio.to_thread(admin_status, sock)
            if status and status["bars"]["minutes"] >= len(minutes) and status["idle"]:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # the last fills
        status = await asyncio.to_thread(admin_status, sock)
    finally:
        if sampler is not None:
            sampler.cancel()
        daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait, 30)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(driver.finished.wait(), timeout=5)
        broker.terminate()
        broker.wait(timeout=10)
        server.close()
        log.close()
        os.sched_setaffinity(0, unpinned)
    wall = time.monotonic() - started

    bar_of = {r["id"]: (r["symbol"], r["ts_event"]) for r in per_order(read_journal(journal)) if r["kind"] == "intent"}
    hist = HdrHistogram(1, 600_000_000, 3)  # microseconds, up to 10 minutes
    received = read_orders(broker_log)
    for order in received:
        key = bar_of.get(order["cl_ord_id"])
        intended = driver.intended_ns(key) if key is not None else None
        if intended is None:
            continue
        hist.record_value(max(1, (order["ts_recv"] - intended) // 1000))
    span_s = len(minutes) * driver.period_ns / NS
    report = Report(options=asdict(o))
    report.bars_sent = sum(len(m) for m in minutes)
    report.orders = hist.get_total_count()
    report.orders_per_s = round(report.orders / span_s, 1) if span_s else 0.0
    bars = (status or {}).get("bars", {})
    report.drops = {
        "rejected": bars.get("rejected", -1),
        "superseded": bars.get("superseded", -1),
        "not_received": report.bars_sent - bars.get("received", 0),
    }
    if report.orders:
        report.tick_to_order_us = {
            "p50": hist.get_value_at_percentile(50),
            "p90": hist.get_value_at_percentile(90),
            "p99": hist.get_value_at_percentile(99),
            "p99.9": hist.get_value_at_percentile(99.9),
            "max": hist.get_max_value(),
        }
    report.daemon_us = (status or {}).get("latency_us", {})
    report.engine = (status or {}).get("engine_backend", o.engine)
    report.model_qualified = (status or {}).get("model_qualified")
    report.orders_latency = (status or {}).get("orders_latency", {})
    rows = (status or {}).get("batch_rows", {})
    report.batches = {
        "count": rows.get("count"),
        "rows_p50": rows.get("p50"),
        "rows_max": rows.get("max"),
        "buckets": (status or {}).get("batch_buckets", {}),
    }
    if samples:
        # Growth is judged from the end of warm-up (a tenth of the run in), not from start-up.
        base = next((x for x in samples if x[0] >= samples[-1][0] * 0.1), samples[0])
        report.soak = {
            "samples": samples,
            "rss_kb_start": base[1],
            "rss_kb_end": samples[-1][1],
            "rss_growth_pct": round(100.0 * (samples[-1][1] - base[1]) / base[1], 2),
            "fds_start": base[2],
            "fds_end": samples[-1][2],
        }
    report.late_sends = driver.late
    report.max_send_lag_us = round(driver.max_lag_ns / 1000, 1)
    report.wall_s = round(wall, 2)
    return report


def engine_alone(o: Options, iterations: int = 200) -> dict[int, dict[str, float]]:
    """The shipped engine's inference per bucket a run of ``o`` uses, measured alone."""
    import numpy as np  # noqa: PLC0415

    from engines.base import EngineSpec  # noqa: PLC0415
    from engines.chooser import DEFAULT_MODEL, build_engine  # noqa: PLC0415

    engine = build_engine(EngineSpec("bench", "onnxruntime", DEFAULT_MODEL))
    engine.warm_up()
    symbols = 1 if o.scenario == "steady" else o.symbols
    sizes = {engine.bucket_for(min(n, 256)) for n in (symbols, symbols % 256 or 256)} if o.batching else {1}
    if o.batching and symbols >= 256:
        sizes.add(256)
    out: dict[int, dict[str, float]] = {}
    for bucket in sorted(sizes):
        times = []
        for _ in range(iterations):
            t = time.perf_counter_ns()
            engine.infer(bucket)
            times.append(time.perf_counter_ns() - t)
        p50, p99 = np.percentile(times, [50, 99]) / 1000
        out[bucket] = {"p50": round(float(p50), 1), "p99": round(float(p99), 1)}
    return out


def summary(report: Report) -> dict[str, Any]:
    """The run as one JSON object. ``t2o_us`` is the harness's own measure (the broker's receive
    time of an order less the intended send time of its bar); ``overhead_us`` and ``stages_us``
    are the daemon's per-order figures (from its socket read of the bar), percentiles over orders:
    overhead is each order's tick-to-order less its own batch's engine time."""
    o, t, lat = report.options, report.tick_to_order_us, report.orders_latency
    return {
        "orders": report.orders,
        "drops": report.drops,
        "engine": report.engine,
        # The shipped model has not passed tradingd backtest: the harness measures the daemon.
        "model": "qualified"
        if report.model_qualified
        else "NOT qualified: traded because engine.allow_unqualified = true (a benchmark)",
        "feed": o["feed"],
        "fsync": o["fsync"],
        "max_delay_us": o.get("max_delay_us", 1000),
        "switch_interval_us": o.get("switch_interval_us", 500),
        "pinned": o.get("pin", False),
        "symbols": 1 if o["scenario"] == "steady" else o["symbols"],
        "minutes": o["minutes"],
        "t2o_us": {
            "p50": t.get("p50"),
            "p90": t.get("p90"),
            "p99": t.get("p99"),
            "p999": t.get("p99.9"),
            "max": t.get("max"),
        },
        "daemon_t2o_us": lat.get("t2o_us", {}),
        "overhead_us": lat.get("overhead_us", {}),
        "stages_us": lat.get("stages_us", {}),
        "batches": report.batches,
        "late_sends": report.late_sends,
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the median over the runs (each run's own percentile), for the targets."""

    def med(path: tuple[str, ...]) -> float | None:
        values = []
        for run in runs:
            x: Any = run
            for key in path:
                x = x.get(key) if isinstance(x, dict) else None
            if isinstance(x, int | float):
                values.append(float(x))
        return round(float(np.median(values)), 1) if values else None

    out: dict[str, Any] = {
        "t2o_us": {q: med(("t2o_us", q)) for q in ("p50", "p90", "p99", "p999", "max")},
        "overhead_us": {q: med(("overhead_us", q)) for q in ("p50", "p99")},
    }
    out["stages_us"] = {
        stage: {q: med(("stages_us", stage, q)) for q in ("p50", "p99")} for stage in runs[0].get("stages_us", {})
    }
    return out


def markdown(report: Report) -> str:
    o, t = report.options, report.tick_to_order_us
    own = report.daemon_us.get("tick_to_order", {})
    infer = report.daemon_us.get("infer", {})
    head = (
        ("model not qualified (engine.allow_unqualified = true, a benchmark); " if not report.model_qualified else "")
        + f"scenario {o['scenario']}, {o['symbols'] if o['scenario'] != 'steady' else 1} symbol(s), "
        f"{o['minutes']} minutes every {o['period_ms']} ms, batching {'on' if o['batching'] else 'off'}, "
        f"loop {o['loop']}{', stall ' + str(o['stall_ms']) + ' ms' if o['stall_ms'] else ''}"
    )
    return "\n".join(
        [
            head,
            "",
            "| orders | orders/s | drops | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs "
            "| daemon t2o p50/p99 µs | infer p50/p99 µs |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---|---|",
            f"| {report.orders} | {report.orders_per_s} | {report.drops} | {t.get('p50')} | {t.get('p90')} "
            f"| {t.get('p99')} | {t.get('p99.9')} | {t.get('max')} | {own.get('p50')}/{own.get('p99')} "
            f"| {infer.get('p50')}/{infer.get('p99')} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["steady", "burst", "overload", "real"], default="burst")
    parser.add_argument(
        "--data",
        default=str(Path(__file__).resolve().parents[2] / "shared/data/us_equity_minute_2013-10.csv"),
        help="the CSV for --scenario real (its minutes, in order, each at its intended time)",
    )
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--period-ms", type=float, default=250.0)
    parser.add_argument("--burst-ms", type=float, default=5.0)
    parser.add_argument("--no-batching", action="store_true")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--stall-ms", type=float, default=0.0)
    parser.add_argument("--budget-ms", type=float, help="exit 1 when p99 tick-to-order exceeds this")
    parser.add_argument("--soak", action="store_true", help="record the daemon's RSS and open fds every second")
    parser.add_argument("--soak-png", type=Path, help="plot the soak's memory curve to this PNG")
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="in the same invocation, also run with batching off and with the asyncio loop, and the engine alone",
    )
    parser.add_argument("--engine", choices=["onnxruntime", "timing"], default="onnxruntime")
    parser.add_argument("--feed", choices=["msgpack", "dbn"], default="msgpack")
    parser.add_argument("--fsync", choices=["none", "batch", "always"], default="batch")
    parser.add_argument(
        "--runs", type=int, default=1, help="repeat the run; the summary adds the median of each figure"
    )
    parser.add_argument(
        "--max-delay-us",
        type=int,
        default=1000,
        help="the daemon's batch.max_delay_us (0: each batch starts as soon as the engine is free)",
    )
    parser.add_argument(
        "--switch-interval-us",
        type=int,
        default=500,
        help="the daemon's process.switch_interval_us: how long the event loop may hold the GIL while the"
        " inference thread waits for it",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the daemon on CPUs 1.. and the harness's feed and broker simulator on CPU 0 (as the service's"
        " CPUAffinity= keeps the daemon off the cores its peers use); default: all share every CPU",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (the summary) on stdout")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--md-out", type=Path)
    args = parser.parse_args(argv)
    o = Options(
        args.scenario,
        args.symbols,
        args.minutes,
        args.period_ms,
        args.burst_ms,
        not args.no_batching,
        args.loop,
        args.stall_ms,
        data=args.data,
        sample_s=1.0 if args.soak or args.soak_png else 0.0,
        engine=args.engine,
        feed=args.feed,
        fsync=args.fsync,
        max_delay_us=args.max_delay_us,
        switch_interval_us=args.switch_interval_us,
        pin=args.pin,
    )
    runs: list[dict[str, Any]] = []
    for _ in range(max(1, args.runs)):
        with tempfile.TemporaryDirectory(prefix="tradingd-bench-") as work:
            report = asyncio.run(run(o, Path(work)))
        runs.append(summary(report))
    text = markdown(report)
    baselines: dict[str, Any] = {}
    if args.baselines:
        for label, variant in (
            ("batching off", replace(o, batching=False, sample_s=0.0)),
            ("asyncio loop", replace(o, loop="asyncio", sample_s=0.0)),
        ):
            with tempfile.TemporaryDirectory(prefix="tradingd-bench-") as work:
                other = asyncio.run(run(variant, Path(work)))
            baselines[label] = asdict(other)
            text += "\n" + markdown(other).splitlines()[-1] + f" ← baseline: {label}"
        if o.engine == "onnxruntime":
            engine = engine_alone(o)
            baselines["engine alone"] = engine
            text += "\n\nengine alone (inference per bucket, µs): " + ", ".join(
                f"bucket {b}: p50 {v['p50']} / p99 {v['p99']}" for b, v in engine.items()
            )
    if report.soak:
        k = report.soak
        text += (
            f"\n\nsoak: RSS {k['rss_kb_start']} kB -> {k['rss_kb_end']} kB ({k['rss_growth_pct']:+}%), "
            f"open fds {k['fds_start']} -> {k['fds_end']}, {len(k['samples'])} samples"
        )
        if args.soak_png:
            plot_soak(report, args.soak_png)
    result = {**runs[-1], "runs": runs, "median": median_of(runs)} if len(runs) > 1 else runs[-1]
    result["baselines"] = {
        k: summary(Report(**v)) if isinstance(v, dict) and "options" in v else v for k, v in baselines.items()
    }
    print(json.dumps(result) if args.json else text)
    if args.json_out:
        args.json_out.write_text(json.dumps({**asdict(report), "summary": result, "baselines": baselines}, indent=2))
    if args.md_out:
        args.md_out.write_text(text + "\n")
    p99 = report.tick_to_order_us.get("p99")
    if args.budget_ms is not None and (p99 is None or p99 > args.budget_ms * 1000):
        print(f"p99 tick-to-order {p99} µs is over the budget of {args.budget_ms} ms", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
