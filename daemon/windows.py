"""Per-symbol windows of the last W raw feature vectors, in one preallocated float32 [S, W, F].

Each symbol's rows form a ring. Each row is also kept normalised (the manifest's z-score and
clip), twice: at its place in the ring and W rows after it, so that the window that begins at
any head is W consecutive rows, and ``gather`` copies each symbol's window as one block into the
engine's input buffer, with no per-row index arithmetic.

A bar whose features are not all finite is refused, never written: one inf or nan in a window
would poison every batch that symbol joins for the next W minutes.
"""

from __future__ import annotations

import math
from enum import Enum

import msgspec
import numpy as np
import numpy.typing as npt

from engines.features import feature_matrix, feature_row_fn
from engines.manifest import Feature

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class Push(Enum):
    """What ``push`` did with a bar; true only when it was added."""

    ADDED = "added"
    NOT_AFTER_LAST = "not_after_last"  # ts is not after the symbol's last bar
    NON_FINITE = "non_finite"  # a feature of the bar is inf or nan

    def __bool__(self) -> bool:
        return self is Push.ADDED


PUSH_CODES = (Push.ADDED, Push.NOT_AFTER_LAST, Push.NON_FINITE)  # push_many's codes


def _as_rows(a: npt.NDArray[np.float32]) -> npt.NDArray[np.void]:
    """A C-contiguous [n, F] array seen as n items of F floats (a view, no copy)."""
    return a.view(np.dtype((np.void, a.shape[1] * a.itemsize))).reshape(-1)


class FeatureWindows:
    def __init__(self, symbols: tuple[str, ...], window: int, features: tuple[Feature, ...]) -> None:
        n, f = len(symbols), len(features)
        self.symbols = symbols
        self.window = window
        self.index: dict[str, int] = {s: i for i, s in enumerate(symbols)}
        self.buf = np.zeros((n, window, f), dtype=np.float32)
        # The same rows normalised, made once per bar, each at ring place k and k + W: the
        # window beginning at head h (the oldest row) is rows h .. h + W - 1.
        self._norm = np.empty((n, 2 * window, f), dtype=np.float32)
        self._head = np.zeros(n, dtype=np.int64)  # next row to write, per symbol: the oldest
        # Per symbol, as arrays so a whole minute is taken at once (``push_many``).
        self.count = np.zeros(n, dtype=np.int64)  # bars accepted
        self.last_ts = np.full(n, -(1 << 63), dtype=np.int64)
        self.last_close = np.zeros(n, dtype=np.float64)
        self.feature_names = tuple(x.name for x in features)
        self.restored: set[int] = set()  # symbols whose window came from a snapshot, not yet resumed
        self._row = feature_row_fn(self.feature_names)
        self._mean = np.array([x.norm.mean for x in features], dtype=np.float32)
        self._inv_std = np.array([1.0 / x.norm.std for x in features], dtype=np.float32)
        self._clip = np.array([x.norm.clip for x in features], dtype=np.float32)
        # The same as columns, for ``push_many``'s [F, n] features; and the raw rows flat.
        self._mean_col, self._inv_std_col = self._mean[:, None], self._inv_std[:, None]
        self._clip_col, self._low_col = self._clip[:, None], -self._clip[:, None]
        # Each window row as one opaque item: writing whole rows by index is one plain copy each.
        self._raw_rows = _as_rows(self.buf.reshape(n * window, f))
        self._norm_rows = _as_rows(self._norm.reshape(n * 2 * window, f))
        # Every run of W rows (of one item each) as a row of a [.., W] view: a window, by its start.
        self._windows = (
            np.lib.stride_tricks.sliding_window_view(self._norm_rows, window)
            if n
            else np.empty((0, window), dtype=self._norm_rows.dtype)
        )
        self._norm[:] = self._normalised(self.buf[0, 0] if n else np.zeros(f, dtype=np.float32))

    def push(
        self,
        i: int,
        ts: int,
        o: float,
        h: float,
        lo: float,
        c: float,
        v: float,
        prev_close: float | None,
    ) -> Push:
        """Add a bar to symbol ``i``. Nothing changes when ``ts`` is not after its last bar or a
        feature would not be finite (the result says which, and is false)."""
        if ts <= self.last_ts[i]:
            return Push.NOT_AFTER_LAST
        pc = float(self.last_close[i]) if self.count[i] else (prev_close or 0.0)
        row = self._row(o, h, lo, c, v, pc)
        # One inf or nan makes the sum non-finite (and finite features are logs, far below the
        # float32 range), so one test covers the row.
        if not math.isfinite(sum(row)):
            return Push.NON_FINITE
        head = int(self._head[i])
        self.buf[i, head] = row
        self._norm[i, head] = self._norm[i, head + self.window] = self._normalised(self.buf[i, head])
        self._head[i] = (head + 1) % self.window
        self.count[i] += 1
        self.last_ts[i] = ts
        self.last_close[i] = c
        return Push.ADDED

    def push_many(
        self,
        idx: IntArray,
        ts: IntArray,
        o: FloatArray,
        h: FloatArray,
        lo: FloatArray,
        c: FloatArray,
        v: FloatArray,
        prev_close: FloatArray,
    ) -> npt.NDArray[np.uint8]:
        """``push`` over one bar each of distinct symbols ``idx`` (NaN ``prev_close``: none), at
        once; per bar a ``PUSH_CODES`` index: 0 added, else why not (as ``push`` says). The
        features are worked on a feature to a row ([F, n]), where each step is one contiguous
        pass; rows of bars only at the two writes."""
        n = len(idx)
        count = self.count[idx]
        known = count > 0
        pc = self.last_close[idx]
        if not known.all():
            pc = np.where(known, pc, np.where(np.isnan(prev_close), 0.0, prev_close))
        features = feature_matrix(self.feature_names, o, h, lo, c, v, pc)
        codes = np.zeros(n, dtype=np.uint8)
        stale = ts <= self.last_ts[idx]
        # One inf or nan makes the sum non-finite (finite features are logs, far from overflow).
        bad = ~np.isfinite(features.sum(axis=0))
        if stale.any() or bad.any():
            codes[bad] = 2
            codes[stale] = 1  # as ``push``: a bar not after the last is that, whatever its values
            add = codes == 0
            idx, ts, c, count, features = idx[add], ts[add], c[add], count[add], features[:, add]
        raw = features.astype(np.float32)
        norm = (raw - self._mean_col) * self._inv_std_col
        np.maximum(norm, self._low_col, out=norm)  # np.clip, in two cheaper passes
        np.minimum(norm, self._clip_col, out=norm)
        head = self._head[idx]
        w = self.window
        self._raw_rows[idx * w + head] = _as_rows(np.ascontiguousarray(raw.T))
        rows = idx * (2 * w) + head
        normalised = _as_rows(np.ascontiguousarray(norm.T))
        self._norm_rows[rows] = normalised
        self._norm_rows[rows + w] = normalised
        head += 1
        head[head == self.window] = 0
        self._head[idx] = head
        self.count[idx] = count + 1
        self.last_ts[idx] = ts
        self.last_close[idx] = c
        return codes

    def _normalised(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = np.clip((rows - self._mean) * self._inv_std, -self._clip, self._clip)
        return out

    def full(self, i: int) -> bool:
        return bool(self.count[i] >= self.window)

    def reset(self, i: int) -> None:
        """Forget symbol ``i``'s bars: it warms up again from its next bar."""
        self.buf[i] = 0.0
        self._norm[i] = self._normalised(self.buf[i, 0])
        self._head[i] = 0
        self.count[i] = 0
        self.last_ts[i] = -(1 << 63)
        self.last_close[i] = 0.0

    def resume(self, i: int, ts: int, max_gap_ns: int) -> int | None:
        """The first bar of a restored symbol: if its window's last bar is more than ``max_gap_ns``
        older, the window is stale and is reset; returns the gap then, else None. A bar not after
        the window's last (a feed repeating itself on reconnect) decides nothing: the symbol stays
        restored until a newer bar comes."""
        last = int(self.last_ts[i])
        if ts <= last:
            return None
        self.restored.discard(i)
        if self.count[i] and ts - last > max_gap_ns:
            self.reset(i)
            return ts - last
        return None

    def mark_restored(self) -> None:
        """A process boundary in the journal: every symbol with bars is restored again, so the
        replay applies the same gap rule the live process applied at its first bar."""
        self.restored = set(np.flatnonzero(self.count).tolist())

    def gather(self, symbols: IntArray, out: npt.NDArray[np.float32]) -> None:
        """Write the normalised windows of ``symbols`` (oldest bar first) into ``out`` [n, W, F]."""
        n = len(symbols)
        w = self.window
        if not out.flags.c_contiguous or out.dtype != np.float32:
            raise ValueError("gather writes into a C-contiguous float32 [n, W, F] buffer")
        starts = symbols * (2 * w) + self._head[symbols]
        _as_rows(out.reshape(n * w, out.shape[2])).reshape(n, w)[...] = self._windows[starts]

    def window_of(self, i: int) -> npt.NDArray[np.float32]:
        """A normalised copy of one symbol's window (for tools and tests, not the hot path)."""
        out = np.empty((1, self.window, self.buf.shape[2]), dtype=np.float32)
        self.gather(np.array([i], dtype=np.int64), out)
        window: npt.NDArray[np.float32] = out[0]
        return window

    def export(self) -> WindowsState:
        """Everything needed to rebuild the windows exactly (for a snapshot)."""
        return WindowsState(
            list(self.symbols),
            self.window,
            list(self.feature_names),
            self.buf.tobytes(),
            self._head.tobytes(),
            self.count.tolist(),
            self.last_ts.tolist(),
            self.last_close.tolist(),
        )

    def load(self, state: WindowsState) -> list[str]:
        """Take the windows of a snapshot, symbol by symbol (the universe may have changed since);
        returns the symbols of this universe the snapshot has no window for."""
        if state.window != self.window or state.features != list(self.feature_names):
            return list(self.symbols)  # another model's windows: every symbol warms up
        n, f = len(state.symbols), len(self.feature_names)
        buf = np.frombuffer(state.buf, dtype=np.float32).reshape(n, self.window, f)
        head = np.frombuffer(state.head, dtype=np.int64)
        for j, name in enumerate(state.symbols):
            i = self.index.get(name)
            if i is None:
                continue
            self.buf[i] = buf[j]
            self._norm[i] = np.concatenate([self._normalised(buf[j])] * 2)
            self._head[i] = head[j]
            self.count[i] = state.count[j]
            self.last_ts[i] = state.last_ts[j]
            self.last_close[i] = state.last_close[j]
            if self.count[i]:
                self.restored.add(i)
        known = set(state.symbols)
        return [s for s in self.symbols if s not in known]


class WindowsState(msgspec.Struct, frozen=True, array_like=True):
    symbols: list[str]
    window: int
    features: list[str]
    buf: bytes  # float32 [S, W, F]
    head: bytes  # int64 [S]
    count: list[int]
    last_ts: list[int]
    last_close: list[float]
