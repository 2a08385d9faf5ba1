"""The daemon's client of the native order gateway: sends orders, hears execution reports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, cast

import msgpack

from broker import protocol as wire
from broker.bulk import FrameEncoder, NewOrders
from broker.errors import FrameError
from broker.framing import ReadBacklog
from broker.reconnect import Backoff, ClosingProtocol, keep_connected


class Gateway(Protocol):
    """What the desk needs of an order gateway: native msgpack (``GatewayClient``) or FIX
    (``broker.fix.FixGatewayClient``)."""

    @property
    def connected(self) -> bool: ...

    def send(self, message: wire.NewOrder | wire.Cancel | wire.StatusRequest) -> bool: ...

    def cork(self) -> None:
        """Hold what ``send`` writes until ``uncork``: a batch's orders go out in one write."""
        ...

    def uncork(self) -> None: ...

    async def run(self) -> None: ...

    def stop(self) -> None: ...


# Messages from the broker handled per turn of the event loop: a burst of execution reports
# (a batch's acks and fills) never holds up the next batch's orders by more than this many.
REPORTS_PER_TURN = 32
HOLD_POLL_S = 0.0005  # how often held messages look again whether they may go


class _GatewayProtocol(ClosingProtocol):
    """Reads are kept as bytes and parsed as they are handled, ``REPORTS_PER_TURN`` messages a
    turn of the loop: while the client holds them, a burst of reports costs the loop nothing."""

    def __init__(self, client: GatewayClient) -> None:
        super().__init__()
        self._client = client
        self._reads: ReadBacklog[float] = ReadBacklog(client.max_frame_bytes)  # stamped by loop time
        self._transport: asyncio.Transport | None = None
        self._draining = False
        self._paused = False
        self._broken = False  # a frame error: nothing more is parsed
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._client._attach(transport)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        self._reads.add(data, self._loop.time())
        if not self._draining:
            self._drain()

    def _drain(self) -> None:
        """Handle up to ``REPORTS_PER_TURN`` messages, in order; the rest on later turns, with
        reading paused meanwhile so the backlog stays bounded. While the client's ``hold`` says
        so, messages wait (each at most ``hold_s`` after it was read)."""
        self._draining = False
        client = self._client
        oldest = self._reads.oldest_at()
        if oldest is not None and client.hold_s and client.hold() and self._loop.time() - oldest < client.hold_s:
            self._later(HOLD_POLL_S)
            return
        self._handle(REPORTS_PER_TURN)
        if self._reads.waiting():
            self._later(0.0)
        elif self._paused:
            self._paused = False
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    def _handle(self, most: int | None) -> None:
        """Parse and hand on up to ``most`` messages (None: all that have been read)."""
        dispatch = self._client._dispatch
        done = 0
        while most is None or done < most:
            try:
                more, obj = self._reads.next()
            except FrameError as exc:
                self._broken = True
                self._client.on_event("frame_error", str(exc))
                if self._transport is not None:
                    self._transport.abort()
                return
            if not more:
                return
            dispatch(wire.decode(obj))
            done += 1

    def _later(self, delay_s: float) -> None:
        self._draining = True
        if delay_s:
            self._loop.call_later(delay_s, self._drain)
        else:
            self._loop.call_soon(self._drain)
        transport = self._transport
        if not self._paused and transport is not None and not transport.is_closing():
            self._paused = True
            transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        # Everything received is applied before the connection is known to be gone.
        self._handle(None)
        self._client._detach()
        super().connection_lost(exc)


class GatewayClient:
    """One connection to the broker, kept up with backoff. ``send`` never blocks."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        on_report: Callable[[wire.ExecReport], None],
        on_event: Callable[[str, str], None],
        on_status: Callable[[wire.Status], None] = lambda _: None,
        backoff: Backoff,
        max_frame_bytes: int = 65536,
        hold: Callable[[], bool] = lambda: False,
        hold_s: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self.on_report = on_report
        self.on_status = on_status
        self.on_event = on_event
        self.backoff = backoff
        self.max_frame_bytes = max_frame_bytes
        self.hold = hold  # messages from the broker wait while this says so (at most hold_s each)
        self.hold_s = hold_s
        self._transport: asyncio.Transport | None = None
        self._packer = msgpack.Packer()
        self._corked: list[bytes] | None = None  # writes held by cork()
        self._frames: FrameEncoder | None = None
        self._stopping = asyncio.Event()
        self.connected_event = asyncio.Event()
        self.malformed = 0
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._transport is not None

    async def run(self) -> None:
        await keep_connected(
            lambda: _GatewayProtocol(self),
            self.host,
            self.port,
            self.backoff,
            self._stopping,
            self.on_event,
        )

    def stop(self) -> None:
        self._stopping.set()

    def send(self, message: wire.NewOrder | wire.Cancel | wire.StatusRequest) -> bool:
        """Write one message; False when there is no connection to write it to."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        data = self._packer.pack(wire.encode(message))
        if self._corked is not None:
            self._corked.append(data)
        else:
            transport.write(data)
        return True

    def prepare(self, universe: tuple[str, ...]) -> None:
        """Make the universe's frame encoder now, not at the first batch's orders."""
        if self._frames is None or self._frames.universe is not universe:
            self._frames = FrameEncoder(universe)

    def send_new_orders(self, orders: NewOrders) -> bool:
        """Write a batch's new orders, their frames in one buffer; False when there is no
        connection to write them to (then none was written)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        encoder = self._frames
        if encoder is None or encoder.universe is not orders.universe:
            self._frames = encoder = FrameEncoder(orders.universe)
        data = encoder.encode(orders)
        if self._corked is not None:
            self._corked.append(data)
        else:
            transport.write(data)
        return True

    def cork(self) -> None:
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        held, self._corked = self._corked, None
        transport = self._transport
        if held and transport is not None and not transport.is_closing():
            transport.write(b"".join(held))

    def _attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.connects += 1
        self.connected_event.set()

    def _detach(self) -> None:
        self._transport = None
        self.connected_event.clear()

    def _dispatch(self, message: wire.GatewayMessage) -> None:
        match message:
            case wire.ExecReport():
                self.on_report(message)
            case wire.Status():
                self.on_status(message)
            case wire.Heartbeat():
                pass
            case wire.Malformed(detail=detail):
                self.malformed += 1
                self.on_event("malformed", detail)
            case _:
                self.malformed += 1
                self.on_event("malformed", f"unexpected {type(message).__name__} from broker")
