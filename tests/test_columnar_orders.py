"""The columnar order path: a batch's orders that pass every gate at once go as one block (one
journal record, one buffer of frames) and become ``Order``s in the book after the write; the
exposure and trading states the batch gates read are arrays kept in step with the dicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import protocol as wire
from broker import records as rec
from broker.bulk import FrameEncoder, NewOrders
from broker.journal import Journal, read_journal, recover_journal
from broker.ledger import Ledger
from broker.orders import OrderBook, OrderState
from daemon.batcher import Batch
from daemon.clock import FakeClock
from daemon.config import Config, RiskConfig, SignalConfig, UniverseConfig
from daemon.desk import OrderDesk
from daemon.risk_engine import RiskEngine
from daemon.stats import Stats
from daemon.windows import FeatureWindows
from engines.chooser import DEFAULT_MODEL
from engines.manifest import load_manifest
from risk.halts import HaltBook, HaltRule
from risk.states import STATE_CODE, TradingState

NS = 1_000_000_000
T = 1_700_000_040 * NS
MANIFEST = load_manifest(DEFAULT_MODEL)
SYMBOLS = (*tuple(f"S{i:02d}" for i in range(40)), "BRK.B", "Z" * 30)


# -- frames -----------------------------------------------------------------------------------


def _frames(data: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    return list(unpacker)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 10**12),
    st.lists(
        st.tuples(
            st.integers(0, len(SYMBOLS) - 1),
            st.booleans(),
            st.integers(1, 2**62),
            st.floats(1e-6, 1e9, allow_nan=False),
        ),
        min_size=1,
        max_size=40,
        unique_by=lambda row: row[0],
    ),
    st.sampled_from(("", "19ab34c1", "x" * 40)),
)
def test_frames_when_encoded_in_one_buffer_decode_to_the_maps_of_one_by_one(
    first: int, rows: list[tuple[int, bool, int, float]], prefix: str
) -> None:
    orders = NewOrders(
        prefix,
        first,
        SYMBOLS,
        np.array([r[0] for r in rows], dtype=np.int64),
        np.array([1 if r[1] else -1 for r in rows], dtype=np.int8),
        np.array([r[2] for r in rows], dtype=np.int64),
        np.array([r[3] for r in rows], dtype=np.float64),
        T,
    )
    frames = sorted(_frames(FrameEncoder(SYMBOLS).encode(orders)), key=lambda f: str(f["cl_ord_id"]))
    one_by_one = sorted(orders.messages(), key=lambda m: m.cl_ord_id)
    assert frames == [wire.encode(m) for m in one_by_one]
    assert [wire.decode(f) for f in frames] == one_by_one


@pytest.mark.parametrize("first", [0, 9_995, 99_999_995, 10**12 - 3, 10**18 - 5])
def test_frames_when_order_numbers_gain_a_digit_mid_batch_spell_every_id(first: int) -> None:
    n = 10
    orders = NewOrders(
        "p",
        first,
        SYMBOLS,
        np.zeros(n, dtype=np.int64),
        np.ones(n, dtype=np.int8),
        np.ones(n, dtype=np.int64),
        np.full(n, 1.5),
        T,
    )
    ids = sorted(str(f["cl_ord_id"]) for f in _frames(FrameEncoder(SYMBOLS).encode(orders)))
    assert ids == sorted(f"p-{first + k}" for k in range(n))


@pytest.mark.parametrize("n", [15, 16, 65535, 65536])
def test_frames_when_the_batch_crosses_a_msgpack_array_size_class_still_come_apart(n: int) -> None:
    universe = tuple(f"U{i}" for i in range(n))
    ones = np.ones(n, dtype=np.int64)
    orders = NewOrders("p", 99_990, universe, np.arange(n, dtype=np.int64), ones.astype(np.int8), ones, ones * 1.5, T)
    frames = _frames(FrameEncoder(universe).encode(orders))
    ids = {f["cl_ord_id"] for f in frames}
    assert len(frames) == n and ids == {f"p-{99_990 + k}" for k in range(n)}
    assert {f["symbol"] for f in frames} == set(universe)


# -- the arrays beside the dicts --------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(("set_pos", "set_open", "pop_pos", "del_open", "replace_pos", "replace_open")),
            st.sampled_from(("A", "B", "C", "OUT")),
            st.integers(-1000, 1000),
        ),
        max_size=40,
    )
)
def test_exposure_totals_when_positions_and_working_change_any_way_equal_the_dict_sums(
    ops: list[tuple[str, str, int]],
) -> None:
    book = OrderBook()
    book.positions["A"] = 7  # held before the index is given
    index = {"A": 0, "B": 1, "C": 2}
    book.index_by(index)
    for op, symbol, qty in ops:
        if op == "set_pos":
            book.positions[symbol] = qty
        elif op == "set_open":
            book.open_qty[symbol] = qty
        elif op == "pop_pos":
            book.positions.pop(symbol, None)
        elif op == "del_open" and symbol in book.open_qty:
            del book.open_qty[symbol]
        elif op == "replace_pos":
            book.positions = {symbol: qty}
        elif op == "replace_open":
            book.open_qty = {symbol: qty}
    assert book.exposure_totals is not None
    assert book.exposure_totals.tolist() == [book.exposure(s) for s in index]
    held_outside = {s for s in ("OUT",) if book.positions.get(s) or book.open_qty.get(s)}
    assert held_outside <= book.positions.outside | book.open_qty.outside


def test_ledger_refuses_bulk_changes_that_would_bypass_its_totals() -> None:
    ledger = Ledger({"A": 1})
    with pytest.raises(TypeError, match="one symbol at a time"):
        ledger.update({"A": 2})
    with pytest.raises(TypeError):
        ledger.setdefault("B", 3)


def test_halt_states_when_changed_keep_their_codes_array_in_step() -> None:
    halts = HaltBook(HaltRule(move_pct=5.0), ("A", "B", "C"))
    halts.halt("B", T, "operator")
    halts.reduce("C", T, "operator")
    assert halts.state.codes.tolist() == [STATE_CODE[halts.state[s]] for s in ("A", "B", "C")] == [0, 2, 1]
    halts.state["B"] = TradingState.ACTIVE
    assert halts.state.codes[1] == 0
    with pytest.raises(TypeError):
        halts.state.update({"A": TradingState.HALTED})


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-500, 500), min_size=len(SYMBOLS), max_size=len(SYMBOLS)),
    st.lists(st.sampled_from((0.0, 12.5, 101.0)), min_size=len(SYMBOLS), max_size=len(SYMBOLS)),
    st.dictionaries(st.sampled_from((*SYMBOLS, "GONE")), st.sampled_from((0.0, 9.0)), max_size=4),
)
def test_gross_from_the_arrays_equals_the_sum_symbol_by_symbol(
    held: list[int], closes: list[float], fill_px: dict[str, float]
) -> None:
    config = Config(universe=UniverseConfig(symbols=SYMBOLS))
    windows = FeatureWindows(SYMBOLS, MANIFEST.window, MANIFEST.features)
    risk = RiskEngine(config, windows, FakeClock())
    book = OrderBook()
    book.index_by(windows.index)
    for i, (qty, close) in enumerate(zip(held, closes, strict=True)):
        if close:
            windows.push(i, T, close, close, close, close, 1.0, None)
        book.positions[SYMBOLS[i]] = qty
    book.positions["GONE"] = 5  # a position outside the universe (a journal from before)
    book.last_fill_px.update(fill_px)
    fast = risk.gross(book)
    slow = risk._gross_of(book, set(book.positions) | set(book.open_qty), 0.0)
    assert (fast.unpriced is None) == (slow.unpriced is None)
    if fast.unpriced is None:
        assert fast.value == pytest.approx(slow.value, rel=1e-12)


# -- a block through the desk -----------------------------------------------------------------


class Broker:
    """The far side of the native gateway: takes frames in one buffer, decoded here, and checks
    that the journal on disk already holds every order it is sent."""

    connected = True

    def __init__(self, journal: Path, *, up: bool = True) -> None:
        self.journal = journal
        self.up = up
        self.sent: list[wire.NewOrder] = []
        self.writes = 0
        self.unjournaled = 0

    def send_new_orders(self, orders: NewOrders) -> bool:
        if not self.up:
            return False
        self.writes += 1
        on_disk = {r["id"] for r in rec.per_order(read_journal(self.journal)) if r["kind"] == "send"}
        for frame in _frames(FrameEncoder(orders.universe).encode(orders)):
            message = wire.decode(frame)
            assert isinstance(message, wire.NewOrder)
            self.unjournaled += message.cl_ord_id not in on_disk
            self.sent.append(message)
        return True

    def send(self, message: Any) -> bool:
        self.sent.append(message)
        return self.up

    def cork(self) -> None:
        pass

    def uncork(self) -> None:
        pass

    async def run(self) -> None:
        pass

    def stop(self) -> None:
        pass


def _desk(tmp_path: Path, name: str = "journal.msgpack") -> tuple[OrderDesk, Journal]:
    config = Config(
        universe=UniverseConfig(symbols=SYMBOLS),
        signal=SignalConfig(confidence_threshold=0.5, notional_per_signal=10_000.0),
        risk=RiskConfig(clock="feed", throttle_orders=10_000, max_gross_exposure=1e12, review_threshold=1e9),
    )
    windows = FeatureWindows(SYMBOLS, MANIFEST.window, MANIFEST.features)
    for i in range(len(SYMBOLS)):
        windows.push(i, T, 100.0, 100.0, 100.0, 100.0, 1.0, None)
    journal = Journal(tmp_path / name, "batch", wall_ns=T)
    desk = OrderDesk(config, windows, FakeClock(mono_ns=1, wall_ns=T), journal, Stats())
    desk.orders.reconciled = True
    desk.risk.feed_now = T
    desk.begin_session()
    return desk, journal


def _signals(desk: OrderDesk) -> None:
    n = len(SYMBOLS)
    batch = Batch(np.arange(n, dtype=np.int64), [1] * n, [T] * n, [100.0] * n, [1] * n)
    desk.on_signals(batch, list(range(n)), [2 if i % 3 else 0 for i in range(n)], [0.9] * n)


def test_a_clean_batch_goes_as_one_block_journaled_before_its_one_write_and_restores(tmp_path: Path) -> None:
    desk, journal = _desk(tmp_path)
    broker = Broker(journal.path)
    desk.gateway = broker  # type: ignore[assignment]
    _signals(desk)
    assert broker.writes == 1 and len(broker.sent) == len(SYMBOLS) and broker.unjournaled == 0
    kinds = [r["kind"] for r in read_journal(journal.path)]
    assert kinds.count("orders") == 1 and "intent" not in kinds and "send" not in kinds
    assert desk.stats.orders_sent == desk.stats.orders_batch_gated == len(SYMBOLS)
    assert {o.symbol for o in desk.book.working.values()} == set(SYMBOLS)
    assert desk.book.exposure_totals is not None
    assert desk.book.exposure_totals.tolist() == [desk.book.exposure(s) for s in SYMBOLS]
    assert desk.stats.tick_to_order.count == len(SYMBOLS)
    journal.close()

    records, _ = recover_journal(journal.path)
    again, _ = _desk(tmp_path, "other.msgpack")
    again.restore(records)
    assert {k: (o.symbol, str(o.state), o.qty, o.price) for k, o in again.book.orders.items()} == {
        k: (o.symbol, str(o.state), o.qty, o.price) for k, o in desk.book.orders.items()
    }
    assert dict(again.book.open_qty) == dict(desk.book.open_qty)
    assert len(again.risk.recent_sends) == len(SYMBOLS)
    # The broker got exactly the orders the journal holds, by id.
    assert sorted(m.cl_ord_id for m in broker.sent) == sorted(desk.book.orders)


def test_a_block_the_gateway_cannot_write_is_closed_as_never_sent_and_stays_closed(tmp_path: Path) -> None:
    desk, journal = _desk(tmp_path)
    desk.gateway = Broker(journal.path, up=False)  # type: ignore[assignment]
    _signals(desk)
    assert desk.stats.orders_sent == 0 and desk.stats.sends_failed == len(SYMBOLS)
    assert not desk.book.working and all(o.state is OrderState.DENIED for o in desk.book.orders.values())
    assert not desk.book.open_qty or not any(desk.book.open_qty.values())
    journal.close()
    records, _ = recover_journal(journal.path)
    assert sum(isinstance(r, rec.Abandoned) for r in records) == len(SYMBOLS)
    again, _ = _desk(tmp_path, "other.msgpack")
    again.restore(records)
    assert not again.book.working  # never looks working after a restart


class OneByOne(Broker):
    """A gateway that writes one message at a time (as FIX does) and drops after ``writes``."""

    def __init__(self, journal: Path, writes: int) -> None:
        super().__init__(journal)
        self.left = writes

    send_new_orders = None  # type: ignore[assignment]

    def send(self, message: Any) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        self.sent.append(message)
        return True


def test_a_block_through_a_one_by_one_gateway_that_drops_part_way_sends_the_first_and_closes_the_rest(
    tmp_path: Path,
) -> None:
    desk, journal = _desk(tmp_path)
    desk.gateway = OneByOne(journal.path, writes=5)  # type: ignore[assignment]
    _signals(desk)
    assert desk.stats.orders_sent == 5 and desk.stats.sends_failed == len(SYMBOLS) - 5
    assert len(desk.book.working) == 5
    sent_ids = [m.cl_ord_id for m in desk.gateway.sent]  # type: ignore[union-attr]
    assert sorted(sent_ids) == sorted(desk.book.working)


def test_the_journal_tool_tells_a_block_order_by_order(tmp_path: Path) -> None:
    desk, journal = _desk(tmp_path)
    desk.gateway = Broker(journal.path)  # type: ignore[assignment]
    _signals(desk)
    journal.close()
    run = [sys.executable, "-m", "daemon", "journal", "inspect", "--path", str(journal.path)]
    every = subprocess.run([*run, "--kind", "orders"], capture_output=True, text=True, timeout=60, check=True)
    shown = [json.loads(line) for line in every.stdout.splitlines()]
    assert sorted(r["symbol"] for r in shown) == sorted(SYMBOLS) and all(r["id"] in desk.book.orders for r in shown)
    sends = subprocess.run([*run, "--kind", "send"], capture_output=True, text=True, timeout=60, check=True)
    assert len(sends.stdout.splitlines()) == len(SYMBOLS)  # a block order is a send too
    one = subprocess.run([*run, "--symbol", "BRK.B"], capture_output=True, text=True, timeout=60, check=True)
    (line,) = [json.loads(x) for x in one.stdout.splitlines() if '"orders"' in x]
    assert line["symbol"] == "BRK.B" and line["side"] in ("buy", "sell") and line["qty"] > 0


def test_orders_written_together_are_in_the_book_for_whatever_reads_it_next(tmp_path: Path) -> None:
    """They are booked as Order objects lazily, but nothing can miss them: a kill switch cancels
    them, a report for one applies, and the exposure array already counted them."""
    desk, journal = _desk(tmp_path)
    broker = Broker(journal.path)
    desk.gateway = broker  # type: ignore[assignment]
    _signals(desk)
    totals = desk.book.exposure_totals
    assert totals is not None and int(np.abs(totals).sum()) > 0  # counted before any booking
    first = broker.sent[0]
    fill = wire.ExecReport(
        first.cl_ord_id, "F1", wire.ExecStatus.FILLED, first.symbol, first.side, first.qty, first.price, first.qty, 0, 0
    )
    desk.on_report(fill)
    assert desk.book.orders[first.cl_ord_id].state is OrderState.FILLED
    assert desk.kill_switch(uid=0) == len(SYMBOLS) - 1  # every other one was working
    assert totals.tolist() == [desk.book.exposure(s) for s in SYMBOLS]
