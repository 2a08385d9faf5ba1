"""Configuration: one TOML file, frozen typed sections, validated at this one load point.

Unknown keys and bad values are errors that name the file and the key (``ConfigError``); the
CLI turns them into exit code 78. ``deploy/tradingd.example.toml`` documents every key.

Every number is bounded: no key takes inf or nan, and none takes a value so large that a size,
a time in nanoseconds or a count built from it stops fitting the int64s, floats and msgpack
integers it ends up in. A file that is not UTF-8 is a ConfigError like any other.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from daemon.errors import ConfigError

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0, le=1_000_000_000)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0, le=1e15)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
# Quantities in shares and amounts in currency: far inside float and int64 precision, so a
# quantity times a price (at most feed.max_price) stays an exact, finite number.
Quantity = Annotated[int, msgspec.Meta(gt=0, le=1_000_000_000_000)]
Money = Annotated[float, msgspec.Meta(gt=0, le=1e15)]
# Durations: at most ~31 years in seconds, so a duration in ns fits an int64 with room to spare.
Seconds = Annotated[float, msgspec.Meta(gt=0, le=1e9)]
Millis = Annotated[int, msgspec.Meta(gt=0, le=86_400_000)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]
Percent = Annotated[float, msgspec.Meta(gt=0, le=100)]
Threads = Annotated[int, msgspec.Meta(gt=0, le=1024)]
BatchRows = Annotated[int, msgspec.Meta(gt=0, le=65_536)]
Uid = Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]
Symbol = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._/-]+$")]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class FeedConfig(_Section, frozen=True):
    # "msgpack": protocol v1 (a map per bar, minute_end); "dbn": Databento Binary Encoding,
    # OHLCV-1m records, decoded in bulk (a minute ends when every symbol has reported it).
    format: Literal["msgpack", "dbn"] = "msgpack"
    host: str = "127.0.0.1"
    # A connect the peer does not complete in this long (it takes the SYN and never answers)
    # fails and is retried after the backoff delay.
    connect_timeout_ms: Annotated[int, msgspec.Meta(ge=10, le=600_000)] = 2000
    port: Port = 7001
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=64, le=1 << 20)] = 4096
    reconnect_initial_ms: Millis = 50
    reconnect_max_ms: Millis = 5000
    # Bounds on every bar (daemon.feed.protocol.FeedBounds); a bar outside them is rejected and
    # counted by reason. Prices within [1e-12, 1e12] keep every feature and order size finite.
    min_price: Annotated[float, msgspec.Meta(ge=1e-12, le=1e12)] = 1e-6
    max_price: Annotated[float, msgspec.Meta(ge=1e-12, le=1e12)] = 1e9
    max_volume: Annotated[float, msgspec.Meta(gt=0, le=1e18)] = 1e15
    max_future_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 120.0
    max_ahead_s: Annotated[float, msgspec.Meta(gt=0, le=1e9)] = 864_000.0


class UniverseConfig(_Section, frozen=True):
    symbols: Annotated[tuple[Symbol, ...], msgspec.Meta(min_length=1, max_length=65_536)] = ("SPY",)


class BatchConfig(_Section, frozen=True):
    max_batch: BatchRows = 256
    max_delay_us: Annotated[int, msgspec.Meta(ge=0, le=60_000_000)] = 1000


class InjectConfig(_Section, frozen=True):
    """A fault injected into this engine, for failover drills and tests (never in production)."""

    kind: Literal["latency", "exception", "nan"]
    after_batches: Count = 0
    batches: Count = 0
    latency_ms: Annotated[float, msgspec.Meta(gt=0, le=60_000)] = 10.0


class EngineConfig(_Section, frozen=True):
    backend: Literal["onnxruntime", "tensorrt", "timing"] = "onnxruntime"
    model: str = "builtin"
    sha256: str | None = None
    batch_buckets: Annotated[tuple[BatchRows, ...], msgspec.Meta(max_length=64)] | None = None
    intra_op_threads: Threads = 1
    inter_op_threads: Threads = 1
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    allow_spinning: bool = False
    device: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 0
    inject: InjectConfig | None = None
    # The timing backend (a benchmark stand-in that sleeps measured GPU times): the gpu_check.json
    # it reads ("builtin": the source checkout's bench/gpu/gpu_check.json) and the percentile.
    timing_table: str = "builtin"
    timing_quantile: Literal["p50", "p99"] = "p50"


class FailoverConfig(_Section, frozen=True):
    budget_us: Annotated[int, msgspec.Meta(gt=0, le=60_000_000)] | None = None  # default: the manifest's (5000)
    misses: Annotated[int, msgspec.Meta(gt=0, le=10_000)] = 3
    window: Annotated[int, msgspec.Meta(gt=0, le=10_000)] = 20


class GpuConfig(_Section, frozen=True):
    """GPU health through NVML (only where a tensorrt engine is configured)."""

    poll_s: Annotated[float, msgspec.Meta(ge=0.01, le=3600)] = 1.0
    require_ecc: bool = False
    max_temperature_c: Annotated[int, msgspec.Meta(gt=0, le=150)] = 87


class EnginesConfig(_Section, frozen=True):
    primary: EngineConfig = EngineConfig()
    standby: EngineConfig | None = None
    failover: FailoverConfig = FailoverConfig()
    gpu: GpuConfig = GpuConfig()
    # Trade a model with no passing qualification (``tradingd backtest``) for its sha256: for
    # demos and benchmarks only; logged as an error at start and exported as a gauge.
    allow_unqualified: bool = False


class QualificationConfig(_Section, frozen=True):
    """What ``tradingd backtest`` requires of a model before it may trade (the guide's gates),
    and the live accuracy floor."""

    min_excess_return: Annotated[float, msgspec.Meta(ge=-10.0, le=100.0)] = 0.15  # a year, over the benchmark
    max_drawdown: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.08
    max_losing_days_in_a_row: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 3
    min_sharpe: Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)] = 2.0
    min_accuracy: Fraction = 0.65
    min_trades: Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)] = 20
    min_days: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 5
    # The session the returns are annualised by: "auto" reads it from the data's bar times.
    session: Literal["auto", "us_equity", "24h", "custom"] = "auto"
    minutes_per_day: Annotated[int, msgspec.Meta(gt=0, le=1440)] = 390  # for session = "custom"
    days_per_year: Annotated[int, msgspec.Meta(gt=0, le=366)] = 252  # for session = "custom"
    # Live: the accuracy alert fires under the larger of this floor and the accuracy the model
    # qualified with, less ``live_accuracy_margin``.
    live_accuracy_floor: Fraction = 0.65
    live_accuracy_margin: Fraction = 0.05


class SignalConfig(_Section, frozen=True):
    confidence_threshold: Fraction = 0.5
    lot_size: PositiveInt = 1
    notional_per_signal: Annotated[float, msgspec.Meta(gt=0, le=1e12)] = 10_000.0
    limit_offset_bps: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 0.0
    allow_short: bool = True
    accuracy_window: Annotated[int, msgspec.Meta(gt=0, le=1_000_000)] = 500


class SymbolRiskConfig(_Section, frozen=True):
    """Per-symbol overrides of the order limits (every key optional)."""

    max_order_qty: Quantity | None = None
    max_order_notional: Money | None = None
    max_position: Quantity | None = None
    collar_pct: Percent | None = None


class HaltConfig(_Section, frozen=True):
    move_pct: Percent = 5.0
    benchmark: Symbol | None = None
    market_share: Annotated[float, msgspec.Meta(gt=0, le=100)] = 0.5  # over 1: never by share
    cooloff_s: Seconds | None = None
    cancel_open_orders: bool = True


class RiskConfig(_Section, frozen=True):
    max_order_qty: Quantity = 100_000
    max_order_notional: Money = 5_000_000.0
    max_position: Quantity = 1_000_000
    collar_pct: Percent = 5.0
    max_gross_exposure: Money = 50_000_000.0
    max_signal_age_s: Seconds = 90.0
    max_price_age_s: Seconds = 180.0
    throttle_orders: Annotated[int, msgspec.Meta(gt=0, le=1_000_000)] = 100
    throttle_window_ms: Millis = 1000
    duplicate_window_ms: Annotated[int, msgspec.Meta(ge=0, le=86_400_000)] = 5000
    review_threshold: Money = 1_000_000.0
    review_ttl_s: Seconds = 300.0
    clock: Literal["wall", "feed"] = "wall"
    halt: HaltConfig = HaltConfig()
    symbols: dict[Symbol, SymbolRiskConfig] = {}


class FixConfig(_Section, frozen=True):
    sender_comp_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "TRADINGD"
    target_comp_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "EXECUTOR"
    heartbeat_s: Annotated[int, msgspec.Meta(ge=1, le=300)] = 30
    time_in_force: Literal["day", "gtc", "ioc", "fok"] = "day"
    store: str | None = None  # sequence numbers; default: beside the journal
    status_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 2.0
    reset_on_logon: bool = False
    accept_peer_reset: bool = False
    # A peer that takes the connection and never answers the Logon is dropped and retried.
    logon_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0


class BrokerConfig(_Section, frozen=True):
    protocol: Literal["native", "fix44", "fix42"] = "native"
    host: str = "127.0.0.1"
    port: Port = 7002
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=64, le=1 << 24)] = 1 << 20
    reconnect_initial_ms: Millis = 50
    reconnect_max_ms: Millis = 5000
    connect_timeout_ms: Annotated[int, msgspec.Meta(ge=10, le=600_000)] = 2000  # as feed.connect_timeout_ms
    # While a minute is being traded (a batch in inference or bars waiting for one), execution
    # reports wait, at most this long after they were read, so a batch's acks and fills do not
    # hold up the next batch's orders. Safe to wait: a fill moves working quantity into the
    # position, so the exposure the gates check is the same either way. 0: never wait.
    report_hold_ms: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 50
    fix: FixConfig = FixConfig()


class MetricsConfig(_Section, frozen=True):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 9108


class AdminConfig(_Section, frozen=True):
    socket: str = "/run/tradingd/admin.sock"
    operators: Annotated[tuple[Uid, ...], msgspec.Meta(max_length=1024)] = (0,)


class JournalConfig(_Section, frozen=True):
    path: str = "/var/lib/tradingd/journal.msgpack"
    fsync: Literal["none", "batch", "always"] = "batch"
    # A snapshot (then a new segment) when the first of these is reached, and at a clean stop.
    snapshot_interval_s: Annotated[float, msgspec.Meta(ge=1.0, le=86_400.0)] = 60.0
    snapshot_records: Annotated[int, msgspec.Meta(ge=100, le=100_000_000)] = 200_000
    snapshot_bytes: Annotated[int, msgspec.Meta(ge=1 << 16, le=1 << 40)] = 64 << 20
    # Retention: the newest ``keep_snapshots`` snapshots and the segments they need always stay;
    # older sealed segments go past any of these limits.
    keep_snapshots: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    max_segments: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 200
    max_bytes: Annotated[int, msgspec.Meta(ge=1 << 20, le=1 << 50)] = 4 << 30
    max_age_days: Annotated[float, msgspec.Meta(gt=0, le=36_500.0)] = 30.0
    # A restored window whose last bar is older than this at the symbol's next bar is stale: the
    # symbol warms up again (and the log says so).
    window_max_gap_s: Annotated[float, msgspec.Meta(ge=60.0, le=86_400.0 * 30)] = 300.0


class ProcessConfig(_Section, frozen=True):
    # How long a Python thread may hold the GIL while another waits (sys.setswitchinterval).
    # The default 5 ms lets a metrics scrape or a log write on another thread delay a batch by
    # up to that long; 500 us bounds it (bench/RESULTS.md, observability overhead).
    switch_interval_us: Annotated[int, msgspec.Meta(ge=100, le=100_000)] = 500
    # The minute loop is stalled when the feed stays paused with no batch in flight, or one
    # batch stays in inference, this long: the daemon then fail-stops (exit 70) instead of
    # looking healthy while it trades nothing.
    stall_s: Annotated[float, msgspec.Meta(ge=1.0, le=3600.0)] = 10.0


class LogConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section, frozen=True):
    feed: FeedConfig = FeedConfig()
    universe: UniverseConfig = UniverseConfig()
    batch: BatchConfig = BatchConfig()
    engine: EnginesConfig = EnginesConfig()
    signal: SignalConfig = SignalConfig()
    risk: RiskConfig = RiskConfig()
    broker: BrokerConfig = BrokerConfig()
    metrics: MetricsConfig = MetricsConfig()
    admin: AdminConfig = AdminConfig()
    journal: JournalConfig = JournalConfig()
    log: LogConfig = LogConfig()
    process: ProcessConfig = ProcessConfig()
    qualification: QualificationConfig = QualificationConfig()


_AT = re.compile(r"^(?P<problem>.*) - at `\$(?P<where>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")


def _key_path(where: str) -> str:
    return where.removeprefix(".") or "(top level)"


_SYMBOL_ENTRY = ".risk.symbols[...]"


def _name_symbol(raw: dict[str, Any], where: str) -> str:
    # msgspec says risk.symbols[...] for any entry of the table; find the entry it means.
    if not where.startswith(_SYMBOL_ENTRY + "."):
        return where
    risk = raw.get("risk")
    entries = risk.get("symbols") if isinstance(risk, dict) else None
    for name, entry in entries.items() if isinstance(entries, dict) else ():
        try:
            msgspec.convert(entry, SymbolRiskConfig)
        except msgspec.ValidationError:
            return f".risk.symbols.{name}" + where.removeprefix(_SYMBOL_ENTRY)
    return where


def parse_config(raw: dict[str, Any], file: str) -> Config:
    """Validate a decoded TOML document; every error names the key."""
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _AT.match(message)
        problem, where = (match["problem"], match["where"]) if match else (message, "")
        where = _name_symbol(raw, where)
        unknown = _UNKNOWN.match(problem)
        if unknown:
            key = ".".join(p for p in (_key_path(where) if where else "", unknown["field"]) if p)
            raise ConfigError(file, key, "unknown key") from exc
        raise ConfigError(file, _key_path(where), problem) from exc
    _check_numbers(config, file)
    _check(config, file)
    return config


# No integer key needs more; msgspec accepts any Python int TOML gives it, however large.
_INT_LIMIT = 1 << 53


def _check_numbers(value: object, file: str, key: str = "") -> None:
    # Every float finite and every int modest, whatever the key: a net under the per-key bounds.
    if isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            _check_numbers(getattr(value, name), file, f"{key}.{name}" if key else name)
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_numbers(item, file, f"{key}.{name}")
    elif isinstance(value, tuple):
        for item in value:
            _check_numbers(item, file, key)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(file, key, f"must be a finite number, got {value}")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > _INT_LIMIT:
        raise ConfigError(file, key, f"out of range: {value}")


def _check(config: Config, file: str) -> None:
    symbols = config.universe.symbols
    feed = config.feed
    if feed.min_price >= feed.max_price:
        raise ConfigError(file, "feed.min_price", f"{feed.min_price} is not below feed.max_price {feed.max_price}")
    if len(set(symbols)) != len(symbols):
        dupes = sorted({s for s in symbols if symbols.count(s) > 1})
        raise ConfigError(file, "universe.symbols", f"duplicate symbols {dupes}")
    for section in ("feed", "broker"):
        part = getattr(config, section)
        if part.reconnect_initial_ms > part.reconnect_max_ms:
            raise ConfigError(file, f"{section}.reconnect_initial_ms", "must not exceed reconnect_max_ms")
    unknown = sorted(set(config.risk.symbols) - set(symbols))
    if unknown:
        raise ConfigError(file, f"risk.symbols.{unknown[0]}", "not in universe.symbols")
    bench = config.risk.halt.benchmark
    if bench is not None and bench not in symbols:
        raise ConfigError(file, "risk.halt.benchmark", f"{bench!r} is not in universe.symbols")
    for name in ("primary", "standby"):
        engine = getattr(config.engine, name)
        buckets = engine.batch_buckets if engine is not None else None
        if buckets is not None and list(buckets) != sorted(set(buckets)):
            raise ConfigError(file, f"engine.{name}.batch_buckets", f"must be strictly increasing: {list(buckets)}")
        if engine is not None and engine.backend == "timing":
            _check_timing_table(engine, file, f"engine.{name}.timing_table")
    fo = config.engine.failover
    if fo.misses > fo.window:
        raise ConfigError(file, "engine.failover.misses", f"{fo.misses} exceeds engine.failover.window {fo.window}")
    if config.engine.standby is not None and config.engine.standby.inject is not None:
        raise ConfigError(file, "engine.standby.inject", "faults are injected into the primary only")


def _check_timing_table(engine: EngineConfig, file: str, key: str) -> None:
    # The table is read here too, so a missing or malformed one is a configuration error (78)
    # naming the key as well as the table's file and field.
    from engines.timing import TimingTableError, load_timing_table, resolve_timing_table  # noqa: PLC0415

    try:
        load_timing_table(resolve_timing_table(engine.timing_table))
    except TimingTableError as exc:
        raise ConfigError(file, key, str(exc)) from exc


def config_digest(config: Config) -> str:
    """sha256 of the configuration as the daemon understood it (every default filled in)."""
    return hashlib.sha256(msgspec.json.encode(config)).hexdigest()


def load_config(path: Path) -> Config:
    """Read, parse and validate one TOML file."""
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(str(path), "(file)", "no such file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "(file)", f"not UTF-8: {exc.reason} at byte {exc.start}") from exc
    except OSError as exc:
        raise ConfigError(str(path), "(file)", f"cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(syntax)", str(exc)) from exc
    return parse_config(raw, str(path))
