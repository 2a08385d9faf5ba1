"""Configuration: one TOML file, frozen typed sections, validated at this one load point.

Unknown keys and bad values are errors that name the file and the key (``ConfigError``); the
CLI turns them into exit code 78. ``deploy/tradingd.example.toml`` documents every key.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from daemon.errors import ConfigError

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
Symbol = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._/-]+$")]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class FeedConfig(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 7001
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=64, le=1 << 20)] = 4096
    reconnect_initial_ms: PositiveInt = 50
    reconnect_max_ms: PositiveInt = 5000


class UniverseConfig(_Section, frozen=True):
    symbols: Annotated[tuple[Symbol, ...], msgspec.Meta(min_length=1)] = ("SPY",)


class BatchConfig(_Section, frozen=True):
    max_batch: PositiveInt = 256
    max_delay_us: Annotated[int, msgspec.Meta(ge=0)] = 1000


class InjectConfig(_Section, frozen=True):
    """A fault injected into this engine, for failover drills and tests (never in production)."""

    kind: Literal["latency", "exception", "nan"]
    after_batches: Annotated[int, msgspec.Meta(ge=0)] = 0
    batches: Annotated[int, msgspec.Meta(ge=0)] = 0
    latency_ms: PositiveFloat = 10.0


class EngineConfig(_Section, frozen=True):
    backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    model: str = "builtin"
    sha256: str | None = None
    batch_buckets: tuple[PositiveInt, ...] | None = None
    intra_op_threads: PositiveInt = 1
    inter_op_threads: PositiveInt = 1
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    allow_spinning: bool = False
    device: Annotated[int, msgspec.Meta(ge=0)] = 0
    inject: InjectConfig | None = None


class FailoverConfig(_Section, frozen=True):
    budget_us: PositiveInt | None = None  # default: the primary manifest's budget_us (5000)
    misses: PositiveInt = 3
    window: PositiveInt = 20


class GpuConfig(_Section, frozen=True):
    """GPU health through NVML (only where a tensorrt engine is configured)."""

    poll_s: PositiveFloat = 1.0
    require_ecc: bool = False
    max_temperature_c: PositiveInt = 87


class EnginesConfig(_Section, frozen=True):
    primary: EngineConfig = EngineConfig()
    standby: EngineConfig | None = None
    failover: FailoverConfig = FailoverConfig()
    gpu: GpuConfig = GpuConfig()


class SignalConfig(_Section, frozen=True):
    confidence_threshold: Fraction = 0.5
    lot_size: PositiveInt = 1
    notional_per_signal: PositiveFloat = 10_000.0
    limit_offset_bps: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 0.0
    allow_short: bool = True
    accuracy_window: PositiveInt = 500


class SymbolRiskConfig(_Section, frozen=True):
    """Per-symbol overrides of the order limits (every key optional)."""

    max_order_qty: PositiveInt | None = None
    max_order_notional: PositiveFloat | None = None
    max_position: PositiveInt | None = None
    collar_pct: PositiveFloat | None = None


class HaltConfig(_Section, frozen=True):
    move_pct: PositiveFloat = 5.0
    benchmark: Symbol | None = None
    market_share: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    cooloff_s: PositiveFloat | None = None
    cancel_open_orders: bool = True


class RiskConfig(_Section, frozen=True):
    max_order_qty: PositiveInt = 100_000
    max_order_notional: PositiveFloat = 5_000_000.0
    max_position: PositiveInt = 1_000_000
    collar_pct: PositiveFloat = 5.0
    max_gross_exposure: PositiveFloat = 50_000_000.0
    max_signal_age_s: PositiveFloat = 90.0
    max_price_age_s: PositiveFloat = 180.0
    throttle_orders: PositiveInt = 100
    throttle_window_ms: PositiveInt = 1000
    duplicate_window_ms: Annotated[int, msgspec.Meta(ge=0)] = 5000
    review_threshold: PositiveFloat = 1_000_000.0
    review_ttl_s: PositiveFloat = 300.0
    clock: Literal["wall", "feed"] = "wall"
    halt: HaltConfig = HaltConfig()
    symbols: dict[Symbol, SymbolRiskConfig] = {}


class FixConfig(_Section, frozen=True):
    sender_comp_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "TRADINGD"
    target_comp_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "EXECUTOR"
    heartbeat_s: Annotated[int, msgspec.Meta(ge=1, le=300)] = 30
    time_in_force: Literal["day", "gtc", "ioc", "fok"] = "day"
    store: str | None = None  # sequence numbers; default: beside the journal
    status_timeout_s: PositiveFloat = 2.0
    reset_on_logon: bool = False
    accept_peer_reset: bool = False


class BrokerConfig(_Section, frozen=True):
    protocol: Literal["native", "fix44", "fix42"] = "native"
    host: str = "127.0.0.1"
    port: Port = 7002
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=64, le=1 << 24)] = 1 << 20
    reconnect_initial_ms: PositiveInt = 50
    reconnect_max_ms: PositiveInt = 5000
    fix: FixConfig = FixConfig()


class MetricsConfig(_Section, frozen=True):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 9108


class AdminConfig(_Section, frozen=True):
    socket: str = "/run/tradingd/admin.sock"
    operators: tuple[Annotated[int, msgspec.Meta(ge=0)], ...] = (0,)


class JournalConfig(_Section, frozen=True):
    path: str = "/var/lib/tradingd/journal.msgpack"
    fsync: Literal["none", "batch", "always"] = "batch"


class ProcessConfig(_Section, frozen=True):
    # How long a Python thread may hold the GIL while another waits (sys.setswitchinterval).
    # The default 5 ms lets a metrics scrape or a log write on another thread delay a batch by
    # up to that long; 500 us bounds it (bench/RESULTS.md, observability overhead).
    switch_interval_us: Annotated[int, msgspec.Meta(ge=100, le=100_000)] = 500


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


_AT = re.compile(r"^(?P<problem>.*) - at `\$(?P<where>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")


def _key_path(where: str) -> str:
    return where.removeprefix(".") or "(top level)"


def parse_config(raw: dict[str, Any], file: str) -> Config:
    """Validate a decoded TOML document; every error names the key."""
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _AT.match(message)
        problem, where = (match["problem"], match["where"]) if match else (message, "")
        unknown = _UNKNOWN.match(problem)
        if unknown:
            key = ".".join(p for p in (_key_path(where) if where else "", unknown["field"]) if p)
            raise ConfigError(file, key, "unknown key") from exc
        raise ConfigError(file, _key_path(where), problem) from exc
    _check(config, file)
    return config


def _check(config: Config, file: str) -> None:
    symbols = config.universe.symbols
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
    fo = config.engine.failover
    if fo.misses > fo.window:
        raise ConfigError(file, "engine.failover.misses", f"{fo.misses} exceeds engine.failover.window {fo.window}")
    if config.engine.standby is not None and config.engine.standby.inject is not None:
        raise ConfigError(file, "engine.standby.inject", "faults are injected into the primary only")


def config_digest(config: Config) -> str:
    """sha256 of the configuration as the daemon understood it (every default filled in)."""
    return hashlib.sha256(msgspec.json.encode(config)).hexdigest()


def load_config(path: Path) -> Config:
    """Read, parse and validate one TOML file."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(str(path), "(file)", "no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(syntax)", str(exc)) from exc
    return parse_config(raw, str(path))
