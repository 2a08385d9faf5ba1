"""The pre-trade gates over a whole batch at once: which orders pass every gate, as arrays.

``passes`` answers, for each order of a batch (distinct symbols), whether ``check_order`` would
return no denial and ``needs_review`` would not park it, given the same view, taking the two
running totals of a batch into account in order: gross exposure (each order that goes adds its
change) and the order rate (each order that goes counts against the throttle). It never says
yes where the scalar gates would say no: a caller decides the orders it marks false one by one
with ``check_order``, which gives their denial and its detail exactly. Each rule below is the
negation of the scalar gate's denial test, written the same way, so a NaN compares as there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from risk.gates import Limits
from risk.states import STATE_CODE, TradingState

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

__all__ = ["NO_TIME", "STATE_CODE", "BatchOrders", "BatchView", "exposure_change", "passes", "static_passes"]


@dataclass(frozen=True, slots=True)
class BatchOrders:
    """``n`` orders of distinct symbols: side +1 buy / -1 sell, unsigned quantity."""

    side: IntArray
    qty: IntArray
    price: FloatArray
    ts_event: IntArray


@dataclass(frozen=True, slots=True)
class BatchView:
    """What the gates may know, per order (arrays) and for the batch (scalars). ``ref_price``
    is 0 where the symbol has no price (the scalar view's None); ``ref_price_ts`` is then
    meaningless. ``last_same_ts`` holds ``NO_TIME`` where no identical order was sent."""

    now_ns: int
    wall_ns: int
    kill: bool
    market: TradingState
    symbol_state: npt.NDArray[np.int8]
    ref_price: FloatArray
    ref_price_ts: IntArray
    position: IntArray
    gross_exposure: float
    unpriced: bool
    recent_orders: int
    last_same_ts: IntArray
    review_pending: BoolArray
    max_order_qty: IntArray
    max_order_notional: FloatArray
    max_position: IntArray
    collar_pct: FloatArray


NO_TIME = np.iinfo(np.int64).min


def _shrinks(orders: BatchOrders, position: IntArray) -> BoolArray:
    after = position + orders.side * orders.qty
    return (np.abs(after) < np.abs(position)) & (after * position >= 0)


def static_passes(orders: BatchOrders, limits: Limits, view: BatchView) -> BoolArray:
    """Gates 1-6 and review, but for the two running totals: True where none would deny or park."""
    n = len(orders.qty)
    if view.kill or view.market is TradingState.HALTED:
        return np.zeros(n, dtype=bool)
    ok = np.ones(n, dtype=bool)
    shrinks = _shrinks(orders, view.position)
    if view.market is TradingState.REDUCING:
        ok &= shrinks
    state = view.symbol_state
    ok &= (state != 2) & ((state != 1) | shrinks)
    ok &= ~(view.now_ns - orders.ts_event > limits.max_signal_age_ns)
    ref, price = view.ref_price, orders.price
    with np.errstate(all="ignore"):
        ok &= np.isfinite(ref) & (ref > 0.0)
        ok &= ~(view.now_ns - view.ref_price_ts > limits.max_price_age_ns)
        ok &= np.isfinite(price) & (price > 0.0)
        ref_or_price = np.where(ref != 0.0, ref, price)  # ``view.ref_price or order.price``
        ok &= ~(np.abs(price / ref_or_price - 1.0) * 100.0 > view.collar_pct)
        ok &= ~(orders.qty > view.max_order_qty)
        notional = orders.qty * ref_or_price
        ok &= ~(notional > view.max_order_notional)
        after = view.position + orders.side * orders.qty
        grows = np.abs(after) > np.abs(view.position)
        ok &= ~((np.abs(after) > view.max_position) & grows)
        if view.unpriced:
            ok &= ~grows
        ok &= ~((view.last_same_ts != NO_TIME) & (view.wall_ns - view.last_same_ts < limits.duplicate_window_ns))
        ok &= ~view.review_pending
        ok &= ~(notional >= limits.review_notional)  # needs_review parks it
    return ok


def exposure_change(orders: BatchOrders, view: BatchView) -> FloatArray:
    """What each order adds to gross exposure if it goes (``RiskEngine.exposure_change``)."""
    ref = np.where(view.ref_price != 0.0, view.ref_price, orders.price)
    after = view.position + orders.side * orders.qty
    return (np.abs(after) - np.abs(view.position)) * ref


def passes(orders: BatchOrders, limits: Limits, view: BatchView) -> tuple[BoolArray, BoolArray, int]:
    """(go, static, stop). ``go``: the order goes, as the scalar gates applied in order with the
    batch's running totals would decide. ``static``: it breaks none of the gates but the running
    totals (an order with ``static`` False is denied or parked, and changes neither total).
    ``stop``: the first order a running total would stop; from there on nothing is marked to go,
    and the caller decides each order one by one, keeping the totals itself."""
    static = static_passes(orders, limits, view)
    change = np.where(static, exposure_change(orders, view), 0.0)
    gross_before = view.gross_exposure + np.concatenate(([0.0], np.cumsum(change)[:-1]))
    sent_before = view.recent_orders + np.concatenate(([0], np.cumsum(static)[:-1]))
    after = view.position + orders.side * orders.qty
    grows = np.abs(after) > np.abs(view.position)
    ref = np.where(view.ref_price != 0.0, view.ref_price, orders.price)
    with np.errstate(all="ignore"):
        gross_after = gross_before + (np.abs(after) - np.abs(view.position)) * ref
        stopped = static & (
            ((gross_after > limits.max_gross_exposure) & grows) | (sent_before >= limits.throttle_orders)
        )
    stop = int(np.argmax(stopped)) if stopped.any() else len(static)
    go = static.copy()
    go[stop:] = False
    return go, static, stop
