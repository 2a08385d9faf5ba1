"""Reconnecting: the backoff delays (jittered, spread across a fleet of clients, capped), and a
connect that is never answered (a listener on 127.0.0.1 whose accept queue is full, so the
kernel drops each further SYN) timing out and being tried again."""

from __future__ import annotations

import asyncio
import random
import select
import socket
import statistics
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.reconnect import Backoff, ClosingProtocol, keep_connected
from tests.helpers import wait_for


class SilentListener:
    """A listening socket on 127.0.0.1 that answers no new connection: it never accepts, and
    its accept queue is kept full, so Linux drops every further SYN and a connect hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = int(self.sock.getsockname()[1])
        self._fillers: list[socket.socket] = []
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", self.port))
            self._fillers.append(filler)
            _, writable, _ = select.select([], [filler], [], 0.2)
            if not writable:  # this one's SYN was dropped: the queue is full
                return
        self.close()
        pytest.skip("the accept queue never filled (is net.ipv4.tcp_abort_on_overflow set?)")

    def close(self) -> None:
        for s in self._fillers:
            s.close()
        self.sock.close()


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[float, str, str]] = []

    def __call__(self, kind: str, detail: str) -> None:
        self.seen.append((time.monotonic(), kind, detail))

    def kinds(self) -> list[str]:
        return [kind for _, kind, _ in self.seen]


async def test_connect_when_the_peer_never_answers_times_out_and_is_tried_again() -> None:
    backoff = Backoff(0.01, 0.02, connect_timeout_s=0.2, rng=random.Random(1))
    events, stopping = Events(), asyncio.Event()
    listener = SilentListener()
    started = time.monotonic()
    task = asyncio.create_task(keep_connected(ClosingProtocol, "127.0.0.1", listener.port, backoff, stopping, events))
    try:
        await wait_for(lambda: len(events.seen) >= 2, timeout=5, what="two connects that timed out")
        (first_at, _, detail), (second_at, _, _) = events.seen[:2]
        assert events.kinds()[:2] == ["connect_failed", "connect_failed"]
        assert detail == f"127.0.0.1:{listener.port}: no answer within 0.2 s"
        # Each attempt waited out its timeout (less a timer tick: the loop's clock is coarse).
        assert first_at - started >= 0.18 and second_at - first_at >= 0.18
    finally:
        stopping.set()
        await asyncio.wait_for(task, 2)
        listener.close()


async def test_stop_when_a_connect_is_still_unanswered_returns_at_once() -> None:
    backoff = Backoff(0.01, 0.02, connect_timeout_s=60.0)
    events, stopping = Events(), asyncio.Event()
    listener = SilentListener()
    task = asyncio.create_task(keep_connected(ClosingProtocol, "127.0.0.1", listener.port, backoff, stopping, events))
    try:
        await asyncio.sleep(0.2)
        stopping.set()
        await asyncio.wait_for(task, 1)
        assert events.seen == []
    finally:
        task.cancel()
        listener.close()


async def test_connect_when_the_peer_answers_resets_the_backoff_and_reports_the_connection() -> None:
    backoff = Backoff(0.01, 0.05, connect_timeout_s=1.0, rng=random.Random(2))
    accepted: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        writer.close()  # each connection ends at once: the client reconnects

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    events, stopping = Events(), asyncio.Event()
    task = asyncio.create_task(keep_connected(ClosingProtocol, "127.0.0.1", port, backoff, stopping, events))
    try:
        await wait_for(lambda: events.kinds().count("disconnected") >= 2, what="two connections")
        assert events.kinds()[:4] == ["connected", "disconnected", "connected", "disconnected"]
    finally:
        stopping.set()
        await asyncio.wait_for(task, 2)
        server.close()
        await server.wait_closed()


def test_backoff_when_left_unseeded_draws_a_different_sequence_in_each_client() -> None:
    """The default is seeded by the operating system: restarted clients do not repeat each other."""
    first, second = Backoff(1.0, 60.0), Backoff(1.0, 60.0)
    assert [first.next() for _ in range(5)] != [second.next() for _ in range(5)]


def test_backoff_when_a_fleet_loses_its_peer_at_once_spreads_the_retries_over_the_window() -> None:
    fleet = [Backoff(1.0, 30.0) for _ in range(200)]
    firsts = [b.next() for b in fleet]
    assert all(1.0 <= d <= 3.0 for d in firsts)
    # Drawn over the whole window, not bunched near one instant (uniform on [1, 3]: sd 0.58).
    assert len(set(firsts)) == len(firsts) and statistics.pstdev(firsts) > 0.4
    thirds = [(b.next(), b.next())[1] for b in fleet]
    assert statistics.pstdev(thirds) > 1.0


@settings(max_examples=200)
@given(
    seed=st.integers(0, 2**32),
    initial=st.floats(0.001, 10.0),
    ratio=st.floats(1.0, 1000.0),
    draws=st.integers(1, 60),
)
def test_backoff_delays_when_drawn_stay_between_initial_and_maximum_and_reset_starts_over(
    seed: int, initial: float, ratio: float, draws: int
) -> None:
    maximum = initial * ratio
    backoff = Backoff(initial, maximum, rng=random.Random(seed))
    delays = [backoff.next() for _ in range(draws)]
    assert all(initial <= d <= maximum for d in delays)
    backoff.reset()
    assert initial <= backoff.next() <= min(maximum, 3.0 * initial)


def test_backoff_when_seeded_repeats_its_sequence() -> None:
    first, second = Backoff(0.05, 5.0, rng=random.Random(7)), Backoff(0.05, 5.0, rng=random.Random(7))
    assert [first.next() for _ in range(10)] == [second.next() for _ in range(10)]
