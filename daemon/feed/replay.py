"""Serve recorded minute bars as a feed, at real time or any multiple of it.

Bars come from a CSV file or a DBN file (``.dbn`` or ``.dbn.zst``, told apart by their first
bytes) and are served in one of two formats. Protocol v1 (``ReplayServer``): each minute is its
bars followed by ``minute_end``, packed once at load time with its sequence numbers, so a
client that reconnects resumes at the first minute it has not fully received, with the same
numbers. DBN (``DbnReplayServer``): each connection gets the metadata and the symbol mapping
records, then the OHLCV records minute by minute from the same resume point. ``open_replay``
is the one entry point for both.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import msgpack
import numpy as np

from daemon.feed import dbn
from daemon.feed.protocol import Bar, bar_map, heartbeat_map, minute_end_map

NS_PER_MIN = 60_000_000_000
NS_PER_DAY = 86_400_000_000_000
COLUMNS = ("symbol", "ts_utc", "open", "high", "low", "close", "volume")
DAILY_COLUMNS = ("symbol", "date", "open", "high", "low", "close", "volume")


class ReplayError(Exception):
    """A file that cannot be replayed: names the file, the line (CSV) where known, and why."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if line is None else f"{path}:{line}: {problem}")


@dataclass(frozen=True, slots=True)
class Minute:
    ts: int  # the minute's close, ns since the epoch
    bars: tuple[Bar, ...]


def _ts_ns(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp()) * 1_000_000_000


def load_csv(path: Path) -> list[Minute]:
    """Read bars grouped by their close time, with each bar's previous session close.

    Minute files have ``symbol,ts_utc,open,high,low,close,volume`` (``ts_utc`` = bar start; the
    bar closes a minute later); daily files have ``symbol,date,...`` (the bar closes at 20:00 UTC
    of its date). ``prev_close`` is the symbol's last close on an earlier UTC date, the reference
    of the halt rule.
    """
    by_close: dict[int, list[tuple[str, float, float, float, float, float]]] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = tuple(h.strip() for h in (next(reader, None) or ())[:7])
        if header == COLUMNS:
            to_ts = _minute_close_ns
        elif header == DAILY_COLUMNS:
            to_ts = _daily_close_ns
        else:
            raise ReplayError(
                str(path), 1, f"expected columns {','.join(COLUMNS)} or {','.join(DAILY_COLUMNS)}, got {header}"
            )
        for line, row in enumerate(reader, start=2):
            try:
                close_ts = to_ts(row[1])
                values = (row[0], float(row[2]), float(row[3]), float(row[4]), float(row[5]), float(row[6]))
            except (ValueError, IndexError) as exc:
                raise ReplayError(str(path), line, f"bad row {row}: {exc}") from exc
            by_close.setdefault(close_ts, []).append(values)
    minutes, seq = [], 0
    last_close: dict[str, tuple[int, float]] = {}  # symbol -> (day, close)
    session_ref: dict[str, tuple[int, float | None]] = {}  # symbol -> (day, previous day's last close)
    for ts in sorted(by_close):
        day = ts // NS_PER_DAY
        bars = []
        for symbol, o, h, lo, c, v in sorted(by_close[ts]):
            ref_day, ref = session_ref.get(symbol, (None, None))
            if ref_day != day:
                previous = last_close.get(symbol)
                ref = previous[1] if previous is not None and previous[0] < day else None
                session_ref[symbol] = (day, ref)
            seq += 1
            bars.append(Bar(seq, symbol, ts, o, h, lo, c, v, ref))
            last_close[symbol] = (day, c)
        seq += 1  # the minute_end
        minutes.append(Minute(ts, tuple(bars)))
    return minutes


def _minute_close_ns(text: str) -> int:
    return _ts_ns(text) + NS_PER_MIN


def _daily_close_ns(text: str) -> int:
    return _ts_ns(text + "T20:00:00+00:00")


def symbols_of(minutes: list[Minute]) -> tuple[str, ...]:
    return tuple(sorted({b.symbol for m in minutes for b in m.bars}))


FeedFormat = Literal["msgpack", "dbn"]


def is_dbn_file(path: Path) -> bool:
    """Whether the file holds DBN (plain, or zstd-compressed as ``.dbn.zst`` files are), by its
    first bytes rather than its name."""
    with path.open("rb") as f:
        head = f.read(4)
    return head[:3] == dbn.DBN_PREFIX or head == dbn.ZSTD_MAGIC


def load_minutes(path: Path) -> list[Minute]:
    """Minutes from a CSV or a DBN file, whichever the file holds."""
    return load_dbn(path) if is_dbn_file(path) else load_csv(path)


def load_dbn(path: Path) -> list[Minute]:
    """Read a ``.dbn`` or ``.dbn.zst`` file of OHLCV records into minutes (see ``records_to_minutes``).

    Every instrument must have a symbol mapping (in the metadata or a mapping record).
    """
    try:
        loaded = dbn.read_dbn(path)
        return records_to_minutes(loaded.bars, loaded.symbols)
    except dbn.DbnError as exc:
        raise ReplayError(str(path), None, str(exc)) from exc


def records_to_minutes(bars: dbn.OhlcvArray, symbols_of_ids: Mapping[int, str]) -> list[Minute]:
    """OHLCV records as minutes: grouped by bar close (``ts_event`` + the bar's duration), bars
    in symbol order within a minute and numbered as ``load_csv`` numbers them (one ``seq`` per
    bar, one for each ``minute_end``). DBN has no previous close: ``prev_close`` is None.

    Raises ``dbn.UnmappedInstrumentError`` for an instrument with no symbol.
    """
    if not len(bars):
        return []
    index = dbn.InstrumentIndex(symbols_of_ids)  # slots in sorted symbol order
    slots = index.lookup(bars["instrument_id"])
    if (slots < 0).any():
        raise dbn.UnmappedInstrumentError(int(bars["instrument_id"][int(np.argmax(slots < 0))]))
    close = dbn.close_ns(bars)
    order = np.lexsort((slots, close))
    bars, close = bars[order], close[order]
    cuts = (np.flatnonzero(close[1:] != close[:-1]) + 1).tolist()
    minutes, seq = [], 1
    for a, b in itertools.pairwise([0, *cuts, len(bars)]):
        group = dbn.records_to_bars(bars[a:b], symbols_of_ids, first_seq=seq)
        minutes.append(Minute(int(close[a]), tuple(group)))
        seq += len(group) + 1  # the minute_end
    return minutes


def minutes_to_records(minutes: list[Minute]) -> tuple[dbn.OhlcvArray, dict[int, str]]:
    """Minutes as OHLCV-1m records and their instrument_id -> symbol (ids 1, 2, ... in symbol
    order). ``prev_close`` is dropped: DBN has no place for it."""
    ids = {symbol: i for i, symbol in enumerate(symbols_of(minutes), start=1)}
    records = dbn.bars_to_records((b for m in minutes for b in m.bars), ids)
    return records, {i: symbol for symbol, i in ids.items()}


class ReplayServer:
    """Serve ``minutes`` (protocol v1) to each client in turn; ``speed`` 0 is as fast as the socket
    takes it. After the last minute, heartbeats every ``heartbeat_s`` until the client leaves."""

    def __init__(self, minutes: list[Minute], speed: float = 0.0, heartbeat_s: float = 1.0) -> None:
        packer = msgpack.Packer()
        frames: list[bytes] = []
        for m in minutes:
            parts = [packer.pack(bar_map(b)) for b in m.bars]
            end_seq = (m.bars[-1].seq + 1) if m.bars else 0
            parts.append(packer.pack(minute_end_map(end_seq, m.ts, len(m.bars))))
            frames.append(b"".join(parts))
        self._last_seq = max((m.bars[-1].seq + 1 for m in minutes if m.bars), default=0)
        self._setup(frames, b"", speed, heartbeat_s)

    def _setup(self, frames: list[bytes], prologue: bytes, speed: float, heartbeat_s: float) -> None:
        self._frames = frames  # one per minute
        self._prologue = prologue  # sent at the start of every connection
        self.speed = speed
        self.heartbeat_s = heartbeat_s
        self.position = 0  # next minute to send
        self.done = asyncio.Event()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._lock = asyncio.Lock()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def total_minutes(self) -> int:
        return len(self._frames)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            async with self._lock:  # one live client at a time shares the position
                if self._prologue:
                    writer.write(self._prologue)
                    await writer.drain()
                start = time.monotonic()
                first = self.position
                while self.position < len(self._frames):
                    if self.speed > 0:
                        due = start + (self.position - first) * 60.0 / self.speed
                        delay = due - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    writer.write(self._frames[self.position])
                    await writer.drain()
                    self.position += 1
                self.done.set()
                await self._idle(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _idle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        packer = msgpack.Packer()
        while not reader.at_eof():
            self._last_seq += 1
            writer.write(packer.pack(heartbeat_map(self._last_seq, time.time_ns())))
            await writer.drain()
            try:
                await asyncio.wait_for(reader.read(4096), timeout=self.heartbeat_s)
            except TimeoutError:
                continue


class DbnReplayServer(ReplayServer):
    """Serve OHLCV records as a raw DBN stream: on every connection the metadata and one
    SymbolMappingMsg per instrument, then the records minute by minute (a minute: the records
    of one ``ts_event``), paced by ``speed`` and resuming where the last client stopped, as
    ``ReplayServer`` does. DBN has no heartbeat: after the last minute the connection is held
    open until the client closes it.
    """

    def __init__(
        self,
        metadata: dbn.Metadata,
        bars: dbn.OhlcvArray,
        symbols_of_ids: Mapping[int, str],
        speed: float = 0.0,
    ) -> None:
        ts = bars["ts_event"]
        if len(bars) > 1 and bool((ts[1:] < ts[:-1]).any()):
            bars = bars[np.argsort(ts, kind="stable")]
        frames = [bars[a:b].tobytes() for a, b in dbn.split_minutes(bars)]
        prologue = metadata.encode()
        if not metadata.ts_out:  # with ts_out every record carries 8 more bytes; the metadata's mappings suffice
            prologue += dbn.symbol_mapping_records(symbols_of_ids, metadata.version, metadata.start, metadata.end)
        self.metadata = metadata
        self.records = len(bars)
        self._setup(frames, prologue, speed, heartbeat_s=0.0)

    @classmethod
    def from_file(cls, path: Path, speed: float = 0.0) -> DbnReplayServer:
        """Serve a ``.dbn`` or ``.dbn.zst`` file's own metadata and records. Raises ReplayError."""
        try:
            loaded = dbn.read_dbn(path)
        except dbn.DbnError as exc:
            raise ReplayError(str(path), None, str(exc)) from exc
        return cls(loaded.metadata, loaded.bars, loaded.symbols, speed)

    @classmethod
    def from_minutes(cls, minutes: list[Minute], speed: float = 0.0, version: int = 3) -> DbnReplayServer:
        """Serve minutes (from a CSV, say) as OHLCV-1m DBN; ``prev_close`` is dropped."""
        records, symbols = minutes_to_records(minutes)
        start = int(records["ts_event"].min()) if len(records) else 0
        end = int(records["ts_event"].max()) + NS_PER_MIN if len(records) else None
        return cls(dbn.ohlcv_metadata(symbols, start, end, version=version), records, symbols, speed)

    async def _idle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            pass


def open_replay(path: Path, *, feed_format: FeedFormat = "msgpack", speed: float = 0.0) -> ReplayServer:
    """The replay server for a CSV or DBN file (told apart by content) in a feed format.

    ``msgpack``: protocol v1 (a DBN file's bars without prev_close). ``dbn``: a DBN file's own
    metadata and records, or a CSV's bars as OHLCV-1m. Raises ReplayError (and OSError).
    """
    if feed_format == "msgpack":
        return ReplayServer(load_minutes(path), speed=speed)
    if feed_format == "dbn":
        if is_dbn_file(path):
            return DbnReplayServer.from_file(path, speed)
        minutes = load_csv(path)
        try:
            return DbnReplayServer.from_minutes(minutes, speed)
        except dbn.DbnError as exc:  # a volume that is not a whole number, a symbol DBN cannot hold
            raise ReplayError(str(path), None, str(exc)) from exc
    raise ReplayError(str(path), None, f"unknown feed format {feed_format!r} (msgpack or dbn)")
