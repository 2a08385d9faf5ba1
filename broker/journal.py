"""The journal: append-only segments of typed records (``broker.records``) and the snapshots
between them, written and read here.

A client order id is journaled before the order is sent. ``fsync`` is ``none`` (the OS decides),
``batch`` (once per inference batch, when ``sync`` is called) or ``always`` (every record).
Under ``batch``, records nothing is sent on (a halt, say) may be synced with ``sync_soon``: written
at once, so a crash of the process loses nothing, and fsynced on the journal's own thread, so the
event loop does not wait for the disk; every later ``sync`` is behind them in the file.

A write, flush or fsync that fails (ENOSPC, EIO) raises ``JournalError``: the daemon cannot
reason about what reached the disk, so it fail-stops and the next process replays the journal.

On disk, beside ``journal.path`` (say ``journal.msgpack``):

- ``journal.msgpack``: the active segment, appended to; its header names its segment number.
- ``journal.msgpack.000007``: a sealed segment (number 7), never written again.
- ``journal.msgpack.snapshot.000007``: a snapshot of everything restore needs as of the end of
  segment 7, checksummed.

A snapshot is written atomically (a temporary file, fsync, rename, fsync of the folder), then the
active segment is sealed (renamed) and a new one begun. Start-up reads the newest snapshot whose
checksum holds (falling back to older ones) and only the segments after it, so it does not grow
with history. A crash at any step loses nothing: before the rename the old snapshot and every
segment are still there; after it the new snapshot covers the active segment, which is sealed at
the next start if it was not yet.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgpack
import msgspec

from broker.crashpoints import CRASH
from broker.errors import JournalError
from broker.records import FORMAT, READS, Header, Record

FsyncPolicy = Literal["none", "batch", "always"]


class Journal:
    """Records are buffered in memory and written with one ``write`` per ``sync`` (group commit):
    nothing reaches the file between syncs, so a batch is on disk whole or not at all, up to a
    torn last record that ``recover_journal`` cuts off."""

    def __init__(self, path: Path, fsync: FsyncPolicy = "batch", *, wall_ns: int = 0, segment: int = 1) -> None:
        self.path = path
        self.fsync = fsync
        self._encoder = msgspec.msgpack.Encoder()
        self._pending = bytearray()
        self.records = 0
        self.failed: JournalError | None = None  # after one failed write the file is not trusted again
        self._fd = -1
        # The flusher thread's fsyncs (``sync_soon``): the lock keeps the descriptor open under one.
        self._fd_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._flush_wanted = threading.Event()
        self._closing = False
        # Called on the flusher thread when its fsync fails (the daemon fail-stops); the next
        # append or sync raises it anyway.
        self.on_background_error: Callable[[JournalError], None] | None = None
        self._open(wall_ns, segment)
        if self._size and header_format(path) not in (None, FORMAT):
            # An active segment an older release began: sealed as it is, so what this release
            # writes (an ``orders`` record, say) begins under a header naming the format it
            # needs, and an older release rolled back to refuses it instead of skipping it.
            self.rotate(wall_ns)

    def _open(self, wall_ns: int, segment: int) -> None:
        self.segment = segment
        self.records_in_segment = 0
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise JournalError(str(path), "open", exc) from exc
        if self._size == 0:
            try:
                self.append(Header(ts=wall_ns, format=FORMAT, segment=segment))
                self.sync(force=True)
                fsync_dir(path.parent)
            except (JournalError, OSError) as exc:
                os.close(self._fd)
                self._fd = -1
                if isinstance(exc, JournalError):
                    raise
                raise JournalError(str(path), "open", exc) from exc

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
        self.records_in_segment += 1
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
            self._write(pending)
            if self.fsync != "none" or force:
                with self._fd_lock:
                    # A failed write-back is reported to one fsync of the file only: if the
                    # flusher's fsync took it, ``failed`` says so by now, and this one must not
                    # pass for a clean sync (the orders it is for would leave).
                    if self.failed is not None:
                        raise self.failed
                    os.fsync(self._fd)
        except OSError as exc:
            # What reached the file is unknown (a short write, a page the kernel could not write
            # back): writing again could tear a record mid-file, so nothing more is written.
            self.failed = JournalError(str(self.path), "sync", exc)
            raise self.failed from exc
        self._size += len(pending)
        pending.clear()

    def _write(self, pending: bytearray) -> None:
        with memoryview(pending) as whole:
            done = 0
            while done < len(whole):
                done += os.write(self._fd, whole[done:])

    def sync_soon(self) -> None:
        """``sync`` without waiting for the disk (under ``batch``): the records are written now
        and fsynced on the journal's flusher thread; under ``none`` and ``always`` as ``sync``."""
        if self.fsync != "batch":
            self.sync()
            return
        if self.failed is not None:
            raise self.failed
        if not self._pending:
            return
        try:
            self._write(self._pending)
        except OSError as exc:
            self.failed = JournalError(str(self.path), "sync", exc)
            raise self.failed from exc
        self._size += len(self._pending)
        self._pending.clear()
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, name="tradingd-journal-fsync", daemon=True)
            self._flusher.start()
        self._flush_wanted.set()

    def _flush_loop(self) -> None:
        while True:
            self._flush_wanted.wait()
            self._flush_wanted.clear()
            with self._fd_lock:
                if self._closing or self._fd < 0:
                    return
                try:
                    if CRASH.armed and CRASH.due("journal_fsync_eio"):
                        raise CRASH.io_error("journal_fsync_eio")
                    os.fsync(self._fd)
                except OSError as exc:
                    self.failed = error = JournalError(str(self.path), "fsync", exc)
                    callback = self.on_background_error
                    if callback is not None:
                        callback(error)
                    return

    def _stop_flusher(self) -> None:
        flusher = self._flusher
        if flusher is None:
            return
        with self._fd_lock:
            self._closing = True
        self._flush_wanted.set()
        flusher.join()
        self._flusher = None
        self._closing = False

    def size_bytes(self) -> int:
        return self._size + len(self._pending)

    def rotate(self, wall_ns: int) -> int:
        """Seal the active segment (synced, renamed to its number) and begin the next one;
        returns the sealed segment's number."""
        self.sync(force=True)
        self._stop_flusher()
        sealed = self.segment
        os.close(self._fd)
        self._fd = -1
        try:
            os.rename(self.path, sealed_path(self.path, sealed))
            fsync_dir(self.path.parent)
        except OSError as exc:
            self.failed = JournalError(str(self.path), f"seal segment {sealed}", exc)
            raise self.failed from exc
        if CRASH.armed:
            CRASH.reached("segment_sealed")
        self._open(wall_ns, sealed + 1)
        return sealed

    def close(self) -> None:
        if self._fd < 0:
            return  # closed already
        try:
            if self.failed is None:
                self.sync(force=self._flusher is not None)
        finally:
            self._stop_flusher()
            os.close(self._fd)
            self._fd = -1


def header_format(path: Path) -> int | None:
    """The format a journal file's header names (None if it has no readable header)."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(head)
        first = unpacker.unpack()
    except (OSError, ValueError, TypeError, msgpack.UnpackException, msgpack.OutOfData):
        return None
    if isinstance(first, dict) and first.get("kind") == "header" and type(first.get("format")) is int:
        return int(first["format"])
    return None


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record of every segment still on disk (sealed ones, then the active one) in
    order, as plain maps (for tools and tests); a torn last record (a crash mid-write) is skipped."""
    for _, segment in sealed_segments(path):
        yield from _read_file(segment)
    if path.exists():
        yield from _read_file(path)


def _read_file(path: Path) -> Iterator[dict[str, Any]]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            unpacker.feed(block)
            yield from unpacker


_RECORD_DECODER = msgspec.msgpack.Decoder(Record)
KNOWN_KINDS = frozenset(t.__struct_config__.tag for t in Record.__args__)


def _kind_of(data: bytes) -> str | None:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError, TypeError):
        return None
    kind = obj.get("kind") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) else None


def recover_journal(path: Path, unknown: dict[str, int] | None = None) -> tuple[list[Record], int]:
    """Read every complete record as a typed value and cut off a torn tail, so appends start on a
    record boundary.

    Returns the records and the number of bytes cut (0 unless the last write was torn). A record
    that does not decode, or a format this version does not know, raises ``JournalError``; a
    record of a kind a newer release added is skipped and counted in ``unknown``.
    """
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    # The unpacker only finds where each record ends (``skip``, in C); msgspec decodes each
    # record's bytes straight into its typed struct, many times faster than converting maps.
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1 << 20))
    unpacker.feed(data)
    decode = _RECORD_DECODER.decode
    records: list[Record] = []
    skipped: dict[str, int] = {}
    good = 0
    while True:
        try:
            unpacker.skip()
        except msgpack.OutOfData:
            break
        except (msgpack.UnpackException, ValueError, TypeError) as exc:
            raise JournalError(str(path), f"read after record {len(records)}", exc) from exc
        end = unpacker.tell()
        try:
            records.append(decode(data[good:end]))
        except msgspec.DecodeError as exc:
            kind = _kind_of(data[good:end])
            if kind is None or kind in KNOWN_KINDS:
                raise JournalError(str(path), f"record {len(records)}", exc) from exc
            # A kind a newer release added (this one was rolled back to): it cannot be about
            # anything this release acts on, so it is skipped, and said.
            skipped[kind] = skipped.get(kind, 0) + 1
        good = end
    if unknown is not None:
        for kind, n in skipped.items():
            unknown[kind] = unknown.get(kind, 0) + n
    if records:
        first = records[0]
        if not isinstance(first, Header):
            raise JournalError(str(path), "header", ValueError(f"first record is {type(first).__name__}"))
        if first.format not in READS:
            known = ", ".join(map(str, sorted(READS)))
            raise JournalError(str(path), "header", ValueError(f"format {first.format}; this build reads {known}"))
    size = path.stat().st_size
    if size > good:
        with path.open("r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return records, size - good


# -- segments and snapshots ---------------------------------------------------------------------

SNAPSHOT_FORMAT = 1


def sealed_path(base: Path, segment: int) -> Path:
    return base.with_name(f"{base.name}.{segment:06d}")


def snapshot_path(base: Path, segment: int) -> Path:
    return base.with_name(f"{base.name}.snapshot.{segment:06d}")


def _numbered(base: Path, pattern: str) -> list[tuple[int, Path]]:
    rx = re.compile(pattern.format(re.escape(base.name)))
    if not base.parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.parent.iterdir() if (m := rx.fullmatch(p.name))]
    return sorted(found)


def sealed_segments(base: Path) -> list[tuple[int, Path]]:
    return _numbered(base, r"{}\.(\d{{6,}})")


def snapshots(base: Path) -> list[tuple[int, Path]]:
    return _numbered(base, r"{}\.snapshot\.(\d{{6,}})")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _SnapshotFile(msgspec.Struct, frozen=True):
    format: int
    segment: int
    ts: int
    sha256: str
    body: bytes


def write_snapshot(base: Path, segment: int, body: bytes, wall_ns: int) -> Path:
    """Write the snapshot as of the end of ``segment`` atomically: a temporary file, fsync,
    rename, fsync of the folder. A crash leaves either no snapshot of that number or a whole one."""
    final = snapshot_path(base, segment)
    tmp = final.with_name(final.name + ".tmp")
    data = msgspec.msgpack.encode(
        _SnapshotFile(SNAPSHOT_FORMAT, segment, wall_ns, hashlib.sha256(body).hexdigest(), body)
    )
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            with memoryview(data) as whole:
                done = 0
                if CRASH.armed and CRASH.due("snapshot_torn"):
                    os.write(fd, whole[: len(whole) // 2])
                    os.fsync(fd)
                    CRASH.exit("snapshot_torn")
                while done < len(whole):
                    done += os.write(fd, whole[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        fsync_dir(base.parent)
    except OSError as exc:
        raise JournalError(str(final), "write snapshot", exc) from exc
    if CRASH.armed:
        CRASH.reached("snapshot_written")
    return final


def read_snapshot(path: Path) -> tuple[int, bytes]:
    """(segment, body) of a snapshot file whose checksum holds; ``JournalError`` otherwise."""
    try:
        snap = msgspec.msgpack.decode(path.read_bytes(), type=_SnapshotFile)
    except (OSError, msgspec.DecodeError) as exc:
        raise JournalError(str(path), "read snapshot", exc) from exc
    if snap.format != SNAPSHOT_FORMAT:
        raise JournalError(str(path), "read snapshot", ValueError(f"format {snap.format}"))
    if hashlib.sha256(snap.body).hexdigest() != snap.sha256:
        raise JournalError(str(path), "read snapshot", ValueError("checksum mismatch"))
    return snap.segment, snap.body


@dataclass
class Recovery:
    """What start-up reads: the newest good snapshot (if any) and the records after it."""

    snapshot: bytes | None
    snapshot_segment: int  # 0 when there is none
    records: list[Record]
    torn_bytes: int
    next_segment: int  # the number the active segment has, or gets
    skipped_snapshots: list[str] = field(default_factory=list)  # unreadable, newest first
    segments_read: int = 0
    unknown_kinds: dict[str, int] = field(default_factory=dict)  # skipped: written by a newer release


def recover(base: Path, accept: Callable[[bytes], object] | None = None) -> Recovery:
    """The newest readable snapshot and every record after it; a torn tail of the active segment
    is cut. An active segment the snapshot already covers (a crash between the snapshot and the
    seal) is sealed here, so appends never go into a covered segment."""
    skipped: list[str] = []
    unknown: dict[str, int] = {}
    body: bytes | None = None
    covered = 0
    if base.parent.is_dir():
        for leftover in base.parent.glob(f"{glob.escape(base.name)}.snapshot.*.tmp"):
            leftover.unlink()  # a snapshot the process died writing: never renamed, never used
    for number, path in reversed(snapshots(base)):
        try:
            covered, body = read_snapshot(path)
        except JournalError as exc:
            skipped.append(str(exc))
            continue
        if covered != number:
            skipped.append(f"{path}: names segment {covered}")
            body, covered = None, 0
            continue
        if accept is not None:
            try:
                accept(body)  # a body this release cannot take (a newer release's) falls back too
            except Exception as exc:
                skipped.append(f"{path}: {type(exc).__name__}: {exc}")
                body, covered = None, 0
                continue
        break
    records: list[Record] = []
    read = 0
    highest = covered
    expected = covered + 1  # the chain must run unbroken from the snapshot to the active segment
    for number, path in sealed_segments(base):
        highest = max(highest, number)
        if number <= covered:
            continue
        if number != expected:
            raise JournalError(
                str(base), "recover", ValueError(f"segment {expected} is missing (next on disk: {number})")
            )
        expected += 1
        part, cut = recover_journal(path, unknown)
        if cut:
            raise JournalError(str(path), "read", ValueError(f"sealed segment torn ({cut} bytes)"))
        records.extend(part)
        read += 1
    torn = 0
    if base.exists():
        part, torn = recover_journal(base, unknown)
        header = part[0] if part else None
        number = header.segment if isinstance(header, Header) else highest + 1
        if header is not None and number > covered and number != expected:
            raise JournalError(
                str(base), "recover", ValueError(f"active segment is {number}, segment {expected} is missing")
            )
        if header is not None and number <= covered:
            # The snapshot covers it: seal it as it is (its records are in the snapshot).
            os.rename(base, sealed_path(base, number))
            fsync_dir(base.parent)
            highest = max(highest, number)
        else:
            records.extend(part)
            read += 1
            highest = max(highest, number - 1)
            if header is not None:
                return Recovery(body, covered, records, torn, number, skipped, read, unknown)
    return Recovery(body, covered, records, torn, highest + 1, skipped, read, unknown)


@dataclass(frozen=True)
class Retention:
    """Sealed segments and snapshots kept: at least ``keep_snapshots`` snapshots and every segment
    after the oldest of them (so a bad newest snapshot can fall back), then whatever fits
    ``max_segments``, ``max_bytes`` and ``max_age_s``."""

    keep_snapshots: int = 2
    max_segments: int = 64
    max_bytes: int = 4 << 30
    max_age_s: float = 30 * 86400.0


def prune(base: Path, retention: Retention, now_s: float | None = None) -> list[Path]:
    """Delete what the retention policy lets go; returns the paths removed."""
    now_s = time.time() if now_s is None else now_s
    snaps = snapshots(base)
    kept = snaps[-retention.keep_snapshots :] if retention.keep_snapshots else []
    floor = kept[0][0] if kept else 0  # segments after this one are needed by a kept snapshot
    removed: list[Path] = []
    segments = sealed_segments(base)
    total = sum(p.stat().st_size for _, p in segments)
    for i, (number, path) in enumerate(segments):
        if number > floor:
            break
        newer = len(segments) - i
        too_old = now_s - path.stat().st_mtime > retention.max_age_s
        if newer > retention.max_segments or total > retention.max_bytes or too_old:
            total -= path.stat().st_size
            path.unlink()
            removed.append(path)
    for entry in snaps:
        if entry not in kept:  # older than the kept ones: never read again
            entry[1].unlink()
            removed.append(entry[1])
    if removed:
        fsync_dir(base.parent)
    return removed
