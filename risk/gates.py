"""Pre-trade gates: pure functions over frozen values that return a Denial or None.

A denial is data with a reason code, never an exception. ``check_order`` runs the chain in
order and returns the first denial. This is the start of the chain of the design; the full set
(trading states, staleness, reference price, collars, throttles, review) builds on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class DenyReason(StrEnum):
    NO_PRICE = "no_price"
    MAX_QUANTITY = "max_quantity"
    MAX_NOTIONAL = "max_notional"


@dataclass(frozen=True, slots=True)
class OrderCheck:
    """The order as the gates see it: quantity is unsigned, side is separate."""

    symbol: str
    side: str
    qty: int
    price: float

    @property
    def notional(self) -> float:
        return self.qty * self.price


@dataclass(frozen=True, slots=True)
class Limits:
    max_order_qty: int
    max_order_notional: float


@dataclass(frozen=True, slots=True)
class Denial:
    reason: DenyReason
    detail: str


Gate = Callable[[OrderCheck, Limits], Denial | None]


def price_known(order: OrderCheck, limits: Limits) -> Denial | None:
    """Fail closed: an order that cannot be valued is not sent."""
    if not math.isfinite(order.price) or order.price <= 0.0:
        return Denial(DenyReason.NO_PRICE, f"{order.symbol}: no usable price ({order.price})")
    return None


def max_quantity(order: OrderCheck, limits: Limits) -> Denial | None:
    if order.qty > limits.max_order_qty:
        return Denial(DenyReason.MAX_QUANTITY, f"{order.symbol}: qty {order.qty} > {limits.max_order_qty}")
    return None


def max_notional(order: OrderCheck, limits: Limits) -> Denial | None:
    if order.notional > limits.max_order_notional:
        return Denial(
            DenyReason.MAX_NOTIONAL,
            f"{order.symbol}: notional {order.notional:.2f} > {limits.max_order_notional:.2f}",
        )
    return None


GATES: tuple[Gate, ...] = (price_known, max_quantity, max_notional)


def check_order(order: OrderCheck, limits: Limits, gates: tuple[Gate, ...] = GATES) -> Denial | None:
    """The first denial of the chain, or None when the order may go."""
    for gate in gates:
        denial = gate(order, limits)
        if denial is not None:
            return denial
    return None
