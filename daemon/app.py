"""The one owner of the process lifecycle: start-up, run, shutdown as separate steps.

Start-up loads and warms the engines, opens the journal, connects the broker, then the feed;
only then is the daemon ready. Shutdown stops intake first, lets the waiting batch finish and
its orders go out, then closes the broker connection and the journal, within a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import structlog

from broker import protocol as wire
from broker.client import Gateway, GatewayClient
from broker.errors import JournalError
from broker.journal import Journal, Retention, prune, recover, write_snapshot
from broker.reconnect import Backoff
from daemon import qualification, snapshot
from daemon.admin import AdminServer
from daemon.clock import Clock, SystemClock
from daemon.config import Config
from daemon.engineset import EngineSet, FailoverEvent
from daemon.errors import ConfigError
from daemon.feed.dbn_ingest import DbnFeedProtocol
from daemon.feed.ingest import FeedConnector
from daemon.metrics import StatsCollector
from daemon.preflight import check_paths, load_engines, serving_standing
from daemon.runtime import Runtime
from daemon.sdnotify import Notifier
from daemon.stats import SignalAccuracy, Stats
from engines.gpu_health import GpuMonitor
from risk.failover import FailoverReason

log = structlog.get_logger("tradingd.app")


SUPERVISE_S = 0.5
STATUS_RETRY_NS = 10_000_000_000


@dataclass(frozen=True, slots=True)
class Snapshot:
    made_s: float  # time.monotonic() when the loop made it
    desk: dict[str, Any]
    engines: dict[str, object] | None
    journal_bytes: int


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        config_file: str = "(config)",
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.config_file = config_file
        self.clock = clock or SystemClock()
        self.stats = Stats()
        self.stats.accuracy = SignalAccuracy(config.signal.accuracy_window)
        self.engines: EngineSet | None = None
        self.gpu: GpuMonitor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.notifier = notifier or Notifier({})
        self.ready = asyncio.Event()
        self.runtime: Runtime | None = None
        self.gateway: Gateway | None = None
        self.metrics_port: int | None = None
        self._metrics_server: WSGIServer | None = None
        self._feed: FeedConnector | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._journal: Journal | None = None
        self.admin: AdminServer | None = None
        self._last_snapshot = time.monotonic()
        self.fatal: str | None = None  # set by fail_stop: why the daemon stopped itself
        self.start_interrupted = False  # a stop came before start-up finished
        self._shut_down = False
        self.snapshot: Snapshot | None = None

    async def start(self, on_status: Callable[[str], None] = lambda _: None) -> None:
        """Engines, journal, broker, admin, metrics, feed. READY=1 goes to systemd only once the
        engines are warm, the broker reconciled and the feed connected (``self.ready``)."""
        cfg = self.config
        sys.setswitchinterval(cfg.process.switch_interval_us / 1e6)

        def status(text: str) -> None:
            on_status(text)
            self.notifier.status(text)

        self._loop = loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._on_loop_exception)
        status("loading engines")
        self.engines = engines = await asyncio.to_thread(self._load_engines)
        status("warming engines")
        for engine in engines.engines:
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
                health=engine.health().detail,
            )
        status("replaying journal")
        jc = cfg.journal
        journal_path = Path(jc.path)
        started = time.monotonic()
        recovery = await asyncio.to_thread(recover, journal_path, snapshot.decode)
        if recovery.torn_bytes:
            log.warning("journal_torn_tail", path=str(journal_path), bytes_cut=recovery.torn_bytes)
        for problem in recovery.skipped_snapshots:
            log.error("snapshot_unreadable", detail=problem, action="falling back to the one before")
        if recovery.unknown_kinds:
            log.warning("journal_kinds_skipped", kinds=recovery.unknown_kinds, detail="written by a newer release")
        self._journal = Journal(journal_path, jc.fsync, wall_ns=self.clock.wall_ns(), segment=recovery.next_segment)

        def journal_failed(error: JournalError) -> None:  # on the journal's flusher thread
            loop.call_soon_threadsafe(self.fail_stop, "journal", str(error), error)

        self._journal.on_background_error = journal_failed
        self.runtime = runtime = Runtime(cfg, engines, self.clock, self._journal, self.stats)
        desk = runtime.desk
        unwindowed: list[str] = []
        if recovery.snapshot is not None:
            unwindowed = desk.load(snapshot.decode(recovery.snapshot))
        desk.restore(recovery.records)
        desk.begin_session()
        self._settle_active_engine(desk.engine_active)
        warm = sum(1 for i in range(len(runtime.windows.symbols)) if runtime.windows.full(i))
        log.info(
            "journal_replayed",
            path=str(journal_path),
            snapshot_segment=recovery.snapshot_segment or None,
            segments=recovery.segments_read,
            records=len(recovery.records),
            seconds=round(time.monotonic() - started, 3),
            session=desk.session,
            orders=len(desk.book.orders),
            parked=len(desk.reviews),
            halted=desk.halts.halted_symbols(),
            market=str(desk.halts.market),
            kill=desk.kill,
            windows_ready=warm,
            windows_warming=len(runtime.windows.symbols) - warm,
        )
        if recovery.snapshot is not None and unwindowed:
            log.warning("snapshot_without_windows", symbols=unwindowed[:20], count=len(unwindowed))
        self._last_snapshot = time.monotonic()

        status("connecting broker")
        b = cfg.broker
        reconciled = asyncio.Event()

        def on_broker_status(message: wire.Status) -> None:
            if desk.on_status(message):
                reconciled.set()

        backoff = Backoff(
            b.reconnect_initial_ms / 1000, b.reconnect_max_ms / 1000, connect_timeout_s=b.connect_timeout_ms / 1000
        )
        if b.protocol == "native":
            self.gateway = GatewayClient(
                b.host,
                b.port,
                on_report=desk.on_report,
                on_event=desk.on_broker_event,
                on_status=on_broker_status,
                backoff=backoff,
                max_frame_bytes=b.max_frame_bytes,
                hold=runtime.trading_a_minute,
                hold_s=b.report_hold_ms / 1000,
            )
        else:
            from broker.fix import FixGatewayClient  # noqa: PLC0415

            fx = b.fix
            store = fx.store or journal_path.with_name(f"fix-{fx.sender_comp_id}-{fx.target_comp_id}.seq")
            self.gateway = FixGatewayClient(
                b.host,
                b.port,
                protocol=b.protocol,
                sender_comp_id=fx.sender_comp_id,
                target_comp_id=fx.target_comp_id,
                store=Path(store),
                on_report=desk.on_report,
                on_event=desk.on_broker_event,
                on_status=on_broker_status,
                backoff=backoff,
                heartbeat_s=fx.heartbeat_s,
                time_in_force=fx.time_in_force,
                status_timeout_s=fx.status_timeout_s,
                reset_on_logon=fx.reset_on_logon,
                accept_peer_reset=fx.accept_peer_reset,
                logon_timeout_s=fx.logon_timeout_s,
                mono_ns=self.clock.mono_ns,
                wall_ns=self.clock.wall_ns,
                known_order=desk.sent_order,
            )
        desk.gateway = self.gateway
        self._task(self.gateway.run(), "broker")
        status("reconciling with the broker")
        await reconciled.wait()

        self.admin = AdminServer(desk, runtime, cfg.admin)
        await self.admin.start()
        self._task(self._expire_reviews(), "review-expiry")

        if cfg.metrics.enabled:
            self._serve_metrics()
        # What start-up made (the model, the replayed journal, the universe's tables) lives as
        # long as the process: collected once, then frozen out of the cyclic collector, so a
        # full collection during trading walks only what trading made since.
        gc.collect()
        gc.freeze()
        status("connecting feed")
        f = cfg.feed
        self._feed = FeedConnector(
            runtime,
            f.host,
            f.port,
            f.max_frame_bytes,
            Backoff(
                f.reconnect_initial_ms / 1000, f.reconnect_max_ms / 1000, connect_timeout_s=f.connect_timeout_ms / 1000
            ),
            runtime.on_feed_event,
            self.clock.mono_ns,
            self._dbn_protocol if f.format == "dbn" else None,
        )
        self._task(self._feed.run(), "feed")
        log.info(
            "started",
            symbols=len(cfg.universe.symbols),
            broker=f"{b.host}:{b.port}",
            feed=f"{f.host}:{f.port}",
            metrics_port=self.metrics_port,
        )
        self._task(self._announce_ready(on_status), "ready")
        self._task(self._supervise(), "supervisor")

    def _dbn_protocol(self) -> DbnFeedProtocol:
        runtime = self.runtime
        assert runtime is not None
        return DbnFeedProtocol(runtime, runtime.symbols, self.clock.mono_ns)

    def _task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A task of the daemon's; one that ends with an exception fail-stops the daemon (a task
        that died quietly would leave, say, reviews that never expire)."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.fail_stop(f"task {task.get_name()} failed", f"{type(exc).__name__}: {exc}", exc)

    async def _announce_ready(self, on_status: Callable[[str], None]) -> None:
        runtime = self.runtime
        assert runtime is not None
        await runtime.feed_connected_event.wait()
        self.notifier.ready("running: engines warm, broker reconciled, feed connected")
        on_status("running")
        self.ready.set()

    async def _supervise(self) -> None:
        """From the event loop itself, every ``SUPERVISE_S``: publish the state snapshot other
        threads read (metrics), and feed the systemd watchdog only while the minute loop makes
        progress. A blocked loop stops the pings, and a loop that runs but is stalled (a paused
        feed with nothing in flight, an inference that never returns) fail-stops: a daemon that
        looks healthy while not trading is the worst failure."""
        runtime = self.runtime
        assert runtime is not None
        bound_ns = int(self.config.process.stall_s * 1e9)
        interval = self.notifier.watchdog_s
        tick = min(SUPERVISE_S, interval) if interval is not None else SUPERVISE_S
        last_ping = 0.0
        loop = asyncio.get_running_loop()
        orders = runtime.desk.orders
        while not self._stop.is_set():
            if self._metrics_server is not None:
                self.publish()  # what a scrape falls back to when the loop cannot answer in time
            asked = orders.status_asked_ns
            if asked is not None and self.clock.mono_ns() - asked > STATUS_RETRY_NS:
                # No (usable) answer to the status request: ask again rather than stay
                # unreconciled, denying every order, for ever.
                log.error("broker_status_unanswered", after_s=STATUS_RETRY_NS / 1e9, action="asking again")
                orders.ask_status()
            if self._snapshot_due():
                self.checkpoint("periodic")
            stalled = runtime.stalled(bound_ns)
            if stalled is not None:
                self.fail_stop("stalled", stalled)
                return
            if interval is not None and loop.time() - last_ping >= interval:
                self.notifier.watchdog()
                last_ping = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=tick)

    def _snapshot_due(self) -> bool:
        journal, jc = self._journal, self.config.journal
        if journal is None:
            return False
        if journal.records_in_segment <= 1:
            return False  # nothing since the last snapshot but the segment's header
        if journal.records_in_segment >= jc.snapshot_records or journal.size_bytes() >= jc.snapshot_bytes:
            return True
        # By time, only between minutes (nothing waiting or in inference), so a snapshot never
        # delays a bar on its way to an order.
        runtime = self.runtime
        idle = runtime is not None and runtime.idle_event.is_set()
        return idle and time.monotonic() - self._last_snapshot >= jc.snapshot_interval_s

    def checkpoint(self, why: str) -> None:
        """Snapshot everything restore needs, begin a new journal segment, apply the retention
        policy. On the loop between two callbacks, so the state is consistent; an inference in
        flight is fine (its orders come after, in the new segment)."""
        runtime, journal = self.runtime, self._journal
        assert runtime is not None and journal is not None
        started = time.monotonic()
        runtime.flush_bars()
        journal.sync()
        body = snapshot.encode(runtime.desk.snapshot())
        wall = self.clock.wall_ns()
        covered = journal.segment
        write_snapshot(journal.path, covered, body, wall)
        journal.rotate(wall)
        jc = self.config.journal
        removed = prune(
            journal.path,
            Retention(jc.keep_snapshots, jc.max_segments, jc.max_bytes, jc.max_age_days * 86_400.0),
        )
        self._last_snapshot = time.monotonic()
        self.stats.snapshots += 1
        log.info(
            "snapshot",
            why=why,
            segment=covered,
            bytes=len(body),
            ms=round((time.monotonic() - started) * 1000, 1),
            pruned=len(removed),
        )

    def publish(self) -> None:
        """The loop-owned state as one immutable snapshot, swapped in whole: the metrics thread
        reads only this, never the loop's live dicts."""
        runtime = self.runtime
        if runtime is None:
            return
        self.snapshot = Snapshot(
            made_s=time.monotonic(),
            desk=runtime.desk.status(),
            engines=self.engines.status() if self.engines is not None else None,
            journal_bytes=self._journal.size_bytes() if self._journal is not None else 0,
        )

    def fresh_snapshot(self, timeout_s: float = 0.25) -> Snapshot:
        """For another thread (a scrape): a snapshot the loop makes now, or the last one it
        published when the loop does not answer within ``timeout_s`` (a scrape never hangs)."""
        loop, last = self._loop, self.snapshot
        assert last is not None
        if loop is None or loop.is_closed():
            return last
        made: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def make() -> None:
            try:
                self.publish()
                assert self.snapshot is not None
                made.set_result(self.snapshot)
            except Exception as exc:
                made.set_exception(exc)

        try:
            loop.call_soon_threadsafe(make)
            return made.result(timeout=timeout_s)
        except (concurrent.futures.TimeoutError, RuntimeError):
            return last

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception no callback handled: the daemon cannot reason about its state any more."""
        exc = context.get("exception")
        if isinstance(exc, (ConnectionError, TimeoutError)) and not isinstance(exc, JournalError):
            loop.default_exception_handler(context)  # a peer's socket going away: already handled
            return
        self.fail_stop("unhandled exception", f"{context.get('message', '')}: {type(exc).__name__}: {exc}", exc)

    def fail_stop(self, what: str, detail: str, exc: BaseException | None = None) -> None:
        """Fail-stop: trip the kill switch (journaled as automatic, working orders cancelled) as
        far as the journal still allows, log, and stop with a non-zero exit so the supervisor
        restarts the process and the journal replay takes over."""
        if self.fatal is not None:
            return
        self.fatal = f"{what}: {detail}"
        self.stats.fail_stops += 1
        log.critical("fail_stop", what=what, detail=detail, error=repr(exc) if exc else None, exc_info=exc)
        self.notifier.status(f"fail-stop: {what}")
        runtime = self.runtime
        if runtime is not None:
            try:
                cancels = runtime.desk.trip(self.fatal)
                log.error("kill_switch_on", uid=None, automatic=True, cancels_sent=cancels)
            except Exception as trip_error:  # the journal may be what failed: do what can be done
                log.error("fail_stop_trip_failed", error=f"{type(trip_error).__name__}: {trip_error}")
        self._stop.set()

    def _load_engines(self) -> EngineSet:
        """Primary and standby, as ``tradingd check`` loads them; a primary that cannot run here
        leaves the standby serving."""
        check_paths(self.config, self.config_file)
        engines = load_engines(self.config, self.config_file, self.clock.mono_ns)
        found = serving_standing(self.config, engines)
        q, s = self.config.qualification, self.stats
        s.model_qualified = found.ok
        s.qualified_accuracy = qualification.accuracy_of(found.record) if found.ok else None
        bar = q.live_accuracy_floor
        if s.qualified_accuracy is not None:
            bar = max(bar, s.qualified_accuracy - q.live_accuracy_margin)
        s.accuracy_alert_below = bar
        self._start_gpu_monitor(engines)
        return engines

    def _start_gpu_monitor(self, engines: EngineSet) -> None:
        cfg = self.config
        if not any(e.backend == "tensorrt" for e in engines.engines):
            return
        g = cfg.engine.gpu
        loop = self._loop
        assert loop is not None

        def on_fault(detail: str) -> None:
            loop.call_soon_threadsafe(self.on_gpu_fault, detail)

        self.gpu = GpuMonitor(cfg.engine.primary.device, g.poll_s, g.max_temperature_c, on_fault)
        facts = self.gpu.latest
        assert facts is not None
        log.info("gpu", **facts.as_dict())
        if facts.ecc_enabled is False:
            if g.require_ecc:
                raise ConfigError(self.config_file, "engine.gpu.require_ecc", f"ECC is off on {facts.name}")
            log.error("gpu_ecc_off", gpu=facts.name, detail="memory errors on this GPU go undetected")
        self.gpu.start()

    def on_gpu_fault(self, detail: str) -> None:
        """A GPU health fault (from the NVML monitor's thread, via the loop): fail the primary over."""
        engines, runtime = self.engines, self.runtime
        if engines is None or runtime is None or engines.standby is None or engines.active is not engines.primary:
            return
        event = engines.switch("standby", FailoverReason.GPU_HEALTH, detail)
        if event is not None:
            runtime.desk.record_failover(event)

    def _settle_active_engine(self, journaled: str | None) -> None:
        """Start on the standby when the primary is unavailable, or when the journal says it was
        failed over and no operator has failed back since."""
        engines, runtime = self.engines, self.runtime
        assert engines is not None and runtime is not None
        if engines.primary is None and engines.standby is not None:
            # The standby is serving from the start: journal, count and log the primary's absence.
            event = FailoverEvent("primary", "standby", FailoverReason.UNAVAILABLE, engines.primary_error or "")
            engines.events.append(event)
            runtime.desk.record_failover(event)
        elif journaled == "standby" and engines.standby is not None and engines.active is not engines.standby:
            engines.switch("standby", FailoverReason.OPERATOR, "restored from the journal")
            log.warning("engine_standby_restored", detail="failed over before the restart; `tradingd failover primary`")

    async def _expire_reviews(self) -> None:
        desk = self.runtime.desk if self.runtime else None
        while desk is not None and not self._stop.is_set():
            desk.expire_reviews()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=1.0)

    def _serve_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server  # noqa: PLC0415

        registry = CollectorRegistry()
        self.publish()
        scraped: list[tuple[float, Snapshot]] = []

        def snapshot() -> Snapshot:
            # One snapshot per scrape: the collector asks for engines, desk and journal in turn,
            # and the loop is asked once (a later scrape, 50 ms on, asks again).
            now = time.monotonic()
            if not scraped or now - scraped[0][0] > 0.05:
                scraped[:] = [(now, self.fresh_snapshot())]
            return scraped[0][1]

        registry.register(
            StatsCollector(
                self.stats,
                lambda: snapshot().engines or {},
                lambda: snapshot().desk,
                self.gpu,
                lambda: snapshot().journal_bytes,
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
        """Stop intake, finish the waiting batch and its orders, close connections and files.
        A second call does nothing."""
        if self._shut_down:
            return
        self._shut_down = True
        self.notifier.stopping()
        if self._feed is not None:
            self._feed.stop()
        runtime = self.runtime
        if runtime is not None and self.fatal is None:
            # A daemon that stopped itself on a fault sends nothing more: the restart decides.
            runtime.drain_now()
            try:
                await asyncio.wait_for(runtime.idle_event.wait(), timeout=deadline_s)
            except TimeoutError:
                log.error(
                    "shutdown_deadline",
                    waiting=len(runtime.batcher),
                    detail="gave up on waiting batches",
                )
                # The inference thread did not come back: never wait on it (exit 70).
                self.fatal = f"shutdown deadline: inference still running after {deadline_s:g} s"
                self.stats.fail_stops += 1
        if runtime is not None:
            open_orders = len(runtime.book.working)
            if open_orders:
                log.warning("shutdown_open_orders", count=open_orders)
            if self.fatal is None and self._journal is not None and self._journal.failed is None:
                self.checkpoint("shutdown")  # the next start reads this and nothing before it
        self._stop.set()
        if self.admin is not None:
            await self.admin.close()
        if self.gateway is not None:
            self.gateway.stop()
        for task in self._tasks:
            if task.get_name() == "ready":
                task.cancel()  # waits for a feed connection that may never come
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=deadline_s)
        if runtime is not None:
            # After a fail-stop the inference thread may be the thing that hung: never wait on it.
            runtime.close(wait=self.fatal is None)
        if self._journal is not None:
            try:
                self._journal.close()
            except JournalError as exc:
                if self.fatal is None:
                    raise
                log.error("journal_close_failed", error=str(exc))
        if self.gpu is not None:
            self.gpu.close()
        if self.engines is not None and not self.start_interrupted:
            # (Interrupted mid-start, a warm-up may still be running in its thread: the process
            # exits without closing what that thread holds.)
            for engine in self.engines.engines:
                engine.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info(
            "stopped",
            bars=self.stats.bars_received,
            orders_sent=self.stats.orders_sent,
            fail_stop=self.fatal,
        )
