"""The journal's records: a msgspec tagged union (the tag is ``kind``) with a format version.

Every record the daemon persists is one of these frozen structs, written and read in
``broker.journal`` only. Restore matches on the types, never on strings. Applying a record twice
changes nothing: orders are keyed by their client id and fills by ExecID and ``cum_qty``.

The first record of every journal file is a ``Header`` naming the format; a reader refuses a
format it does not know instead of guessing at it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import msgspec
import numpy as np

FORMAT = 3  # 3 added ``orders`` (a batch's intents and sends in one record)
READS = frozenset({2, 3})  # formats this build reads: 2 is 3 without ``orders``


class _Record(msgspec.Struct, frozen=True, tag_field="kind", kw_only=True, omit_defaults=False):
    ts: int  # wall-clock ns when the record was written


class Header(_Record, frozen=True, tag="header"):
    format: int
    created_by: str = "tradingd"
    segment: int = 1  # journal segments are numbered from 1; a snapshot covers segments up to its number


class Start(_Record, frozen=True, tag="start"):
    session: int
    after_fail_stop: bool = False


class Intent(_Record, frozen=True, tag="intent"):
    id: str
    symbol: str
    side: str
    qty: int
    price: float
    ts_event: int
    signal: str = ""
    confidence: float = 0.0


class Denied(_Record, frozen=True, tag="denied"):
    id: str
    reason: str
    detail: str = ""


class Abandoned(_Record, frozen=True, tag="abandoned"):
    """An intent closed without a decision, or a send that never reached the broker."""

    id: str
    detail: str = ""


class Parked(_Record, frozen=True, tag="parked"):
    id: str
    expires_at: int
    notional: float


class Review(_Record, frozen=True, tag="review"):
    id: str
    action: str  # approved | rejected | expired
    uid: int | None = None
    reason: str = ""


class Send(_Record, frozen=True, tag="send"):
    """The order is about to be written to the broker (journaled and synced before the write)."""

    id: str


class Orders(_Record, frozen=True, tag="orders"):
    """A batch's orders that passed every gate at once: each one's intent and its send, column
    by column (little-endian arrays), journaled and synced before any of them is written. Order
    k's client id is ``f"{prefix}-{first + k}"``; restore reads it as an ``Intent`` then a
    ``Send`` per order (``order_rows`` gives tools the same rows)."""

    prefix: str
    first: int
    symbols: list[str]
    side: bytes  # int8: +1 buy, -1 sell
    qty: bytes  # int64
    price: bytes  # float64
    ts_event: bytes  # int64
    signal: bytes  # int8: the class, an index of SIGNALS
    confidence: bytes  # float64, rounded to 4 places


SIGNALS = ("sell", "hold", "buy")  # ``Orders.signal`` codes: the model's classes, in its output order


def order_rows(r: Orders | dict[str, Any]) -> list[dict[str, Any]]:
    """An ``Orders`` record (typed, or a plain map from ``read_journal``) as one map per order,
    with the fields of an ``Intent``."""
    fields: dict[str, Any] = r if isinstance(r, dict) else msgspec.structs.asdict(r)
    get = fields.__getitem__
    prefix, first, symbols = get("prefix"), get("first"), get("symbols")
    side = np.frombuffer(get("side"), dtype=np.int8).tolist()
    qty = np.frombuffer(get("qty"), dtype="<i8").tolist()
    price = np.frombuffer(get("price"), dtype="<f8").tolist()
    ts_event = np.frombuffer(get("ts_event"), dtype="<i8").tolist()
    signal = np.frombuffer(get("signal"), dtype=np.int8).tolist()
    confidence = np.frombuffer(get("confidence"), dtype="<f8").tolist()
    return [
        {
            "id": f"{prefix}-{first + k}",
            "symbol": symbols[k],
            "side": "buy" if side[k] > 0 else "sell",
            "qty": qty[k],
            "price": price[k],
            "ts_event": ts_event[k],
            "signal": SIGNALS[signal[k]],
            "confidence": confidence[k],
        }
        for k in range(len(symbols))
    ]


def per_order(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Journal maps (``read_journal``) with each ``orders`` record told order by order, as the
    ``intent`` and ``send`` records it stands for (for tools that follow orders one by one)."""
    for r in records:
        if r.get("kind") != "orders":
            yield r
            continue
        for row in order_rows(r):
            yield {"kind": "intent", "ts": r["ts"], **row}
            yield {"kind": "send", "ts": r["ts"], "id": row["id"]}


class Report(_Record, frozen=True, tag="report"):
    """An execution report that was applied (or a reconciliation's word, with a synthetic ExecID)."""

    id: str
    exec_id: str
    status: str
    last_qty: int
    last_px: float
    cum_qty: int
    text: str = ""


class Cancel(_Record, frozen=True, tag="cancel"):
    """A cancel request, journaled and synced before it is written; ``cancel_id`` is unique."""

    id: str
    cancel_id: str


class _TradingStateChange(_Record, frozen=True):
    symbol: str | None  # None: the whole market
    reason: str
    ts_event: int
    close: float | None = None


class ReferenceRecord(_TradingStateChange, frozen=True, tag="reference"):
    """A session's first open, the halt rule's reference where the feed sends no previous close."""


class _HaltChange(_TradingStateChange, frozen=True):
    reference: float | None = None
    uid: int | None = None  # the operator's, or None for the rule


class HaltRecord(_HaltChange, frozen=True, tag="halt"):
    pass


class ReduceRecord(_HaltChange, frozen=True, tag="reduce"):
    pass


class LiftRecord(_HaltChange, frozen=True, tag="lift"):
    pass


class Kill(_Record, frozen=True, tag="kill"):
    on: bool
    uid: int | None = None
    reason: str = ""
    # Tripped by the daemon itself on a fault it could not reason about (fail-stop). A restart
    # begins with it lifted: the journal replay is what makes the new process trustworthy.
    automatic: bool = False


class Failover(_Record, frozen=True, tag="failover"):
    from_engine: str = msgspec.field(name="from")
    to: str
    reason: str
    detail: str = ""
    rerun: bool = False
    rows: int = 0
    uid: int | None = None
    rerun_failed: bool = False


class Reconcile(_Record, frozen=True, tag="reconcile"):
    differences: list[str]
    positions: dict[str, int] | None = None


class Operator(_Record, frozen=True, tag="operator"):
    uid: int
    command: str
    args: dict[str, Any] = {}
    refused: bool = False  # the uid is not one of ``admin.operators``


class Bars(_Record, frozen=True, tag="bars"):
    """Bars accepted since the last such record, column by column (little-endian arrays), so a
    restart rebuilds the feature windows from the last snapshot plus these."""

    symbols: list[str]
    bar_ts: bytes  # int64 bar close, ns
    ohlcv: bytes  # float64 [n, 5]
    prev_close: bytes  # float64, NaN where the feed sent none


class BadReport(_Record, frozen=True, tag="bad_report"):
    """An execution report that was not applied because it contradicts what is known."""

    id: str
    exec_id: str
    problem: str


Record = (
    Header
    | Start
    | Intent
    | Denied
    | Abandoned
    | Parked
    | Review
    | Send
    | Orders
    | Report
    | Cancel
    | HaltRecord
    | ReduceRecord
    | LiftRecord
    | ReferenceRecord
    | Kill
    | Failover
    | Reconcile
    | Operator
    | BadReport
    | Bars
)

HALT_RECORDS = {"halt": HaltRecord, "reduce": ReduceRecord, "lift": LiftRecord, "reference": ReferenceRecord}
