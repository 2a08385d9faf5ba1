"""The micro-batcher: which symbols wait for inference, and when their batch is due.

Synchronous and clock-free: the caller passes times in. A batch is due on ``minute_end``, when
``max_batch`` symbols wait, or ``max_delay_ns`` after the first of them started waiting. Each
symbol waits at most once: a newer bar for a waiting symbol supersedes the older (its window
already holds the newer bar), which is counted, so the queue is bounded by the universe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


def _no_times() -> npt.NDArray[np.int64]:
    return np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Batch:
    """The symbols of one inference and, row by row, their bar's read time, close time and close,
    as arrays (sequences given are made arrays)."""

    symbols: npt.NDArray[np.int64]
    ts_recv: npt.NDArray[np.int64]
    ts_event: npt.NDArray[np.int64]
    close: npt.NDArray[np.float64]
    # When each bar was in its window (mono ns); empty when not recorded.
    ts_ready: npt.NDArray[np.int64] = field(default_factory=_no_times)

    def __post_init__(self) -> None:
        for name, dtype in _COLUMNS:
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))

    def __len__(self) -> int:
        return len(self.ts_recv)


_COLUMNS = (
    ("symbols", np.int64),
    ("ts_recv", np.int64),
    ("ts_event", np.int64),
    ("close", np.float64),
    ("ts_ready", np.int64),
)


@dataclass(frozen=True, slots=True)
class BatchTiming:
    """One inferred batch's clock readings (mono ns), handed to the desk with its signals so
    each order's stages can be told apart: feed wait, batch wait, inference, gates, journal,
    send, which add up to its tick-to-order."""

    started_ns: int  # gathered and handed to the inference thread
    back_ns: int  # its result back on the event loop
    engine_ns: int  # the engine's own time for the batch (the GPU time, for the timing engine)
    rows: int
    bucket: int


class Batcher:
    def __init__(self, n_symbols: int, max_batch: int, max_delay_ns: int) -> None:
        self.max_batch = max_batch
        self.max_delay_ns = max_delay_ns
        self._waiting = np.zeros(n_symbols, dtype=bool)
        self._queue: list[int] = []
        self._since: list[int] = []  # when each queued symbol started waiting
        self._ts_recv = np.zeros(n_symbols, dtype=np.int64)
        self._ts_event = np.zeros(n_symbols, dtype=np.int64)
        self._close = np.zeros(n_symbols, dtype=np.float64)
        self._ts_ready = np.zeros(n_symbols, dtype=np.int64)
        self.superseded = 0

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, i: int, ts_recv: int, ts_event: int, close: float, ts_ready: int = 0) -> bool:
        """Queue symbol ``i`` for inference; True when a full batch is now waiting."""
        self._ts_recv[i] = ts_recv
        self._ts_ready[i] = ts_ready
        self._ts_event[i] = ts_event
        self._close[i] = close
        if self._waiting[i]:
            self.superseded += 1
            return False
        self._waiting[i] = True
        self._queue.append(i)
        self._since.append(ts_recv)
        return len(self._queue) >= self.max_batch

    def add_many(
        self,
        idx: npt.NDArray[np.int64],
        ts_recv: int,
        ts_event: npt.NDArray[np.int64],
        close: npt.NDArray[np.float64],
        ts_ready: int,
    ) -> bool:
        """``add`` for distinct symbols ``idx`` read together; True when a full batch now waits."""
        self._ts_recv[idx] = ts_recv
        self._ts_event[idx] = ts_event
        self._close[idx] = close
        self._ts_ready[idx] = ts_ready
        waiting = self._waiting[idx]
        self.superseded += int(waiting.sum())
        new = idx[~waiting]
        self._waiting[new] = True
        self._queue.extend(new.tolist())
        self._since.extend([ts_recv] * len(new))
        return len(new) > 0 and len(self._queue) >= self.max_batch

    def deadline_ns(self) -> int | None:
        """When the oldest waiting symbol's delay runs out, or None if none waits."""
        return self._since[0] + self.max_delay_ns if self._since else None

    def due(self, now_ns: int) -> bool:
        return bool(self._queue) and (
            len(self._queue) >= self.max_batch or now_ns - self._since[0] >= self.max_delay_ns
        )

    def take(self) -> Batch:
        """The oldest ``max_batch`` (or fewer) waiting symbols, which stop waiting."""
        taken = self._queue[: self.max_batch]
        del self._queue[: self.max_batch]
        del self._since[: len(taken)]
        symbols = np.array(taken, dtype=np.int64)
        self._waiting[symbols] = False
        return Batch(
            symbols=symbols,
            ts_recv=self._ts_recv[symbols],
            ts_event=self._ts_event[symbols],
            close=self._close[symbols],
            ts_ready=self._ts_ready[symbols],
        )
