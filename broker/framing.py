"""Length-limited reading of a msgpack byte stream (the feed and the native gateway share it).

msgpack is self-delimiting, so a streaming unpacker finds the frames. A frame over the limit, or
bytes that are not msgpack, raise ``FrameError``: a byte stream cannot resync, so the caller
drops the connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

import msgpack

from broker.errors import FrameError


class FrameReader:
    """Feed it bytes as they arrive; iterate the complete objects they finish."""

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        limit = max_frame_bytes
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=False,
            max_buffer_size=2 * limit + 1,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=limit,
        )
        self._fed = 0
        self._consumed = 0
        self._raw = bytearray()  # bytes fed to ``feed_frames`` and not yet handed back
        self._raw_at = 0  # their offset in the stream

    def feed(self, data: bytes) -> Iterator[object]:
        yield from self._scan(data, unpack=True)

    def feed_frames(self, data: bytes) -> tuple[bytes, int, FrameError | None]:
        """``feed`` without decoding: the complete frames ``data`` finishes, back to back, how
        many, and the error that ends the stream there (None when it goes on); the frames
        before an error are returned. Not to be mixed with ``feed`` on one reader."""
        base = self._raw_at
        self._raw += data
        good = self._consumed
        count = 0
        error: FrameError | None = None
        try:
            for _ in self._scan(data, unpack=False):
                good = self._consumed
                count += 1
        except FrameError as exc:
            error = exc
        frames = bytes(self._raw[: good - base])
        del self._raw[: self._consumed - base]
        self._raw_at = self._consumed
        return frames, count, error

    def _scan(self, data: bytes, *, unpack: bool) -> Iterator[object]:
        """Feed ``data`` a frame's worth at a time; yield each complete frame (the object, or
        None when only skipping over it) once its size is checked; raise ``FrameError`` where
        the stream stops making sense."""
        limit = self.max_frame_bytes
        view = memoryview(data)
        unpacker = self._unpacker
        for start in range(0, len(view), limit):
            piece = view[start : start + limit]
            try:
                unpacker.feed(piece)
            except msgpack.BufferFull as exc:
                raise FrameError("oversized_frame", f"a frame exceeds {limit} bytes") from exc
            self._fed += len(piece)
            while True:
                try:
                    obj = unpacker.unpack() if unpack else unpacker.skip()
                except msgpack.OutOfData:
                    if not unpack:
                        self._refuse_declared(None)  # as ``unpack`` refuses it before its bytes come
                    break
                except (ValueError, TypeError, msgpack.UnpackException) as exc:
                    if not unpack:
                        self._refuse_declared(exc)  # as ``unpack`` finds it first
                    detail = str(exc) or f"{type(exc).__name__}: invalid type byte"
                    # A length header over the per-object limits is a frame over the limit.
                    reason = "oversized_frame" if "exceeds max_" in detail else "not_msgpack"
                    raise FrameError(reason, detail) from exc
                end = unpacker.tell()
                size, self._consumed = end - self._consumed, end
                if size > limit:
                    raise FrameError("oversized_frame", f"a {size}-byte frame exceeds {limit} bytes")
                yield obj
            if self._fed - self._consumed > limit:
                raise FrameError(
                    "oversized_frame",
                    f"a frame exceeds {limit} bytes ({self._fed - self._consumed} so far)",
                )

    def _refuse_declared(self, cause: BaseException | None) -> None:
        """Skipping checks no length against the limits: the pending frame's first header is
        checked here, as ``unpack`` would have."""
        declared = _declared_length(self._raw, self._consumed - self._raw_at)
        if declared is not None and declared > self.max_frame_bytes:
            raise FrameError("oversized_frame", f"a frame declares {declared} items or bytes") from cause


# Top-level headers with a length: (length bytes) by type byte. map16/32, array16/32, str8/16/32,
# bin8/16/32, ext8/16/32.
_LENGTH_BYTES = {
    0xDE: 2, 0xDF: 4, 0xDC: 2, 0xDD: 4,
    0xD9: 1, 0xDA: 2, 0xDB: 4,
    0xC4: 1, 0xC5: 2, 0xC6: 4,
    0xC7: 1, 0xC8: 2, 0xC9: 4,
}  # fmt: skip


def _declared_length(buf: bytearray, at: int) -> int | None:
    """The length a pending frame's first header declares, once its bytes are there."""
    if at >= len(buf):
        return None
    width = _LENGTH_BYTES.get(buf[at])
    if width is None or at + 1 + width > len(buf):
        return None
    return int.from_bytes(buf[at + 1 : at + 1 + width], "big")


Stamp = TypeVar("Stamp", int, float)


class ReadBacklog(Generic[Stamp]):
    """Reads kept as bytes, each with when it was read, and parsed one message at a time as the
    owner asks: a protocol handles a slice of them per turn of the event loop, so the loop reads
    (and stamps) the socket between slices, and a burst costs nothing while it waits."""

    def __init__(self, max_frame_bytes: int) -> None:
        self._reader = FrameReader(max_frame_bytes)
        self._reads: deque[tuple[Stamp, bytes]] = deque()
        self._current: Iterator[object] | None = None  # the messages of the read being parsed
        self.current_at: Stamp | None = None  # when the read of the last message given was read

    def add(self, data: bytes, at: Stamp) -> None:
        self._reads.append((at, data))

    def waiting(self) -> bool:
        """Whether anything read is not yet parsed (or may still hold a message)."""
        return self._current is not None or bool(self._reads)

    def oldest_at(self) -> Stamp | None:
        """When the oldest read not yet all handed on was read; None when nothing waits."""
        if self._current is not None:
            return self.current_at
        return self._reads[0][0] if self._reads else None

    def next(self) -> tuple[bool, object]:
        """(True, the next message) or (False, None) when nothing read is left. A frame error
        (``FrameError``) raises, and everything read is dropped: a byte stream cannot resync."""
        while True:
            if self._current is None:
                if not self._reads:
                    return False, None
                self.current_at, data = self._reads.popleft()
                self._current = self._reader.feed(data)
            try:
                return True, next(self._current)
            except StopIteration:
                self._current = None
            except FrameError:
                self._current = None
                self._reads.clear()
                raise
