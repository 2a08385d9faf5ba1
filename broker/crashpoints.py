"""Deterministic crash points: the process exits at a named point, for crash-safety tests.

Off unless the environment names a point (``TRADINGD_CRASH_AT=point`` or ``point@n`` for the
n-th time it is reached); never set in production. The order path calls ``reached(point)`` at
each place where a crash must be survivable; a disarmed injector costs one attribute read.

Points:

- ``batch_synced``: the batch's records are synced and none of its orders is written yet.
- ``batch_partly_sent``: some but not all of a batch's orders are written to the broker.
- ``sent_not_marked``: an order is written to the broker and not yet marked sent.
- ``mid_reconcile``: part of the broker's status has been applied.
- ``journal_torn``: half of a journal record is on disk (a torn write).
- ``journal_eio``: a journal write fails with EIO (the process is not killed: it must fail-stop).
- ``journal_fsync_eio``: a fsync on the journal's own thread (``Journal.sync_soon``) fails with
  EIO: the event loop must learn of it and fail-stop.
- ``snapshot_torn``: half of a snapshot's temporary file is on disk.
- ``snapshot_written``: the snapshot is in place and the active segment not yet sealed.
- ``segment_sealed``: the active segment is sealed and the next one not yet begun.
"""

from __future__ import annotations

import errno
import os
import sys

ENV = "TRADINGD_CRASH_AT"
EXIT_CODE = 86
POINTS = frozenset(
    {
        "batch_synced",
        "batch_partly_sent",
        "sent_not_marked",
        "mid_reconcile",
        "journal_torn",
        "journal_eio",
        "journal_fsync_eio",
        "snapshot_torn",
        "snapshot_written",
        "segment_sealed",
    }
)


class CrashPointError(ValueError):
    pass


class CrashPoints:
    def __init__(self, spec: str | None) -> None:
        self.point: str | None = None
        self.error: str | None = None  # a spec that did not parse: ``tradingd run`` refuses it
        self.at = 1
        self.count = 0
        if spec:
            point, _, nth = spec.partition("@")
            if point not in POINTS:
                raise CrashPointError(f"{ENV}={spec!r}: unknown point; known: {sorted(POINTS)}")
            if nth and not nth.isdigit():
                raise CrashPointError(f"{ENV}={spec!r}: the count after @ must be a positive integer")
            self.point = point
            self.at = max(1, int(nth or 1))
        self.armed = self.point is not None

    def due(self, point: str) -> bool:
        """True (once) when ``point`` is reached for the configured n-th time."""
        if point != self.point:
            return False
        self.count += 1
        return self.count == self.at

    def reached(self, point: str) -> None:
        if self.due(point):
            self.exit(point)

    @staticmethod
    def exit(point: str) -> None:
        sys.stderr.write(f"tradingd: crash point {point} reached; exiting with {EXIT_CODE}\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)

    @staticmethod
    def io_error(point: str) -> OSError:
        return OSError(errno.EIO, f"injected I/O error at crash point {point}")


def from_environment() -> CrashPoints:
    try:
        return CrashPoints(os.environ.get(ENV))
    except CrashPointError as exc:
        disarmed = CrashPoints(None)
        disarmed.error = str(exc)
        return disarmed


CRASH = from_environment()
