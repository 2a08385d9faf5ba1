"""Serve a CSV of minute bars as a feed (protocol v1), at real time or any multiple of it.

Bars are grouped by minute; each minute is its bars followed by ``minute_end``. The whole stream
is packed once at load time with its sequence numbers, so a client that reconnects resumes at
the first minute it has not fully received, with the same numbers.
"""

from __future__ import annotations

import asyncio
import csv
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import msgpack

from daemon.feed.protocol import Bar, bar_map, heartbeat_map, minute_end_map

NS_PER_MIN = 60_000_000_000
NS_PER_DAY = 86_400_000_000_000
COLUMNS = ("symbol", "ts_utc", "open", "high", "low", "close", "volume")
DAILY_COLUMNS = ("symbol", "date", "open", "high", "low", "close", "volume")


class ReplayError(Exception):
    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")


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


class ReplayServer:
    """Serve ``minutes`` to each client in turn; ``speed`` 0 is as fast as the socket takes it."""

    def __init__(self, minutes: list[Minute], speed: float = 0.0, heartbeat_s: float = 1.0) -> None:
        packer = msgpack.Packer()
        self._frames: list[bytes] = []
        for m in minutes:
            parts = [packer.pack(bar_map(b)) for b in m.bars]
            end_seq = (m.bars[-1].seq + 1) if m.bars else 0
            parts.append(packer.pack(minute_end_map(end_seq, m.ts, len(m.bars))))
            self._frames.append(b"".join(parts))
        self._last_seq = max((m.bars[-1].seq + 1 for m in minutes if m.bars), default=0)
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
        packer = msgpack.Packer()
        try:
            async with self._lock:  # one live client at a time shares the position
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
                while not reader.at_eof():
                    self._last_seq += 1
                    writer.write(packer.pack(heartbeat_map(self._last_seq, time.time_ns())))
                    await writer.drain()
                    try:
                        await asyncio.wait_for(reader.read(4096), timeout=self.heartbeat_s)
                    except TimeoutError:
                        continue
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
