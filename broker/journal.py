"""The journal: an append-only file of typed records (``broker.records``), written and read here.

A client order id is journaled before the order is sent. ``fsync`` is ``none`` (the OS decides),
``batch`` (once per inference batch, when ``sync`` is called) or ``always`` (every record).

A write, flush or fsync that fails (ENOSPC, EIO) raises ``JournalError``: the daemon cannot
reason about what reached the disk, so it fail-stops and the next process replays the journal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import msgpack
import msgspec

from broker.crashpoints import CRASH
from broker.errors import JournalError
from broker.records import FORMAT, Header, Record

FsyncPolicy = Literal["none", "batch", "always"]


class Journal:
    """Records are buffered in memory and written with one ``write`` per ``sync`` (group commit):
    nothing reaches the file between syncs, so a batch is on disk whole or not at all, up to a
    torn last record that ``recover_journal`` cuts off."""

    def __init__(self, path: Path, fsync: FsyncPolicy = "batch", *, wall_ns: int = 0) -> None:
        self.path = path
        self.fsync = fsync
        self._encoder = msgspec.msgpack.Encoder()
        self._pending = bytearray()
        self.records = 0
        self.failed: JournalError | None = None  # after one failed write the file is not trusted again
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise JournalError(str(path), "open", exc) from exc
        if self._size == 0:
            try:
                self.append(Header(ts=wall_ns, format=FORMAT))
                self.sync(force=True)
            except JournalError:
                os.close(self._fd)
                raise

    def append(self, record: Record) -> None:
        if self.failed is not None:
            raise self.failed
        try:
            data = self._encoder.encode(record)
        except (OverflowError, TypeError, ValueError) as exc:
            # A value no record may hold (an integer past 64 bits, say): a broken invariant.
            raise JournalError(str(self.path), f"encode {type(record).__name__}", exc) from exc
        if CRASH.armed:
            self._injected(data)
        self._pending += data
        self.records += 1
        if self.fsync == "always":
            self.sync()

    def _injected(self, data: bytes) -> None:
        if CRASH.due("journal_torn"):
            self._pending += data[: max(1, len(data) // 2)]
            self.sync(force=True)
            CRASH.exit("journal_torn")
        if CRASH.due("journal_eio"):
            self.failed = JournalError(str(self.path), "write", CRASH.io_error("journal_eio"))
            raise self.failed

    def sync(self, *, force: bool = False) -> None:
        """End of a batch: write the buffered records, and fsync them under ``batch``/``always``."""
        if self.failed is not None:
            raise self.failed
        pending = self._pending
        if not pending and not force:
            return
        try:
            with memoryview(pending) as whole:
                done = 0
                while done < len(whole):
                    done += os.write(self._fd, whole[done:])
            if self.fsync != "none" or force:
                os.fsync(self._fd)
        except OSError as exc:
            # What reached the file is unknown (a short write, a page the kernel could not write
            # back): writing again could tear a record mid-file, so nothing more is written.
            self.failed = JournalError(str(self.path), "sync", exc)
            raise self.failed from exc
        self._size += len(pending)
        pending.clear()

    def size_bytes(self) -> int:
        return self._size + len(self._pending)

    def close(self) -> None:
        if self._fd < 0:
            return  # closed already
        try:
            if self.failed is None:
                self.sync()
        finally:
            os.close(self._fd)
            self._fd = -1


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record in order, as plain maps (for tools and tests); a torn last record
    (a crash mid-write) is skipped."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            unpacker.feed(block)
            yield from unpacker


def decode_record(obj: object, path: Path, index: int) -> Record:
    try:
        record: Record = msgspec.convert(obj, Record)
    except msgspec.ValidationError as exc:
        raise JournalError(str(path), f"record {index}", exc) from exc
    return record


def recover_journal(path: Path) -> tuple[list[Record], int]:
    """Read every complete record as a typed value and cut off a torn tail, so appends start on a
    record boundary.

    Returns the records and the number of bytes cut (0 unless the last write was torn). A record
    that does not decode, or a format this version does not know, raises ``JournalError``.
    """
    if not path.exists():
        return [], 0
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    records: list[Record] = []
    good = 0
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 16), b""):
                unpacker.feed(block)
                for obj in unpacker:
                    records.append(decode_record(obj, path, len(records)))
                    good = unpacker.tell()
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise JournalError(str(path), f"read after record {len(records)}", exc) from exc
    if records:
        first = records[0]
        if not isinstance(first, Header):
            raise JournalError(str(path), "header", ValueError(f"first record is {type(first).__name__}"))
        if first.format != FORMAT:
            raise JournalError(str(path), "header", ValueError(f"format {first.format}; this build reads {FORMAT}"))
    size = path.stat().st_size
    if size > good:
        with path.open("r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return records, size - good
