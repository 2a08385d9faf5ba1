"""An append-only file of msgpack records: intents, gate decisions, sends, execution reports.

A client order id is journaled before the order is sent. ``fsync`` is ``none`` (the OS decides),
``batch`` (once per inference batch, when ``sync`` is called) or ``always`` (every record).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

import msgpack

FsyncPolicy = Literal["none", "batch", "always"]


class Journal:
    def __init__(self, path: Path, fsync: FsyncPolicy = "batch") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fsync = fsync
        self._file: IO[bytes] = path.open("ab")
        self._packer = msgpack.Packer()
        self._dirty = False
        self.records = 0

    def append(self, kind: str, ts: int, **fields: Any) -> None:
        fields["kind"] = kind
        fields["ts"] = ts
        self._file.write(self._packer.pack(fields))
        self.records += 1
        if self.fsync == "always":
            self._file.flush()
            os.fsync(self._file.fileno())
        else:
            self._dirty = True

    def sync(self) -> None:
        """End of a batch: hand the records to the OS, and to the disk under ``batch``."""
        if not self._dirty:
            return
        self._file.flush()
        if self.fsync == "batch":
            os.fsync(self._file.fileno())
        self._dirty = False

    def size_bytes(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self.sync()
        self._file.close()


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record in order; a torn last record (a crash mid-write) is skipped."""
    unpacker = msgpack.Unpacker(raw=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            unpacker.feed(block)
            yield from unpacker


def recover_journal(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Read every complete record and cut off a torn tail, so appends start on a record boundary.

    Returns the records and the number of bytes cut (0 unless the last write was torn).
    """
    if not path.exists():
        return [], 0
    unpacker = msgpack.Unpacker(raw=False)
    records: list[dict[str, Any]] = []
    good = 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            unpacker.feed(block)
            for record in unpacker:
                records.append(record)
                good = unpacker.tell()
    size = path.stat().st_size
    if size > good:
        with path.open("r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return records, size - good
