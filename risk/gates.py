"""Pre-trade gates: pure functions over frozen values that return a Denial or None.

A denial is data with a reason code, never an exception. ``check_order`` runs gates 1-6 of the
design in order and returns the first denial; ``needs_review`` is gate 7 (park, don't send).
The caller builds a ``RiskView`` — the state the gates need, frozen at the moment of the check —
so the gates themselves hold no state and do no I/O. Cancels never come here: they are never
blocked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from risk.states import TradingState


class DenyReason(StrEnum):
    KILL_SWITCH = "kill_switch"
    MARKET_HALTED = "market_halted"
    SYMBOL_HALTED = "symbol_halted"
    REDUCING_ONLY = "reducing_only"
    STALE_SIGNAL = "stale_signal"
    NO_PRICE = "no_price"
    PRICE_COLLAR = "price_collar"
    MAX_QUANTITY = "max_quantity"
    MAX_NOTIONAL = "max_notional"
    MAX_POSITION = "max_position"
    MAX_GROSS_EXPOSURE = "max_gross_exposure"
    THROTTLE = "throttle"
    DUPLICATE = "duplicate"


@dataclass(frozen=True, slots=True)
class OrderCheck:
    """The order as the gates see it: quantity is unsigned, ``side`` is +1 (buy) or -1 (sell)."""

    symbol: str
    side: int
    qty: int
    price: float
    ts_event: int = 0  # the bar close the signal came from, wall ns

    @property
    def notional(self) -> float:
        return self.qty * self.price


@dataclass(frozen=True, slots=True)
class SymbolLimits:
    max_order_qty: int = 100_000
    max_order_notional: float = 5_000_000.0
    max_position: int = 1_000_000
    collar_pct: float = 5.0  # a limit price this far from the reference is denied


@dataclass(frozen=True, slots=True)
class Limits:
    default: SymbolLimits = SymbolLimits()
    per_symbol: Mapping[str, SymbolLimits] = field(default_factory=dict)
    max_gross_exposure: float = 50_000_000.0
    max_signal_age_ns: int = 90_000_000_000
    max_price_age_ns: int = 180_000_000_000
    throttle_orders: int = 100
    throttle_window_ns: int = 1_000_000_000
    duplicate_window_ns: int = 5_000_000_000
    review_notional: float = 1_000_000.0

    def for_symbol(self, symbol: str) -> SymbolLimits:
        return self.per_symbol.get(symbol, self.default)


@dataclass(frozen=True, slots=True)
class RiskView:
    """What the gates may know of the world at the moment of a check."""

    now_ns: int  # the risk clock (wall time live, feed time in a replay), ns: ages are measured on it
    wall_ns: int = 0  # wall clock, ns: order rates are measured on it
    kill: bool = False
    market: TradingState = TradingState.ACTIVE
    symbol_state: TradingState = TradingState.ACTIVE
    ref_price: float | None = None
    ref_price_ts: int | None = None
    position: int = 0  # signed: filled plus working at the broker
    gross_exposure: float = 0.0  # sum over symbols of |position| x reference price
    unpriced: str | None = None  # a held symbol with no price at all: gross exposure is unknown
    recent_order_ts: tuple[int, ...] = ()  # send times of orders still inside the throttle window
    # How many of them, where the caller has counted already (the risk engine keeps them pruned
    # to the window): the gate then need not walk the tuple for every order of a large batch.
    recent_orders: int | None = None
    last_same_order_ts: int | None = None  # last send of an identical order (symbol, side, qty, price)


@dataclass(frozen=True, slots=True)
class Denial:
    reason: DenyReason
    detail: str


Gate = Callable[[OrderCheck, Limits, RiskView], Denial | None]


def _shrinks(order: OrderCheck, position: int) -> bool:
    after = position + order.side * order.qty
    return abs(after) < abs(position) and after * position >= 0


def kill_switch(order: OrderCheck, limits: Limits, view: RiskView) -> Denial | None:
    if view.kill:
        return Denial(DenyReason.KILL_SWITCH, "the kill switch is on")
    if view.market is TradingState.HALTED:
        return Denial(DenyReason.MARKET_HALTED, "the market is halted")
    if view.market is TradingState.REDUCING and not _shrinks(order, view.position):
        return Denial(DenyReason.REDUCING_ONLY, f"market reducing: {order.symbol} order would not shrink the position")
    return None


def symbol_state(order: OrderCheck, limits: Limits, view: RiskView) -> Denial | None:
    if view.symbol_state is TradingState.HALTED:
        return Denial(DenyReason.SYMBOL_HALTED, f"{order.symbol} is halted")
    if view.symbol_state is TradingState.REDUCING and not _shrinks(order, view.position):
        return Denial(DenyReason.REDUCING_ONLY, f"{order.symbol} reducing: order would not shrink the position")
    return None


def stale_signal(order: OrderCheck, limits: Limits, view: RiskView) -> Denial | None:
    age = view.now_ns - order.ts_event
    if age > limits.max_signal_age_ns:
        return Denial(DenyReason.STALE_SIGNAL, f"{order.symbol}: signal is {age / 1e9:.1f} s old")
    return None


def reference_price(order: OrderCheck, limits: Limits, view: RiskView) -> Denial | None:
    """Fail closed: an order that cannot be valued against a fresh reference is not sent."""
    ref, ts = view.ref_price, view.ref_price_ts
    if ref is None or ts is None or not math.isfinite(ref) or ref <= 0.0:
        return Denial(DenyReason.NO_PRICE, f"{order.symbol}: no reference price")
    if view.now_ns - ts > limits.max_price_age_ns:
        return Denial(DenyReason.NO_PRICE, f"{order.symbol}: reference price is {(view.now_ns - ts) / 1e9:.0f} s old")
    if not math.isfinite(order.price) or order.price <= 0.0:
        return Denial(DenyReason.NO_PRICE, f"{order.symbol}: unusable limit price {order.price}")
    return None


def size_limits(order: OrderCheck, limits: Limits, view: RiskView) -> Denial | None:
    lim = limits.for_symbol(order.symbol)
    ref = view.ref_price or order.price
    if abs(order.price / ref - 1.0) * 100.0 > lim.collar_pct:
        return Denial(
            DenyReason.PRICE_COLLAR, f"{order.symbol}: limit {order.price} is over {lim.collar_pct}% from {ref}"
        )
    if order.qty > lim.max_order_qty:
        return Denial(DenyReason.MAX_QUANTITY, f"{order.symbol}: qty {order.qty} > {lim.max_order_qty}")
    notional = order.qty * ref
    if notional > lim.max_order_notional:
        return Denial(
            DenyReason.MAX_NOTIONAL, f"{order.symbol}: notional {notional:.2f} > {lim.max_order_notional:.2f}"
        )
    after = view.position + order.side * order.qty
    if abs(after) > lim.max_position and abs(after) > abs(view.position):
        return Denial(DenyReason.MAX_POSITION, f"{order.symbol}: position would be {after}, limit {lim.max_position}")
    if view.unpriced is not None and abs(after) > abs(view.position):
        # Fail closed: exposure that cannot be valued is not known to be under the limit.
        return Denial(DenyReason.MAX_GROSS_EXPOSURE, f"gross exposure unknown: no price for {view.unpriced} yet")
    gross_after = view.gross_exposure + (abs(after) - abs(view.position)) * ref
    if gross_after > limits.max_gross_exposure and abs(after) > abs(view.position):
        return Denial(
            DenyReason.MAX_GROSS_EXPOSURE,
            f"gross exposure would be {gross_after:.0f} > {limits.max_gross_exposure:.0f}",
        )
    return None


def rate_limits(order: OrderCheck, limits: Limits, view: RiskView) -> Denial | None:
    window_start = view.wall_ns - limits.throttle_window_ns
    recent = view.recent_orders
    if recent is None:
        recent = sum(1 for ts in view.recent_order_ts if ts > window_start)
    if recent >= limits.throttle_orders:
        return Denial(DenyReason.THROTTLE, f"{recent} orders in the last {limits.throttle_window_ns / 1e9:g} s")
    last = view.last_same_order_ts
    if last is not None and view.wall_ns - last < limits.duplicate_window_ns:
        return Denial(DenyReason.DUPLICATE, f"{order.symbol}: same order sent {(view.wall_ns - last) / 1e9:.2f} s ago")
    return None


# Gates 1-6 of the design, in order: the first denial wins.
GATES: tuple[Gate, ...] = (kill_switch, symbol_state, stale_signal, reference_price, size_limits, rate_limits)


def check_order(order: OrderCheck, limits: Limits, view: RiskView, gates: tuple[Gate, ...] = GATES) -> Denial | None:
    """The first denial of the chain, or None when the order may go (or be parked)."""
    for gate in gates:
        denial = gate(order, limits, view)
        if denial is not None:
            return denial
    return None


def needs_review(order: OrderCheck, limits: Limits, view: RiskView) -> bool:
    """Gate 7: an order whose notional reaches the review threshold is parked for an operator."""
    ref = view.ref_price or order.price
    return order.qty * ref >= limits.review_notional
