"""``tradingd demo``: the whole minute loop on this machine, on embedded defaults.

Starts the broker simulator and a replay feed as their own processes on free loopback ports,
runs the daemon with the CPU engine in this process, replays the data at full speed while
showing progress, and returns a summary in which every bar and every order intent is accounted
for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson

from broker.orders import FINAL
from broker.sim import read_orders
from daemon import qualification
from daemon.app import Daemon
from daemon.config import (
    AdminConfig,
    BatchConfig,
    BrokerConfig,
    Config,
    EngineConfig,
    EnginesConfig,
    FeedConfig,
    FixConfig,
    JournalConfig,
    MetricsConfig,
    RiskConfig,
    SignalConfig,
    UniverseConfig,
)
from daemon.feed.replay import is_dbn_file, load_minutes, symbols_of
from daemon.feed.synth import SynthParams, generate, write_csv
from daemon.runtime import Runtime
from daemon.stats import Stats
from engines.base import Engine
from engines.chooser import resolve_model
from engines.errors import ManifestError
from engines.manifest import load_manifest


class DemoError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class DemoOptions:
    minutes: int = 30
    symbols: int = 32
    data: Path | None = None
    seed: int = 1
    review_threshold: float = 1_000_000.0
    notional_per_signal: float = 40_000.0
    timeout_s: float = 300.0
    workdir: Path | None = None
    metrics: bool = True
    metrics_port: int = 0
    samples_out: Path | None = None  # write every tick-to-order sample (µs) here, one per line
    broker: str = "sim"  # "sim": start the broker simulator; "fix44"/"fix42": a FIX acceptor on broker_port
    broker_port: int | None = None
    fix_sender: str = "TRADINGD"
    fix_target: str = "EXECUTOR"
    feed: str | None = None  # "msgpack" or "dbn"; None: dbn for a DBN file, else msgpack
    model: str = "builtin"  # or a model.onnx with its manifest beside it


async def _spawn(*args: str) -> tuple[asyncio.subprocess.Process, int]:
    """Start ``tradingd <args>`` and read the port from its ``LISTENING host:port`` line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
    except TimeoutError as exc:
        proc.kill()
        raise DemoError(f"tradingd {args[0]} did not start within 30 s") from exc
    text = line.decode().strip()
    if not text.startswith("LISTENING "):
        proc.kill()
        raise DemoError(f"tradingd {args[0]} failed to start (said {text!r}, exit {proc.returncode})")
    return proc, int(text.rsplit(":", 1)[1])


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _progress(out: TextIO, text: str, final: bool = False) -> None:
    if out.isatty():
        out.write("\r\033[K" + text + ("\n" if final else ""))
    else:
        out.write(text + "\n")
    out.flush()


async def run_demo(options: DemoOptions, progress: TextIO = sys.stderr) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        work = options.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tradingd-demo-")))
        if options.data is None:
            data = work / "synthetic.csv"
            universe = generate(SynthParams(symbols=options.symbols, minutes=options.minutes, seed=options.seed))
            write_csv(universe, data)
            source = f"synthetic: {options.symbols} symbols x {options.minutes} minutes, seed {options.seed}"
        else:
            data = options.data
            source = str(data)
        minutes = load_minutes(data)
        symbols = symbols_of(minutes)
        feed_format = options.feed or ("dbn" if is_dbn_file(data) else "msgpack")
        total_minutes = len(minutes)
        total_bars = sum(len(m.bars) for m in minutes)
        broker_log = work / "broker-orders.jsonl"
        _progress(
            progress,
            f"demo: {source}: {total_bars} bars, {len(symbols)} symbols, {total_minutes} minutes",
        )

        broker: asyncio.subprocess.Process | None = None
        if options.broker == "sim":
            broker, broker_port = await _spawn("broker-sim", "--port", "0", "--log", str(broker_log))
            broker_config = BrokerConfig(port=broker_port)
        else:
            if options.broker_port is None:
                raise DemoError(f"--broker {options.broker} needs --broker-port (a FIX acceptor on 127.0.0.1)")
            broker_config = BrokerConfig(
                protocol=options.broker,  # type: ignore[arg-type]
                port=options.broker_port,
                # A fresh session each demo: both sides start from 1 (141=Y).
                fix=FixConfig(
                    sender_comp_id=options.fix_sender, target_comp_id=options.fix_target, reset_on_logon=True
                ),
            )
        feed = None
        daemon = None
        try:
            feed, feed_port = await _spawn("replay", str(data), "--port", "0", "--speed", "0", "--format", feed_format)
            config = Config(
                feed=FeedConfig(port=feed_port, format=feed_format),  # type: ignore[arg-type]
                universe=UniverseConfig(symbols=symbols),
                broker=broker_config,
                metrics=MetricsConfig(enabled=options.metrics, port=options.metrics_port),
                journal=JournalConfig(path=str(work / "journal.msgpack"), fsync="none"),
                admin=AdminConfig(socket=str(work / "admin.sock"), operators=(os.getuid(),)),
                # Replayed history: ages are measured on the feed's clock, not today's.
                risk=RiskConfig(clock="feed", review_threshold=options.review_threshold),
                signal=SignalConfig(notional_per_signal=options.notional_per_signal),
                # The shipped model has not passed `tradingd backtest`; the demo shows the
                # daemon, not a model fit to trade, and its summary says so.
                engine=EnginesConfig(primary=EngineConfig(model=options.model), allow_unqualified=True),
                # Batches as large as the model's largest bucket allows (a model of one's own may
                # have been exported with fewer buckets than the default batch).
                batch=BatchConfig(max_batch=min(BatchConfig().max_batch, _largest_bucket(options.model))),
            )
            daemon = Daemon(config, config_file="(demo defaults)")
            started = time.perf_counter()
            await daemon.start(on_status=lambda s: _progress(progress, f"demo: {s}"))
            runtime, stats = daemon.runtime, daemon.stats
            assert runtime is not None and daemon.engines is not None
            engine = daemon.engines.active
            replay_started = time.perf_counter()
            last_shown = 0.0
            while not (stats.minute_ends >= total_minutes and runtime.idle_event.is_set()):
                if time.perf_counter() - started > options.timeout_s:
                    raise DemoError(
                        f"demo did not finish within {options.timeout_s:.0f} s "
                        f"({stats.minute_ends}/{total_minutes} minutes)"
                    )
                await asyncio.sleep(0.02)
                if time.perf_counter() - last_shown > (0.25 if progress.isatty() else 2.0):
                    last_shown = time.perf_counter()
                    _progress(
                        progress,
                        f"demo: minute {stats.minute_ends}/{total_minutes}  bars {stats.bars_received}"
                        f"/{total_bars}  batches {stats.batches}  orders {stats.orders_sent}",
                    )
            replay_s = time.perf_counter() - replay_started
            settle_until = time.perf_counter() + 5.0
            # Fills arrive as execution reports; give the last ones a moment before the summary.
            while time.perf_counter() < settle_until and any(  # noqa: ASYNC110 - no event per fill
                o.state not in FINAL for o in runtime.book.orders.values()
            ):
                await asyncio.sleep(0.01)
            _progress(progress, f"demo: replayed {total_minutes} minutes in {replay_s:.2f} s", final=True)
            await daemon.shutdown()
            daemon = None
            summary = _summary(
                runtime, stats, engine, total_bars, total_minutes, replay_s, broker_log if broker is not None else None
            )
            summary["broker"] = (
                "broker simulator"
                if options.broker == "sim"
                else f"{options.broker} {options.fix_sender}->{options.fix_target} at 127.0.0.1:{options.broker_port}"
            )
            if options.samples_out is not None:
                samples = stats.tick_to_order.samples()
                options.samples_out.write_text("".join(f"{ns / 1000:.1f}\n" for ns in samples.tolist()))
            summary["source"] = source
            return summary
        finally:
            if daemon is not None:
                await daemon.shutdown(deadline_s=1.0)
            for proc in (feed, broker):
                if proc is not None:
                    await _stop(proc)


def _summary(
    runtime: Runtime,
    s: Stats,
    engine: Engine,
    total_bars: int,
    total_minutes: int,
    replay_s: float,
    broker_log: Path | None,
) -> dict[str, Any]:
    rejected = dict(sorted(s.bars_rejected.items()))
    denied = dict(sorted(s.orders_denied.items()))
    # The simulator logs what it received; a FIX acceptor's word is its acknowledgements.
    broker_received = None if broker_log is None else len(read_orders(broker_log)) if broker_log.exists() else 0
    open_orders = len(runtime.book.working)
    return {
        "bars": {
            "sent_by_feed": total_bars,
            "received": s.bars_received,
            "accepted": s.bars_accepted,
            "rejected": rejected,
            "warmup": s.bars_warmup,
            "superseded": runtime.batcher.superseded,
            "balanced": s.bars_accepted + sum(rejected.values()) == s.bars_received,
        },
        "minutes": {"sent_by_feed": total_minutes, "received": s.minute_ends},
        "feed": {
            "seq_gaps": s.seq_gaps,
            "connects": s.feed_connects,
            "frame_errors": dict(s.feed_frame_errors),
        },
        "batches": s.batches,
        "batch_rows": s.batch_rows,
        "signals": {k: s.signals[k] for k in ("buy", "hold", "sell")},
        "orders": {
            "intents": s.intents,
            "sent": s.orders_sent,
            "denied": denied,
            "filled": s.orders_filled,
            "rejected_by_broker": s.orders_rejected,
            "open": open_orders,
            "received_by_broker": broker_received,
            "acknowledged_by_broker": s.orders_acked,
            "parked": s.reviews_parked,
            "approved": s.reviews_approved,
            "rejected": s.reviews_rejected,
            "expired": s.reviews_expired,
            "waiting_review": len(runtime.desk.reviews),
            # Every intent ends sent, denied, or parked (and a parked one approved, rejected or expired).
            "balanced": s.orders_sent + sum(denied.values()) + s.reviews_parked == s.intents + s.reviews_approved,
        },
        "halts": sorted({e.symbol or "(market)" for e in runtime.desk.halt_log if e.action == "halt"}),
        "engine": {
            "name": engine.manifest.name,
            "version": engine.manifest.version,
            "backend": engine.backend,
            "buckets": list(engine.buckets),
            "failures": s.infer_failures,
            "qualification": qualification_line(runtime.config, engine),
        },
        "latency_us": {
            "tick_to_order": s.tick_to_order.summary_us(),
            "infer": s.infer.summary_us(),
            "batch_wait": s.batch_wait.summary_us(),
            "feed_wait": s.feed_wait.summary_us(),
            "gates": s.gates.summary_us(),
            "send": s.send.summary_us(),
        },
        "replay_seconds": round(replay_s, 3),
    }


def _largest_bucket(model: str) -> int:
    try:
        return max(load_manifest(resolve_model(model, "onnxruntime")).batch_buckets)
    except (OSError, ValueError, ManifestError):
        return BatchConfig().max_batch  # the engine's own load says what is wrong, naming the file


def qualification_line(config: Config, engine: Engine) -> str:
    """What a summary says of the model's deploy gate: qualified, or traded anyway."""
    cfg = config.engine.standby if engine.name == "standby" and config.engine.standby else config.engine.primary
    found = qualification.standing(resolve_model(cfg.model, cfg.backend), engine.manifest.sha256)
    if found.ok:
        return f"qualified ({found.reason})"
    return f"NOT qualified ({found.reason}); traded because engine.allow_unqualified = true"


def render_text(summary: dict[str, Any]) -> str:
    b, o, lat = summary["bars"], summary["orders"], summary["latency_us"]
    e, sig = summary["engine"], summary["signals"]

    def lat_line(name: str) -> str:
        x = lat[name]
        return f"{name:<14} p50 {x['p50']} us  p99 {x['p99']} us  max {x['max']} us  (n={x['count']})"

    lines = [
        f"source         {summary['source']}",
        f"engine         {e['name']} {e['version']} on {e['backend']}",
        f"qualification  {e['qualification']}",
        f"bars           received {b['received']}  accepted {b['accepted']}  rejected {sum(b['rejected'].values())}"
        f" {b['rejected'] or ''}  warm-up {b['warmup']}  -> {'balanced' if b['balanced'] else 'NOT BALANCED'}",
        f"batches        {summary['batches']} ({summary['batch_rows']} rows)",
        f"signals        buy {sig['buy']}  hold {sig['hold']}  sell {sig['sell']}",
        f"orders         intents {o['intents']}  sent {o['sent']}"
        f"  denied {sum(o['denied'].values())} {o['denied'] or ''}"
        f"  parked {o['parked']}  filled {o['filled']}  broker received {o['received_by_broker']}"
        f"  acknowledged {o['acknowledged_by_broker']}"
        f"  -> {'balanced' if o['balanced'] else 'NOT BALANCED'}",
        f"halts          {', '.join(summary['halts']) or 'none'}",
        lat_line("tick_to_order"),
        lat_line("infer"),
        f"replay         {summary['replay_seconds']} s",
    ]
    return "\n".join(lines)


def dumps(summary: dict[str, Any]) -> str:
    return orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode()
