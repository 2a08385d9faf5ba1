"""Feed ingest: an asyncio.Protocol that turns bytes into validated messages for the runtime.

It only frames, decodes and dispatches; all state lives in the runtime. A frame error (bytes
that are not msgpack, a frame over the limit) drops the connection, since a byte stream cannot
resync, and ``FeedConnector`` reconnects with backoff.

Bad data never raises: it is a ``Rejected`` message the sink counts. An exception out of a sink
callback is a bug; it must neither drop the connection unseen (as it would if it escaped
``data_received``) nor stop the messages behind it, so it goes to ``on_internal_error``, which
escalates it to the daemon's fail-stop path, and delivery goes on with the next message.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol, cast

import msgpack
import numpy as np
import numpy.typing as npt

from broker.errors import FrameError
from broker.framing import FrameReader
from broker.reconnect import Backoff, ClosingProtocol, keep_connected
from daemon.feed.protocol import Bar, Heartbeat, Message, MinuteEnd, Rejected, UnknownType, decode, decode_frames

_KINDS: dict[type, str] = {
    Bar: "bar",
    MinuteEnd: "minute_end",
    Heartbeat: "heartbeat",
    Rejected: "rejected",
    UnknownType: "unknown_type",
}


class _BarRun(NamedTuple):
    """Consecutive bars of a read, with their ``bar_values`` when bulk decoding made them."""

    bars: list[Bar]
    values: npt.NDArray[np.float64] | None


class FeedSink(Protocol):
    """What ingest hands its messages to (the runtime)."""

    def on_bar(self, bar: Bar, ts_recv: int) -> None: ...

    def on_bar_group(self, bars: list[Bar], ts_recv: int, values: npt.NDArray[np.float64] | None) -> None:
        """Consecutive bars of one read (a minute's, usually), handed on together, with their
        ``bar_values`` where the decoder made them already (None: not made)."""
        ...

    def on_minute_end(self, message: MinuteEnd, ts_recv: int) -> None: ...

    def on_heartbeat(self, message: Heartbeat, ts_recv: int) -> None: ...

    def on_rejected(self, rejected: Rejected, ts_recv: int) -> None: ...

    def on_unknown_type(self, message: UnknownType) -> None: ...

    def on_feed_connected(self, feed: FeedProtocol) -> None: ...

    def on_feed_lost(self) -> None: ...

    def on_frame_error(self, error: FrameError) -> None: ...

    def on_internal_error(self, exc: BaseException, where: str) -> None:
        """A callback raised while handling one message (``where``: its kind)."""
        ...


class PausableFeed(ClosingProtocol):
    """``pause`` stops delivery at the next message boundary and stops reading the socket;
    ``resume`` delivers what was held back, then reads again. Either feed format's protocol."""

    _paused: bool
    _transport: asyncio.Transport | None

    def _deliver(self) -> None:
        raise NotImplementedError

    def pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if not self._paused or self._transport is None:
            return
        self._paused = False
        self._deliver()
        if not self._paused and not self._transport.is_closing():
            self._transport.resume_reading()


class FeedProtocol(PausableFeed):
    """Frames, decodes and dispatches; ``pause`` stops delivery at the next message boundary.

    Pausing stops reading the socket and also holds back the rest of the chunk already read,
    so the sink sees nothing more until ``resume``: real backpressure, not a late one.
    """

    def __init__(
        self, sink: FeedSink, max_frame_bytes: int, now_ns: Callable[[], int], *, bulk_decode: bool = True
    ) -> None:
        super().__init__()
        self._bulk_decode = bulk_decode  # False: every frame decoded on its own (a benchmark's baseline)
        self._sink = sink
        self._reader = FrameReader(max_frame_bytes)
        self._transport: asyncio.Transport | None = None
        self._now_ns = now_ns
        self._paused = False
        self._pending: Iterator[_BarRun | Message | FrameError] | None = None
        self._pending_ts = 0
        self.reads_one_by_one = 0  # reads whose frames were decoded one by one (not all sound)
        self._broken = False  # a frame error ended the stream
        # Chunks not yet handed on, each with ``ts_recv``: when its bytes were read from the
        # socket. Taken once per read and never again, so a bar held back while the feed is
        # paused, or behind another minute in the same read, carries the wait in its latency.
        self._backlog: deque[tuple[bytes, int]] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._sink.on_feed_connected(self)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return  # the stream stopped making sense; the connection is being dropped
        self._backlog.append((data, self._now_ns()))
        if not self._paused and self._pending is None:
            self._deliver()

    def _deliver(self) -> None:
        """Hand on what has been read, until the backlog is empty or the sink pauses. Bars in a
        row are handed on as one group (the runtime takes a group at once); anything else one by
        one, each at a message boundary."""
        while not self._paused:
            if self._pending is None:
                if not self._backlog:
                    return
                data, self._pending_ts = self._backlog.popleft()
                self._pending = iter(self._units(data))
            ts_recv = self._pending_ts
            for unit in self._pending:
                if type(unit) is _BarRun:
                    self._dispatch_bars(unit, ts_recv)
                elif isinstance(unit, FrameError):
                    self._broken = True
                    self._pending = None
                    self._backlog.clear()
                    self._sink.on_frame_error(unit)
                    if self._transport is not None:
                        self._transport.abort()
                    return
                else:
                    self._dispatch(cast(Message, unit), ts_recv)
                if self._paused:
                    return  # the rest of this read waits in the iterator
            self._pending = None

    def _units(self, data: bytes) -> list[_BarRun | Message | FrameError]:
        """A read as what is handed on: runs of bars, other messages, and a frame error last if
        the bytes stop making sense. Its complete frames are decoded at once when every one is
        a sound bar, minute end or heartbeat, else one by one (for each one's reason)."""
        frames, count, error = self._reader.feed_frames(data)
        messages: list[Message] | list[Bar | MinuteEnd | Heartbeat] = []
        values: npt.NDArray[np.float64] | None = None
        decoded = decode_frames(frames, count) if count and self._bulk_decode else None
        if decoded is not None:
            messages, values = decoded
        elif count:
            self.reads_one_by_one += 1
            messages, unpack_error = self._one_by_one(frames)
            error = unpack_error or error
        units: list[_BarRun | Message | FrameError] = []
        group: list[Bar] = []
        taken = 0  # bars before this group, in the read (``values`` rows)

        def run() -> _BarRun:
            nonlocal taken
            start, taken = taken, taken + len(group)
            return _BarRun(group, None if values is None else values[:, start:taken])

        for message in messages:
            if type(message) is Bar:
                group.append(message)
                continue
            if group:
                units.append(run())
                group = []
            units.append(message)
        if group:
            units.append(run())
        if error is not None:
            units.append(error)
        return units

    def _one_by_one(self, frames: bytes) -> tuple[list[Message], FrameError | None]:
        """Each frame unpacked and decoded on its own; a frame that does not unpack (bytes the
        boundary scan let through: a string that is not UTF-8, a map as a map key, a bad
        timestamp) ends the stream there, as ``FrameReader.feed`` would have ended it."""
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(frames)
        messages: list[Message] = []
        while True:
            try:
                obj = unpacker.unpack()
            except msgpack.OutOfData:
                return messages, None
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                return messages, FrameError("not_msgpack", str(exc) or type(exc).__name__)
            try:
                messages.append(decode(obj))
            except Exception as exc:  # a bug in the decoder: escalated, the stream goes on
                self._sink.on_internal_error(exc, "decode")

    def _dispatch_bars(self, run: _BarRun, ts_recv: int) -> None:
        try:
            if len(run.bars) == 1:
                self._sink.on_bar(run.bars[0], ts_recv)
            else:
                self._sink.on_bar_group(run.bars, ts_recv, run.values)
        except Exception as exc:  # a bug in the sink: the sink escalates it
            self._sink.on_internal_error(exc, "bar")

    def _dispatch(self, message: Message, ts_recv: int) -> None:
        sink = self._sink
        try:
            match message:
                case Bar():
                    sink.on_bar(message, ts_recv)
                case MinuteEnd():
                    sink.on_minute_end(message, ts_recv)
                case Heartbeat():
                    sink.on_heartbeat(message, ts_recv)
                case Rejected():
                    sink.on_rejected(message, ts_recv)
                case UnknownType():
                    sink.on_unknown_type(message)
        except Exception as exc:  # a bug in the sink: the sink escalates it
            sink.on_internal_error(exc, _KINDS.get(type(message), "decode"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._pending = None
        self._backlog.clear()
        self._sink.on_feed_lost()
        super().connection_lost(exc)


class FeedConnector:
    """The daemon is the feed's TCP client; this keeps that connection up."""

    def __init__(
        self,
        sink: FeedSink,
        host: str,
        port: int,
        max_frame_bytes: int,
        backoff: Backoff,
        on_event: Callable[[str, str], None],
        now_ns: Callable[[], int],
        protocol: Callable[[], ClosingProtocol] | None = None,
    ) -> None:
        self._sink = sink
        self._protocol = protocol  # another feed format's protocol (DBN); default: msgpack v1
        self._host = host
        self._port = port
        self._max_frame_bytes = max_frame_bytes
        self._backoff = backoff
        self._on_event = on_event
        self._now_ns = now_ns
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        await keep_connected(
            self._protocol or (lambda: FeedProtocol(self._sink, self._max_frame_bytes, self._now_ns)),
            self._host,
            self._port,
            self._backoff,
            self._stopping,
            self._on_event,
        )

    def stop(self) -> None:
        self._stopping.set()
