"""A minute's bars as columns: the unit of the runtime's vectorised path (``Runtime.on_bars``).

Either feed format ends here: DBN records are decoded straight into these arrays; msgpack v1
bars, decoded one by one, are gathered into them per read. ``codes`` carries what the stateless
checks found, as indices into ``CHECK_REASONS`` (0: nothing yet), with the same rules, in the
same order, as ``check_bar`` and the v1 decoder; the runtime adds what needs its state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from daemon.feed.dbn import CHECK_REASONS
from daemon.feed.protocol import Bar, FeedBounds, RejectReason, bar_values

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

CODE = {reason: k for k, reason in enumerate(CHECK_REASONS) if reason is not None}


@dataclass(frozen=True, slots=True)
class BarColumns:
    """``n`` bars: symbol slot (-1 unknown), close time, OHLCV, previous close (NaN: none)."""

    idx: IntArray
    ts: IntArray
    open: FloatArray
    high: FloatArray
    low: FloatArray
    close: FloatArray
    volume: FloatArray
    prev_close: FloatArray
    codes: npt.NDArray[np.uint8]
    names: Sequence[str]  # each bar's symbol as the feed named it (for logs and unknown symbols)
    seq: IntArray | None = None  # v1 sequence numbers; DBN has none

    def __len__(self) -> int:
        return len(self.idx)

    def bar(self, k: int) -> Bar:
        """Row ``k`` as a v1 bar (the scalar path's fallback)."""
        prev = float(self.prev_close[k])
        return Bar(
            int(self.seq[k]) if self.seq is not None else 0,
            self.names[k],
            int(self.ts[k]),
            float(self.open[k]),
            float(self.high[k]),
            float(self.low[k]),
            float(self.close[k]),
            float(self.volume[k]),
            None if math.isnan(prev) else prev,
        )


def bounds_codes(
    codes: npt.NDArray[np.uint8],
    cols: BarColumns,
    bounds: FeedBounds,
    wall_ns: int,
    feed_ns: int | None,
) -> None:
    """``check_bar``'s rules over the columns, in its order, into ``codes`` where still 0; then an
    unknown symbol. ``feed_ns`` is the feed's minute before these bars (within one minute's bars
    a v1 feed moves it only to their own time, which no rule here can then refuse)."""
    lo, hi = bounds.min_price, bounds.max_price
    prev = cols.prev_close
    with np.errstate(invalid="ignore"):
        prev_out = ~np.isnan(prev) & ~((prev >= lo) & (prev <= hi))
    # The first rule a bar breaks names it: written last rule first, so an earlier one overwrites.
    found = np.zeros(len(cols), dtype=np.uint8)
    found[cols.idx < 0] = CODE[RejectReason.UNKNOWN_SYMBOL]
    if feed_ns is not None:
        found[cols.ts > feed_ns + bounds.max_ahead_ns] = CODE[RejectReason.AHEAD_OF_FEED]
    found[cols.ts > wall_ns + bounds.max_future_ns] = CODE[RejectReason.FUTURE_TS]
    found[cols.volume > bounds.max_volume] = CODE[RejectReason.VOLUME_OUT_OF_RANGE]
    found[(cols.low < lo) | (cols.high > hi) | prev_out] = CODE[RejectReason.PRICE_OUT_OF_RANGE]
    np.copyto(codes, found, where=codes == 0)


def from_bars(
    bars: Sequence[Bar], index: Mapping[str, int], values: npt.NDArray[np.float64] | None = None
) -> BarColumns:
    """Decoded v1 bars as columns (codes all 0: ``bounds_codes`` is the runtime's to apply);
    ``values``: their ``bar_values`` when the decoder made them already."""
    n = len(bars)
    names = [b.symbol for b in bars]
    o, h, lo, c, v, prev = bar_values(bars) if values is None else values
    return BarColumns(
        idx=np.fromiter((index.get(s, -1) for s in names), dtype=np.int64, count=n),
        ts=np.fromiter((b.ts for b in bars), dtype=np.int64, count=n),
        open=o,
        high=h,
        low=lo,
        close=c,
        volume=v,
        prev_close=prev,
        codes=np.zeros(n, dtype=np.uint8),
        names=names,
        seq=np.fromiter((b.seq for b in bars), dtype=np.int64, count=n),
    )
