"""The one owner of the process lifecycle: start-up, run, shutdown as separate steps.

Start-up loads and warms the engines, opens the journal, connects the broker, then the feed;
only then is the daemon ready. Shutdown stops intake first, lets the waiting batch finish and
its orders go out, then closes the broker connection and the journal, within a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import structlog

from broker import protocol as wire
from broker.client import GatewayClient
from broker.journal import Journal, recover_journal
from broker.reconnect import Backoff
from daemon.admin import AdminServer
from daemon.clock import Clock, SystemClock
from daemon.config import Config, EngineConfig
from daemon.errors import ConfigError
from daemon.feed.ingest import FeedConnector
from daemon.metrics import StatsCollector
from daemon.runtime import Runtime
from daemon.stats import Stats
from engines.base import Engine, EngineSpec
from engines.chooser import build_engine, resolve_model

log = structlog.get_logger("tradingd.app")


def engine_spec(name: str, cfg: EngineConfig) -> EngineSpec:
    return EngineSpec(
        name=name,
        backend=cfg.backend,
        model=resolve_model(cfg.model),
        batch_buckets=cfg.batch_buckets,
        intra_op_threads=cfg.intra_op_threads,
        inter_op_threads=cfg.inter_op_threads,
        graph_optimization=cfg.graph_optimization,
        allow_spinning=cfg.allow_spinning,
        expect_sha256=cfg.sha256,
    )


class Daemon:
    def __init__(self, config: Config, *, clock: Clock | None = None, config_file: str = "(config)") -> None:
        self.config = config
        self.config_file = config_file
        self.clock = clock or SystemClock()
        self.stats = Stats()
        self.engine: Engine | None = None
        self.standby: Engine | None = None
        self.runtime: Runtime | None = None
        self.gateway: GatewayClient | None = None
        self.metrics_port: int | None = None
        self._metrics_server: WSGIServer | None = None
        self._feed: FeedConnector | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._journal: Journal | None = None
        self.admin: AdminServer | None = None

    async def start(self, status: Callable[[str], None] = lambda _: None) -> None:
        cfg = self.config
        status("loading engines")
        self.engine = await asyncio.to_thread(build_engine, engine_spec("primary", cfg.engine.primary))
        if cfg.batch.max_batch > self.engine.buckets[-1]:
            raise ConfigError(
                self.config_file,
                "batch.max_batch",
                f"{cfg.batch.max_batch} exceeds the engine's largest batch bucket {self.engine.buckets[-1]}",
            )
        if cfg.engine.standby is not None:
            self.standby = await asyncio.to_thread(build_engine, engine_spec("standby", cfg.engine.standby))
            for field in ("window", "feature_names"):
                if getattr(self.standby.manifest, field) != getattr(self.engine.manifest, field):
                    raise ConfigError(
                        self.config_file,
                        "engine.standby.model",
                        f"{field} differs from the primary's",
                    )
        status("warming engines")
        for engine in (self.engine, self.standby):
            if engine is not None:
                await asyncio.to_thread(engine.warm_up)
                m = engine.manifest
                log.info(
                    "engine_ready",
                    engine=engine.name,
                    backend=engine.backend,
                    model=m.name,
                    version=m.version,
                    sha256=m.sha256[:16],
                    buckets=list(engine.buckets),
                    window=m.window,
                    features=list(m.feature_names),
                )
        status("replaying journal")
        journal_path = Path(cfg.journal.path)
        records, torn = await asyncio.to_thread(recover_journal, journal_path)
        if torn:
            log.warning("journal_torn_tail", path=str(journal_path), bytes_cut=torn)
        self._journal = Journal(journal_path, cfg.journal.fsync)
        self.runtime = runtime = Runtime(cfg, self.engine, self.clock, self._journal, self.stats)
        desk = runtime.desk
        desk.restore(records)
        desk.begin_session()
        log.info(
            "journal_replayed",
            path=str(journal_path),
            records=len(records),
            session=desk.session,
            orders=len(desk.book.orders),
            parked=len(desk.reviews),
            halted=desk.halts.halted_symbols(),
            market=str(desk.halts.market),
            kill=desk.kill,
        )

        status("connecting broker")
        b = cfg.broker
        reconciled = asyncio.Event()

        def on_status(message: wire.Status) -> None:
            desk.reconcile(message)
            reconciled.set()

        self.gateway = GatewayClient(
            b.host,
            b.port,
            on_report=desk.on_report,
            on_event=desk.on_broker_event,
            on_status=on_status,
            backoff=Backoff(b.reconnect_initial_ms / 1000, b.reconnect_max_ms / 1000),
            max_frame_bytes=b.max_frame_bytes,
        )
        desk.gateway = self.gateway
        self._tasks.append(asyncio.create_task(self.gateway.run(), name="broker"))
        status("reconciling with the broker")
        await reconciled.wait()

        self.admin = AdminServer(desk, runtime, cfg.admin)
        await self.admin.start()
        self._tasks.append(asyncio.create_task(self._expire_reviews(), name="review-expiry"))

        if cfg.metrics.enabled:
            self._serve_metrics()
        status("connecting feed")
        f = cfg.feed
        self._feed = FeedConnector(
            runtime,
            f.host,
            f.port,
            f.max_frame_bytes,
            Backoff(f.reconnect_initial_ms / 1000, f.reconnect_max_ms / 1000),
            runtime.on_feed_event,
            self.clock.mono_ns,
        )
        self._tasks.append(asyncio.create_task(self._feed.run(), name="feed"))
        log.info(
            "started",
            symbols=len(cfg.universe.symbols),
            broker=f"{b.host}:{b.port}",
            feed=f"{f.host}:{f.port}",
            metrics_port=self.metrics_port,
        )
        status("running")

    async def _expire_reviews(self) -> None:
        desk = self.runtime.desk if self.runtime else None
        while desk is not None and not self._stop.is_set():
            desk.expire_reviews()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=1.0)

    def _serve_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server  # noqa: PLC0415

        registry = CollectorRegistry()
        desk = self.runtime.desk if self.runtime else None
        registry.register(
            StatsCollector(
                self.stats, lambda: self.engine.name if self.engine else "none", desk.status if desk else None
            )
        )
        m = self.config.metrics
        server, _ = start_http_server(m.port, addr=m.host, registry=registry)
        self._metrics_server = server
        self.metrics_port = int(server.server_port)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def shutdown(self, deadline_s: float = 5.0) -> None:
        """Stop intake, finish the waiting batch and its orders, close connections and files."""
        if self._feed is not None:
            self._feed.stop()
        runtime = self.runtime
        if runtime is not None:
            runtime.drain_now()
            try:
                await asyncio.wait_for(runtime.idle_event.wait(), timeout=deadline_s)
            except TimeoutError:
                log.error(
                    "shutdown_deadline",
                    waiting=len(runtime.batcher),
                    detail="gave up on waiting batches",
                )
            open_orders = len(runtime.book.working)
            if open_orders:
                log.warning("shutdown_open_orders", count=open_orders)
        self._stop.set()
        if self.admin is not None:
            await self.admin.close()
        if self.gateway is not None:
            self.gateway.stop()
        for task in self._tasks:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=deadline_s)
        if runtime is not None:
            runtime.close()
        if self._journal is not None:
            self._journal.close()
        for engine in (self.engine, self.standby):
            if engine is not None:
                engine.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("stopped", bars=self.stats.bars_received, orders_sent=self.stats.orders_sent)
