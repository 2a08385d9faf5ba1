"""Keep one TCP client connection up, reconnecting with capped, jittered exponential backoff."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Backoff:
    """Delays of initial, 2x, 4x ... capped at ``maximum``, each with up to 20 % jitter."""

    initial_s: float
    maximum_s: float
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    _next: float = 0.0

    def __post_init__(self) -> None:
        self._next = self.initial_s

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2.0, self.maximum_s)
        return delay * (1.0 + 0.2 * self.rng.random())

    def reset(self) -> None:
        self._next = self.initial_s


class ClosingProtocol(asyncio.Protocol):
    """A protocol whose ``closed`` future resolves when its connection ends."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


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

    ``on_event(kind, detail)`` hears ``connected``, ``connect_failed`` and ``disconnected``.
    A session protocol whose connection is only good once logged on resets ``backoff`` itself
    (``reset_backoff_on_connect=False``), so a peer that refuses the logon is not hammered.
    """
    loop = asyncio.get_running_loop()
    while not stopping.is_set():
        try:
            transport, protocol = await loop.create_connection(make_protocol, host, port)
        except OSError as exc:
            on_event("connect_failed", f"{host}:{port}: {exc.strerror or exc}")
        else:
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
