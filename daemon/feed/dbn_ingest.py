"""DBN ingest: an asyncio.Protocol that turns a DBN byte stream into whole minutes of columns.

Every complete record in a read is decoded at once (``daemon.feed.dbn.DbnDecoder``: one numpy
view over the bytes), checked with the v1 decoder's rules over the arrays, cut into minutes by
``ts_event`` and handed to the runtime as ``BarColumns`` (``on_bars``, which applies the bounds
and the unknown symbol as for msgpack v1), each stamped with the time its bytes were read. DBN
has no ``minute_end``: a minute is complete when every symbol of the universe has reported it,
or when a later minute begins; the batcher's ``max_delay_us`` covers a symbol that never
reports. ``pause`` holds back decoded minutes not yet handed on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import numpy as np

from broker.errors import FrameError
from daemon.feed import dbn
from daemon.feed.columns import BarColumns
from daemon.feed.ingest import PausableFeed


class DbnSink(Protocol):
    """What DBN ingest hands on (the runtime)."""

    def on_bars(self, cols: BarColumns, ts_recv: int) -> None: ...

    def on_minute_complete(self, ts: int) -> None: ...

    def on_feed_connected(self, feed: DbnFeedProtocol) -> None: ...

    def on_feed_lost(self) -> None: ...

    def on_frame_error(self, error: FrameError) -> None: ...

    def on_internal_error(self, exc: BaseException, where: str) -> None: ...


class _Names(Sequence[str]):
    """Each row's symbol as the feed named it, looked up only when a log line needs one."""

    def __init__(self, idx: np.ndarray, ids: np.ndarray, universe: Sequence[str], symbols: dict[int, str]) -> None:
        self._idx, self._ids, self._universe, self._symbols = idx, ids, universe, symbols

    def __len__(self) -> int:
        return len(self._idx)

    def __getitem__(self, k: int) -> str:  # type: ignore[override]
        i = int(self._idx[k])
        if i >= 0:
            return self._universe[i]
        iid = int(self._ids[k])
        return self._symbols.get(iid, f"instrument {iid}")


class DbnFeedProtocol(PausableFeed):
    def __init__(
        self,
        sink: DbnSink,
        universe: Sequence[str],
        now_ns: Callable[[], int],
    ) -> None:
        super().__init__()
        self._sink = sink
        self._universe = tuple(universe)
        self._now_ns = now_ns
        self._decoder = dbn.DbnDecoder()
        self._index = dbn.InstrumentIndex({}, self._universe)
        self._transport: asyncio.Transport | None = None
        self._paused = False
        self._minutes: deque[tuple[dbn.OhlcvArray, int]] = deque()  # decoded, not yet handed on
        self._minute: int | None = None  # the ts_event of the minute being reported
        self._reported = np.zeros(len(self._universe), dtype=bool)
        self._complete = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._sink.on_feed_connected(self)

    def data_received(self, data: bytes) -> None:
        ts_recv = self._now_ns()
        try:
            decoded = self._decoder.feed(data)
        except FrameError as exc:
            self._fail(exc)
            return
        if decoded.mappings:
            self._index = dbn.InstrumentIndex(self._decoder.symbols, self._universe)
        bars = decoded.bars
        if len(bars):
            for start, stop in dbn.split_minutes(bars):
                self._minutes.append((bars[start:stop], ts_recv))
        self._deliver()

    def _columns(self, bars: dbn.OhlcvArray) -> BarColumns:
        # The decoder's own rules here; the bounds and the unknown symbol are the runtime's, as
        # for msgpack v1 (``bounds_codes``), checked once, against the feed's minute as it is then.
        c = dbn.ohlcv_columns(bars, self._index)
        return BarColumns(
            idx=c.idx,
            ts=c.ts,
            open=c.open,
            high=c.high,
            low=c.low,
            close=c.close,
            volume=c.volume,
            prev_close=np.full(len(bars), np.nan),
            codes=c.codes,
            names=_Names(c.idx, bars["instrument_id"], self._universe, self._decoder.symbols),
        )

    def _deliver(self) -> None:
        sink = self._sink
        while self._minutes and not self._paused:
            bars, ts_recv = self._minutes.popleft()
            minute = int(bars["ts_event"][0])
            try:
                cols = self._columns(bars)
                if minute != self._minute:
                    self._close_minute()
                    self._minute, self._complete = minute, False
                    self._reported[:] = False
                sink.on_bars(cols, ts_recv)
                known = cols.idx[cols.idx >= 0]
                self._reported[known] = True
                if not self._complete and self._reported.all():
                    self._complete = True
                    sink.on_minute_complete(int(cols.ts.max()))
            except Exception as exc:  # a bug in the sink: the sink escalates it
                sink.on_internal_error(exc, "bars")

    def _close_minute(self) -> None:
        """A later minute began: the one before is as complete as it will get."""
        if self._minute is not None and not self._complete:
            self._complete = True
            self._sink.on_minute_complete(self._minute)  # its ts_event: only counted, never compared

    def _fail(self, exc: FrameError) -> None:
        self._minutes.clear()
        self._sink.on_frame_error(exc)
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._minutes.clear()
        self._sink.on_feed_lost()
        super().connection_lost(exc)
