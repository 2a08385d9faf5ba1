"""``tradingd backtest``: the daemon's own minute path over history, against a simulated venue.

Not a separate vectorised backtester: each minute's bars go into the same ``Runtime`` the live
daemon runs (feature windows, batcher, the engine on its inference thread, the signal policy,
every risk gate, the order desk and its journal), exactly as ingest hands them over, and orders
leave through the ``Gateway`` interface to ``broker.venue.SimVenue``. The clock is the feed's
(``daemon.clock.ReplayClock``): wall-clock rules act on the replay's time, latencies are real.

No look-ahead: the venue sees a minute's bars (and fills what was sent before them, at their
open plus slippage) before the daemon does, so an order from the bar that closes at ``t`` fills
no earlier than the next bar. Orders parked for manual review are rejected unless
``approve_reviews``. Baselines (the benchmark held, momentum, always buy) run through the same
path with rule engines in place of the model.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TextIO

import msgspec
import numpy as np
import numpy.typing as npt

from broker import protocol as wire
from broker.journal import Journal
from broker.venue import SimVenue
from daemon.backtest import metrics as bm
from daemon.backtest.baselines import RuleEngine
from daemon.batcher import Batch
from daemon.clock import ReplayClock
from daemon.config import Config, parse_config
from daemon.engineset import EngineSet
from daemon.feed.columns import from_bars
from daemon.feed.protocol import MinuteEnd
from daemon.feed.replay import Minute
from daemon.preflight import build_configured
from daemon.runtime import Runtime
from daemon.stats import Stats
from engines.base import Engine
from engines.chooser import resolve_model
from risk.failover import FailoverPolicy
from risk.states import TradingState

NS = 1_000_000_000
MODEL = "model"
BASELINE_RULES = ("momentum", "always buy")
BENCHMARK = "benchmark held"
OPERATOR_UID = 0  # who the backtest's review decisions are journaled as


class BacktestError(Exception):
    """The backtest could not run (bad data, no bars in the period, a daemon fault)."""


@dataclass(frozen=True)
class Options:
    data: tuple[Path, ...]
    model: str = "builtin"
    benchmark: str | None = None  # a symbol held from the first bar; None: the equal-weighted universe
    cost_bps: float = 1.0
    slippage_bps: float = 1.0
    start: date | None = None
    end: date | None = None  # inclusive
    capital: float | None = None  # default: one signal's notional per symbol
    approve_reviews: bool = False
    baselines: bool = True
    # An operator lifts every halt at the next session (UTC day), as a desk would after looking;
    # False: halts stay for the rest of the run, as with nobody there.
    lift_halts: bool = True


@dataclass
class Pass:
    """One run of the minute path over the data with one engine."""

    label: str
    series: bm.Series
    trades: list[bm.Trade]
    calls: bm.Calls
    t2o_us: npt.NDArray[np.float64]
    counts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    model: Pass
    baselines: dict[str, bm.Metrics]
    metrics: bm.Metrics
    gates: dict[str, bm.Gate]
    passed: bool
    annualisation: bm.Annualisation
    meta: dict[str, Any]
    extra_passes: dict[str, Pass]


# -- data -------------------------------------------------------------------------------------


def load_minutes(paths: Sequence[Path]) -> list[Minute]:
    """Every file's bars, merged by minute (CSV of minute or daily bars, or DBN)."""
    from daemon.feed.replay import ReplayError  # noqa: PLC0415
    from daemon.feed.replay import load_minutes as load_file  # noqa: PLC0415

    by_ts: dict[int, list[Any]] = {}
    for path in paths:
        if not path.is_file():
            raise BacktestError(f"{path}: no such file")
        try:
            minutes = load_file(path)  # CSV or DBN, told apart by content
        except (OSError, ReplayError) as exc:
            raise BacktestError(f"cannot read {path}: {exc}") from None
        for m in minutes:
            by_ts.setdefault(m.ts, []).extend(m.bars)
    out, seq = [], 0
    for ts in sorted(by_ts):
        bars = []
        for bar in sorted(by_ts[ts], key=lambda b: b.symbol):
            seq += 1
            bars.append(msgspec.structs.replace(bar, seq=seq))
        seq += 1
        out.append(Minute(ts, tuple(bars)))
    return out


def in_period(minutes: list[Minute], start: date | None, end: date | None) -> list[Minute]:
    def day(ts: int) -> date:
        return datetime.fromtimestamp((ts - 1) // NS, UTC).date()  # a bar's ts is its close

    return [m for m in minutes if (start is None or day(m.ts) >= start) and (end is None or day(m.ts) <= end)]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def backtest_config(base: Config, symbols: Sequence[str], model: str, journal: Path, file: str) -> Config:
    """The deployment's configuration (or the defaults) as a backtest runs it: the data's
    universe, the feed's clock, one engine on ``model``, a throwaway journal."""
    raw = msgspec.to_builtins(base)
    raw["universe"] = {**raw.get("universe", {}), "symbols": list(symbols)}
    raw["risk"] = {**raw.get("risk", {}), "clock": "feed"}
    raw["journal"] = {**raw.get("journal", {}), "path": str(journal), "fsync": "none"}
    engine = raw.setdefault("engine", {})
    engine["primary"] = {**engine.get("primary", {}), "model": model, "backend": "onnxruntime"}
    engine["primary"].pop("inject", None)
    engine.pop("standby", None)
    raw["metrics"] = {**raw.get("metrics", {}), "enabled": False}
    return parse_config(raw, file)


# -- one pass ---------------------------------------------------------------------------------


class _Recorder:
    """Every call the daemon made (symbol, bar time, class, confidence)."""

    def __init__(self) -> None:
        self.symbols: list[npt.NDArray[np.int64]] = []
        self.ts: list[npt.NDArray[np.int64]] = []
        self.cls: list[npt.NDArray[np.int64]] = []
        self.conf: list[npt.NDArray[np.float32]] = []

    def __call__(self, batch: Batch, cls: npt.NDArray[np.int64], conf: npt.NDArray[np.float32]) -> None:
        self.symbols.append(np.asarray(batch.symbols, dtype=np.int64).copy())
        self.ts.append(np.asarray(batch.ts_event, dtype=np.int64))
        self.cls.append(np.asarray(cls, dtype=np.int64).copy())
        self.conf.append(np.asarray(conf, dtype=np.float32).copy())

    def calls(self, closes: dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]) -> bm.Calls:
        if not self.cls:
            empty = np.zeros(0)
            return bm.Calls(empty.astype(np.int8), empty, empty)
        sym, ts = np.concatenate(self.symbols), np.concatenate(self.ts)
        cls, conf = np.concatenate(self.cls), np.concatenate(self.conf).astype(np.float64)
        nxt = np.full(len(sym), np.nan)
        for i in np.unique(sym).tolist():
            rows = np.flatnonzero(sym == i)
            bar_ts, close = closes[i]
            k = np.searchsorted(bar_ts, ts[rows])
            known = (k + 1 < len(bar_ts)) & (k < len(bar_ts))
            k_ok = k[known]
            with np.errstate(all="ignore"):
                nxt[rows[known]] = np.log(close[k_ok + 1] / close[k_ok])
        return bm.Calls((cls - 1).astype(np.int8), conf, nxt)


def _lift_halts(desk: Any) -> None:
    """What an operator does at a new session after looking at yesterday's halts: lift them
    (journaled, as ``tradingd resume`` would; never the kill switch, which a backtest never sets)."""
    halts = desk.halts
    if halts.market is not TradingState.ACTIVE:
        desk.resume(None, OPERATOR_UID)
    for symbol in [s for s, st in halts.state.items() if st is not TradingState.ACTIVE]:
        desk.resume(symbol, OPERATOR_UID)


def _tradable(bar: Any) -> bool:
    """A bar with prices a venue could have traded at (the daemon rejects the rest too)."""
    prices = (bar.open, bar.high, bar.low, bar.close)
    return all(0.0 < p < math.inf for p in prices) and bar.low <= min(bar.open, bar.close)


def _benchmark(minutes: list[Minute], symbols: Sequence[str], capital: float, held: str | None) -> list[float]:
    """Buy-and-hold of ``held`` from its first bar, or of every symbol in equal weight from its
    own first bar (a symbol not yet traded counts at its starting value)."""
    first: dict[str, float] = {}
    ratio: dict[str, float] = {s: 1.0 for s in symbols}
    out = []
    for m in minutes:
        for bar in m.bars:
            if not _tradable(bar):
                continue
            start = first.setdefault(bar.symbol, bar.close)
            ratio[bar.symbol] = bar.close / start
        if held is not None:
            out.append(capital * ratio[held])
        else:
            out.append(capital * sum(ratio.values()) / len(ratio))
    return out


async def run_pass(
    label: str,
    minutes: list[Minute],
    config: Config,
    engines: EngineSet,
    opts: Options,
    capital: float,
    progress: Callable[[str, int, int, int, float], None] | None = None,
) -> Pass:
    symbols = config.universe.symbols
    clock = ReplayClock(minutes[0].ts - 60 * NS)
    journal = Journal(Path(config.journal.path), "none", wall_ns=clock.wall_ns())
    stats = Stats()
    runtime = Runtime(config, engines, clock, journal, stats)
    recorder = _Recorder()
    runtime.on_calls = recorder
    desk = runtime.desk
    failures: list[BaseException] = []
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()

    def on_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        failures.append(exc if isinstance(exc, BaseException) else BacktestError(str(context.get("message"))))
        runtime.idle_event.set()  # wake the driver, which stops

    loop.set_exception_handler(on_error)

    def on_status(message: wire.Status) -> None:
        desk.on_status(message)

    venue = SimVenue(
        capital,
        on_report=desk.on_report,
        on_status=on_status,
        on_event=desk.on_broker_event,
        slippage_bps=opts.slippage_bps,
        cost_bps=opts.cost_bps,
    )
    try:
        desk.begin_session()
        desk.gateway = venue
        desk.on_broker_event("connected", "simulated venue")
        venue.deliver()
        if not desk.reconciled:
            raise BacktestError("the simulated venue's status did not reconcile the desk")
        index = {s: i for i, s in enumerate(symbols)}
        marks: dict[str, float] = {}
        equity, bench = np.empty(len(minutes)), _benchmark(minutes, symbols, capital, opts.benchmark)
        per_symbol: dict[int, tuple[list[int], list[float]]] = {i: ([], []) for i in range(len(symbols))}
        session = None
        ruined: int | None = None
        for k, minute in enumerate(minutes):
            clock.at_minute(minute.ts)
            day = (minute.ts - 1) // (86_400 * NS)
            if opts.lift_halts and day != session:
                session = day
                _lift_halts(desk)
            tradable = [bar for bar in minute.bars if _tradable(bar)]  # what the daemon refuses trades nowhere
            for bar in tradable:
                venue.on_bar(bar.symbol, bar.ts, bar.open, bar.high, bar.low)
            venue.deliver()
            now = clock.mono_ns()
            runtime.on_bars(from_bars(minute.bars, index), now)
            for bar in tradable:
                marks[bar.symbol] = bar.close
                i = index[bar.symbol]
                per_symbol[i][0].append(bar.ts)
                per_symbol[i][1].append(bar.close)
            runtime.on_minute_end(MinuteEnd(minute.bars[-1].seq + 1, minute.ts, len(minute.bars)), now)
            await runtime.idle_event.wait()
            if failures:
                raise BacktestError(f"the daemon failed at minute {k + 1} ({label}): {failures[0]!r}") from failures[0]
            venue.deliver()
            for parked in desk.review_list():
                if opts.approve_reviews:
                    desk.approve(parked["id"], OPERATOR_UID)
                else:
                    desk.reject(parked["id"], OPERATOR_UID, "backtest: reviews are not approved (--approve-reviews)")
            venue.deliver()
            if journal.failed is not None:
                raise BacktestError(f"the journal failed ({label}): {journal.failed}")
            equity[k] = venue.equity(marks)
            if not equity[k] > 0.0 and ruined is None:
                ruined = minute.ts  # the account is wiped out: returns stop meaning anything
            if progress is not None:
                progress(label, k + 1, len(minutes), stats.orders_sent, float(equity[k]))
        closes = {i: (np.asarray(t, dtype=np.int64), np.asarray(c)) for i, (t, c) in per_symbol.items()}
        # A first row at the capital, a minute before the first bar closes: the first minute's
        # P&L counts like any other.
        if ruined is not None:
            # Ruin: from the first bar at or under zero the account is held at a millionth of the
            # capital (a drawdown of all but nothing), since a return from nothing is undefined.
            at = int(np.argmax(~(equity > 0.0)))
            equity[at:] = capital * 1e-6
        ts = np.asarray([minutes[0].ts - 60 * NS] + [m.ts for m in minutes], dtype=np.int64)
        series = bm.Series(ts, np.concatenate(([capital], equity)), np.asarray([capital, *bench]))
        trades = [bm.Trade(f.ts_ns, f.symbol, f.side, f.qty, f.price, f.cost, f.order_id) for f in venue.fills]
        counts = {
            "bars": stats.bars_received,
            "bars_rejected": sum(stats.bars_rejected.values()),
            "signals": dict(stats.signals),
            "intents": stats.intents,
            "orders_sent": stats.orders_sent,
            "orders_denied": dict(sorted(stats.orders_denied.items())),
            "fills": len(venue.fills),
            "reviews_parked": stats.reviews_parked,
            "halts": sorted({e.symbol or "(market)" for e in desk.halt_log if e.action == "halt"}),
            "batches": stats.batches,
            "ruined": None if ruined is None else _day(ruined),
        }
        t2o = stats.tick_to_order.samples().astype(np.float64) / 1000.0
        return Pass(label, series, trades, recorder.calls(closes), t2o, counts)
    finally:
        loop.set_exception_handler(previous_handler)
        venue.stop()
        runtime.close()
        journal.close()


# -- the whole backtest -----------------------------------------------------------------------


def _engine_set(engine: Engine) -> EngineSet:
    return EngineSet(engine, None, FailoverPolicy(10**12, 1, 1), time.perf_counter_ns)


def _annualisation(config: Config, ts: npt.NDArray[np.int64]) -> bm.Annualisation:
    q = config.qualification
    if q.session == "auto":
        return bm.detect_session(ts)
    if q.session == "custom":
        return bm.Annualisation("custom", q.minutes_per_day, q.days_per_year)
    return bm.SESSIONS[q.session]


def gate_spec(config: Config) -> bm.GateSpec:
    q = config.qualification
    return bm.GateSpec(
        min_excess_return=q.min_excess_return,
        max_drawdown=q.max_drawdown,
        max_losing_days_in_a_row=q.max_losing_days_in_a_row,
        min_sharpe=q.min_sharpe,
        min_accuracy=q.min_accuracy,
        min_trades=q.min_trades,
        min_days=q.min_days,
    )


class Progress:
    """One line on the terminal, rewritten at most every 0.2 s, per pass."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self._last = 0.0

    def __call__(self, label: str, k: int, total: int, orders: int, equity: float) -> None:
        if self.out is None:
            return
        now = time.monotonic()
        if k != total and now - self._last < 0.2:
            return
        self._last = now
        end = "\n" if k == total else ""
        self.out.write(
            f"\rbacktest {label}: minute {k}/{total} ({100 * k / total:.0f} %),"
            f" orders {orders}, equity {equity:,.2f}{end}"
        )
        self.out.flush()

    def say(self, text: str) -> None:
        if self.out is not None:
            self.out.write(text + "\n")
            self.out.flush()


async def run_backtest(opts: Options, base: Config, config_file: str, out: TextIO | None = sys.stderr) -> Result:
    progress = Progress(out)
    minutes = in_period(load_minutes(opts.data), opts.start, opts.end)
    if not minutes:
        raise BacktestError(f"no bars in {', '.join(map(str, opts.data))} between {opts.start} and {opts.end}")
    symbols = sorted({b.symbol for m in minutes for b in m.bars})
    if opts.benchmark is not None and opts.benchmark not in symbols:
        raise BacktestError(f"--benchmark {opts.benchmark}: not a symbol of the data ({', '.join(symbols[:20])})")
    progress.say(
        f"backtest: {sum(len(m.bars) for m in minutes)} bars of {len(symbols)} symbols in {len(minutes)} minutes,"
        f" {_day(minutes[0].ts)} .. {_day(minutes[-1].ts)}"
    )
    with tempfile.TemporaryDirectory(prefix="tradingd-backtest-") as tmp:
        config = backtest_config(base, symbols, opts.model, Path(tmp) / "model" / "journal.msgpack", config_file)
        capital = opts.capital or config.signal.notional_per_signal * len(symbols)
        model_path = resolve_model(config.engine.primary.model, "onnxruntime")
        engine = build_configured("primary", config.engine.primary)
        try:
            await asyncio.to_thread(engine.warm_up)
            Path(config.journal.path).parent.mkdir(parents=True)
            model = await run_pass(MODEL, minutes, config, _engine_set(engine), opts, capital, progress)
        finally:
            engine.close()
        annual = _annualisation(config, model.series.ts_ns)
        metrics = bm.compute(model.series, model.trades, model.calls, annual)
        gates = bm.gates(metrics, gate_spec(config))
        baselines: dict[str, bm.Metrics] = {}
        extra: dict[str, Pass] = {}
        held = bm.Series(model.series.ts_ns, model.series.benchmark, model.series.benchmark)
        no_calls = bm.Calls(np.zeros(0, dtype=np.int8), np.zeros(0), np.zeros(0))
        baselines[BENCHMARK] = bm.compute(held, [], no_calls, annual)
        if opts.baselines:
            for rule in BASELINE_RULES:
                journal = Path(tmp) / rule.replace(" ", "_") / "journal.msgpack"
                journal.parent.mkdir(parents=True)
                cfg = msgspec.structs.replace(
                    config, journal=msgspec.structs.replace(config.journal, path=str(journal))
                )
                rule_engine = RuleEngine(rule, engine.manifest, engine.buckets)
                p = await run_pass(rule, minutes, cfg, _engine_set(rule_engine), opts, capital, progress)
                extra[rule] = p
                baselines[rule] = bm.compute(p.series, p.trades, p.calls, annual)
    meta = {
        "model": {
            "path": str(model_path),
            "name": engine.manifest.name,
            "version": engine.manifest.version,
            "sha256": engine.manifest.sha256,
            "backend": engine.backend,
        },
        "data": [{"path": str(p), "sha256": sha256_of(p)} for p in opts.data],
        "period": {"from": _day(minutes[0].ts), "to": _day(minutes[-1].ts)},
        "symbols": len(symbols),
        "minutes": len(minutes),
        "capital": capital,
        "cost_bps": opts.cost_bps,
        "slippage_bps": opts.slippage_bps,
        "benchmark": opts.benchmark or "equal-weighted universe, bought and held",
        "approve_reviews": opts.approve_reviews,
        "halts": "lifted by an operator at each new session (UTC day)" if opts.lift_halts else "never lifted",
        "fills": "next bar's open plus slippage when the limit allows, else the limit when the bar trades through it",
        "journal_fsync": "none (a backtest's journal is thrown away)",
        "counts": model.counts,
        "config": config_file,
    }
    return Result(model, baselines, metrics, gates, bm.verdict(gates), annual, meta, extra)


def _day(ts: int) -> str:
    return datetime.fromtimestamp((ts - 1) // NS, UTC).date().isoformat()  # a bar's ts is its close


def finite_or_none(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value
