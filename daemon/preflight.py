"""What ``tradingd run`` checks before it opens a socket, in one place, so ``tradingd check`` can
run every one of them too.

The configuration file has been parsed and validated already (``daemon.config``); here come the
checks that need more than the file: both engines loaded as ``run`` loads them (manifest, model
hash, the standby's window and features against the primary's, a tensorrt primary that cannot
run here leaving the standby serving), ``batch.max_batch`` against the engines' largest batch
bucket, and the paths the daemon will create (the admin socket's length, the journal's and the
FIX store's not being directories). Nothing here opens a socket or writes a file. A failure is
the same error ``run`` raises (``ConfigError``, ``ManifestError``, ``ModelMismatchError``,
``BackendUnavailableError``), so the CLI maps it to the same exit code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog

from daemon import qualification
from daemon.config import Config, EngineConfig
from daemon.engineset import EngineSet
from daemon.errors import ConfigError
from engines.base import Engine, EngineSpec
from engines.chooser import build_engine, resolve_model
from engines.errors import BackendUnavailableError, PlanError
from engines.inject import FaultInjectingEngine, Injection
from risk.failover import FailoverPolicy

log = structlog.get_logger("tradingd.preflight")

# sockaddr_un.sun_path is 108 bytes on Linux, its terminating NUL included.
MAX_UNIX_SOCKET_PATH = 107


def engine_spec(name: str, cfg: EngineConfig) -> EngineSpec:
    """How to build the engine one ``[engine.primary]`` or ``[engine.standby]`` section names."""
    return EngineSpec(
        name=name,
        backend=cfg.backend,
        model=resolve_model(cfg.model, cfg.backend),
        batch_buckets=cfg.batch_buckets,
        intra_op_threads=cfg.intra_op_threads,
        inter_op_threads=cfg.inter_op_threads,
        graph_optimization=cfg.graph_optimization,
        allow_spinning=cfg.allow_spinning,
        expect_sha256=cfg.sha256,
        timing_table=cfg.timing_table,
        timing_quantile=cfg.timing_quantile,
    )


def build_configured(name: str, cfg: EngineConfig) -> Engine:
    """Build (load, not warm) one configured engine, wrapped in its fault injection if any."""
    engine = build_engine(engine_spec(name, cfg))
    if cfg.inject is not None:
        i = cfg.inject
        engine = FaultInjectingEngine(engine, Injection(i.kind, i.after_batches, i.batches, i.latency_ms))
        log.warning("engine_fault_injection", engine=name, kind=i.kind, after_batches=i.after_batches)
    return engine


def load_engines(config: Config, file: str, now_ns: Callable[[], int]) -> EngineSet:
    """Primary and standby, loaded and checked against each other and the configuration; a
    primary that cannot run here leaves the standby serving. The engines are not warmed."""
    primary: Engine | None = None
    primary_error: str | None = None
    try:
        primary = build_configured("primary", config.engine.primary)
    except (BackendUnavailableError, PlanError) as exc:
        if config.engine.standby is None:
            raise
        primary_error = str(exc)
        log.error("primary_engine_unavailable", backend=config.engine.primary.backend, error=primary_error)
    loaded = [e for e in (primary,) if e is not None]
    try:
        standby = build_configured("standby", config.engine.standby) if config.engine.standby is not None else None
        if standby is not None:
            loaded.append(standby)
        if primary is not None and standby is not None:
            for field in ("window", "feature_names"):
                if getattr(standby.manifest, field) != getattr(primary.manifest, field):
                    raise ConfigError(file, "engine.standby.model", f"{field} differs from the primary's")
        first = primary or standby
        assert first is not None
        fo = config.engine.failover
        budget_us = fo.budget_us or first.manifest.budget_us
        policy = FailoverPolicy(budget_us * 1000, fo.misses, fo.window)
        engines = EngineSet(primary, standby, policy, now_ns, primary_error=primary_error)
        if config.batch.max_batch > engines.max_rows:
            raise ConfigError(
                file,
                "batch.max_batch",
                f"{config.batch.max_batch} exceeds the engines' largest batch bucket {engines.max_rows}",
            )
        require_qualified(config, engines, file)
    except BaseException:
        for engine in loaded:
            engine.close()
        raise
    return engines


def require_qualified(config: Config, engines: EngineSet, file: str) -> None:
    """The deploy gate: every loaded engine's model has a passing ``tradingd backtest`` for its
    sha256 (``qualification.json`` beside it), unless ``engine.allow_unqualified``."""
    for role, engine in (("primary", engines.primary), ("standby", engines.standby)):
        if engine is None:
            continue
        cfg = config.engine.primary if role == "primary" else config.engine.standby
        assert cfg is not None
        model = resolve_model(cfg.model, cfg.backend)
        found = qualification.standing(
            model, engine.manifest.sha256, qualification.required_gates(config.qualification)
        )
        if found.ok:
            log.info("model_qualified", engine=role, model=str(model), detail=found.reason)
        elif config.engine.allow_unqualified:
            log.error(
                "model_unqualified",
                engine=role,
                model=str(model),
                detail=found.reason,
                action="trading anyway: engine.allow_unqualified = true",
            )
        else:
            raise ConfigError(
                file,
                f"engine.{role}.model",
                f"{model} (sha256 {engine.manifest.sha256[:16]}…) is not qualified to trade: {found.reason};"
                " or set engine.allow_unqualified = true (demos and benchmarks only)",
            )


def serving_standing(config: Config, engines: EngineSet) -> qualification.Standing:
    """The deploy gate's word on the engine that serves first."""
    cfg = config.engine.primary if engines.active is engines.primary else config.engine.standby
    assert cfg is not None
    return qualification.standing(
        resolve_model(cfg.model, cfg.backend),
        engines.active.manifest.sha256,
        qualification.required_gates(config.qualification),
    )


def check_paths(config: Config, file: str) -> None:
    """The paths the daemon creates at start must be usable as what they are for. Whether their
    folders are writable is left to start-up: systemd creates them for the service's user."""
    socket = config.admin.socket
    if len(socket.encode()) > MAX_UNIX_SOCKET_PATH:
        raise ConfigError(
            file, "admin.socket", f"{len(socket.encode())} bytes; a Unix socket path is at most {MAX_UNIX_SOCKET_PATH}"
        )
    if Path(socket).is_dir():
        raise ConfigError(file, "admin.socket", f"{socket} is a directory")
    journal = Path(config.journal.path)
    if journal.is_dir():
        raise ConfigError(file, "journal.path", f"{journal} is a directory")
    store = config.broker.fix.store
    if config.broker.protocol != "native" and store is not None and Path(store).is_dir():
        raise ConfigError(file, "broker.fix.store", f"{store} is a directory")


def preflight(config: Config, file: str, now_ns: Callable[[], int]) -> list[str]:
    """Every check ``run`` makes before opening a socket. Raises what ``run`` would raise; returns
    one line per engine loaded (what would serve)."""
    check_paths(config, file)
    engines = load_engines(config, file, now_ns)
    try:
        lines = []
        for engine in engines.engines:
            m = engine.manifest
            role = "active" if engine is engines.active else "standby"
            lines.append(
                f"engine {engine.name} ({role}): {engine.backend} {m.name} {m.version}, sha256 {m.sha256[:16]},"
                f" buckets {list(engine.buckets)}, window {m.window}, features {len(m.features)}"
            )
        if engines.primary is None:
            lines.append(f"engine primary: unavailable here ({engines.primary_error}); the standby would serve")
        return lines
    finally:
        for engine in engines.engines:
            engine.close()
