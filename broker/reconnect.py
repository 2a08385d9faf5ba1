"""Keep one TCP client connection up, reconnecting with capped, jittered exponential backoff."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CONNECT_TIMEOUT_S = 2.0


@dataclass(slots=True)
class Backoff:
    """How a client reconnects: the delays between attempts, and how long one connect may take.

    Delays use decorrelated jitter: each is drawn between ``initial_s`` and three times the one
    before, capped at ``maximum_s``, so they grow about exponentially while clients that lost the
    same peer at the same moment spread out instead of reconnecting in lock-step. A connect that
    has not completed within ``connect_timeout_s`` (a peer that takes the SYN and never answers,
    a full accept queue) counts as failed, and the next attempt waits its delay as usual.
    """

    initial_s: float
    maximum_s: float
    connect_timeout_s: float = field(default=CONNECT_TIMEOUT_S, kw_only=True)
    # Seeded from the operating system (os.urandom), so no two processes share a sequence; a
    # test that wants the same delays every run passes random.Random(seed).
    rng: random.Random = field(default_factory=random.Random, kw_only=True)
    _last: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._last = self.initial_s

    def next(self) -> float:
        self._last = min(self.maximum_s, self.rng.uniform(self.initial_s, self._last * 3.0))
        return self._last

    def reset(self) -> None:
        self._last = self.initial_s


class ClosingProtocol(asyncio.Protocol):
    """A protocol whose ``closed`` future resolves when its connection ends."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


Connected = tuple[asyncio.Transport, ClosingProtocol]


async def _connect(
    make_protocol: Callable[[], ClosingProtocol], host: str, port: int, timeout_s: float, stopping: asyncio.Event
) -> Connected | None:
    """One connect, bounded by ``timeout_s``; None when ``stopping`` was set first."""
    loop = asyncio.get_running_loop()
    attempt = asyncio.ensure_future(asyncio.wait_for(loop.create_connection(make_protocol, host, port), timeout_s))
    stop_wait: asyncio.Future[Any] = asyncio.ensure_future(stopping.wait())
    abandoned = False
    try:
        await asyncio.wait({attempt, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_wait.cancel()
        if not attempt.done():
            abandoned = True
            attempt.cancel()
            attempt.add_done_callback(_close_if_connected)
    return None if abandoned else attempt.result()


def _close_if_connected(attempt: asyncio.Future[Connected]) -> None:
    # An abandoned connect that completed anyway leaves no connection behind.
    if not attempt.cancelled() and attempt.exception() is None:
        attempt.result()[0].close()


async def keep_connected(
    make_protocol: Callable[[], ClosingProtocol],
    host: str,
    port: int,
    backoff: Backoff,
    stopping: asyncio.Event,
    on_event: Callable[[str, str], None],
    *,
    reset_backoff_on_connect: bool = True,
) -> None:
    """Connect, wait for the connection to end, back off, repeat, until ``stopping`` is set.

    ``on_event(kind, detail)`` hears ``connected``, ``connect_failed`` (refused, unreachable, or
    no answer within ``backoff.connect_timeout_s``) and ``disconnected``. A session protocol
    whose connection is only good once logged on resets ``backoff`` itself
    (``reset_backoff_on_connect=False``), so a peer that refuses the logon is not hammered.
    """
    while not stopping.is_set():
        try:
            connected = await _connect(make_protocol, host, port, backoff.connect_timeout_s, stopping)
        except TimeoutError:  # before OSError, of which it is a subclass
            on_event("connect_failed", f"{host}:{port}: no answer within {backoff.connect_timeout_s:g} s")
        except OSError as exc:
            on_event("connect_failed", f"{host}:{port}: {exc.strerror or exc}")
        else:
            if connected is None:
                return
            transport, protocol = connected
            if reset_backoff_on_connect:
                backoff.reset()
            on_event("connected", f"{host}:{port}")
            stop_wait: asyncio.Future[Any] = asyncio.ensure_future(stopping.wait())
            pending: set[asyncio.Future[Any]] = {protocol.closed, stop_wait}
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            if not protocol.closed.done():
                transport.close()
                await protocol.closed
            reason = protocol.closed.result()
            on_event("disconnected", f"{host}:{port}: {reason or 'closed'}")
            if stopping.is_set():
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=backoff.next())
