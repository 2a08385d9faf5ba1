"""Signal -> order intent: class and confidence become a target position, the difference an order.

Sizing is done in float and capped before anything becomes an integer: a target never exceeds
``max_position`` and an order never exceeds ``max_order_qty`` (both rounded down to whole lots),
so no price, however small, can make a quantity the journal, the gates or the wire cannot hold.
A limit price that would round to zero makes no order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from broker.protocol import Side
from broker.records import SIGNALS
from daemon.config import Config, SignalConfig

SELL, HOLD, BUY = 0, 1, 2
CLASS_NAMES = SIGNALS  # the model's classes in its output order, as the journal codes them


def classify(
    logits: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Per row: the argmax class and its softmax probability."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    cls = probs.argmax(axis=1)
    return cls, probs[np.arange(len(cls)), cls]


@dataclass(frozen=True, slots=True)
class Intent:
    side: Side
    qty: int
    price: float
    target: int


# The most any quantity may be when no limit is given (the configuration's bound on max_order_qty
# and max_position): far inside what an int64, a float and msgpack hold exactly.
MAX_QTY = 10**12


class SignalPolicy:
    """``max_order_qty`` and ``max_position`` are the risk limits (``[risk]``) sizing stays within."""

    def __init__(self, config: SignalConfig, *, max_order_qty: int = MAX_QTY, max_position: int = MAX_QTY) -> None:
        self.config = config
        lot = config.lot_size
        self._max_target = min(max_position, MAX_QTY) // lot * lot
        self._max_order = min(max_order_qty, MAX_QTY) // lot * lot

    @property
    def max_target(self) -> int:
        return self._max_target

    @property
    def max_order(self) -> int:
        return self._max_order

    def intents(
        self,
        cls: npt.NDArray[np.int64],
        confidence: npt.NDArray[np.float64],
        close: npt.NDArray[np.float64],
        exposure: npt.NDArray[np.int64],
    ) -> Intents:
        """``intent`` for every row at once (the same orders, exactly)."""
        return _intents(self, cls, confidence, close, exposure)

    @classmethod
    def from_config(cls, config: Config) -> SignalPolicy:
        """The policy of ``[signal]``, sizing within the largest order and position ``[risk]``
        allows any symbol (the gates then hold each symbol to its own limits)."""
        risk = config.risk
        overrides = risk.symbols.values()
        max_order_qty = max([risk.max_order_qty, *(o.max_order_qty for o in overrides if o.max_order_qty)])
        max_position = max([risk.max_position, *(o.max_position for o in overrides if o.max_position)])
        return cls(config.signal, max_order_qty=max_order_qty, max_position=max_position)

    def target_position(self, cls: int, price: float, current: int) -> int:
        """Buy: long one signal's notional; sell: short it (or flat); hold: keep what is there.

        The size is whole lots, at most ``max_position``; a price that is not positive and finite
        asks for no position (flat).
        """
        c = self.config
        if cls == HOLD:
            return current
        shares = c.notional_per_signal / price if 0.0 < price < math.inf else 0.0
        # Capped while still a float, so an absurd (or infinite) size never reaches int().
        size = self._max_target if shares >= self._max_target else math.floor(shares / c.lot_size) * c.lot_size
        if cls == BUY:
            return size
        return -size if c.allow_short else 0

    def intent(self, cls: int, confidence: float, close: float, exposure: int) -> Intent | None:
        """The order that moves ``exposure`` (position + working) toward the signal's target, if any:
        at most ``max_order_qty``, at a limit price of at least one cent."""
        if cls == HOLD or confidence < self.config.confidence_threshold:
            return None
        if not 0.0 < close < math.inf:
            return None
        delta = self.target_position(cls, close, exposure) - exposure
        delta = max(-self._max_order, min(self._max_order, delta))
        if delta == 0:
            return None
        side = Side.BUY if delta > 0 else Side.SELL
        offset = self.config.limit_offset_bps / 10_000.0
        raw = close * (1.0 + offset) if side is Side.BUY else close * (1.0 - offset)
        price = round(raw, 2)
        if price <= 0.0:
            return None
        return Intent(side=side, qty=abs(delta), price=price, target=exposure + delta)


@dataclass(frozen=True, slots=True)
class Intents:
    """``SignalPolicy.intents`` over a batch: the rows that make an order, and each order."""

    rows: npt.NDArray[np.int64]  # positions in the arrays given, in order
    side: npt.NDArray[np.int64]  # +1 buy, -1 sell
    qty: npt.NDArray[np.int64]
    price: npt.NDArray[np.float64]  # limit prices, rounded to the cent as ``round(x, 2)``
    target: npt.NDArray[np.int64]


def _intents(
    policy: SignalPolicy,
    cls: npt.NDArray[np.int64],
    confidence: npt.NDArray[np.float64],
    close: npt.NDArray[np.float64],
    exposure: npt.NDArray[np.int64],
) -> Intents:
    c = policy.config
    with np.errstate(all="ignore"):
        priced = (close > 0.0) & (close < math.inf)
        active = (cls != HOLD) & (confidence >= c.confidence_threshold) & priced
        shares = np.where(priced, c.notional_per_signal / np.where(priced, close, 1.0), 0.0)
        lots = np.floor(shares / c.lot_size) * c.lot_size
        size = np.where(shares >= policy.max_target, policy.max_target, np.where(active, lots, 0.0)).astype(np.int64)
    target = np.where(cls == BUY, size, -size if c.allow_short else 0)
    delta = np.clip(target - exposure, -policy.max_order, policy.max_order)
    rows = np.flatnonzero(active & (delta != 0))
    delta = delta[rows]
    side = np.where(delta > 0, 1, -1)
    offset = c.limit_offset_bps / 10_000.0
    raw = np.where(side > 0, close[rows] * (1.0 + offset), close[rows] * (1.0 - offset))
    rounded = cents(raw)
    keep = rounded > 0.0
    if not keep.all():
        rows, delta, side, rounded = rows[keep], delta[keep], side[keep], rounded[keep]
    return Intents(rows, side, np.abs(delta), rounded, exposure[rows] + delta)


def cents(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``round(v, 2)`` of each value, exactly as Python rounds it. Away from a tie, ``rint(100 v)
    / 100`` is the same double (the division is correctly rounded); where ``100 v`` lies within
    its rounding error of a half cent, Python's ``round`` decides."""
    with np.errstate(all="ignore"):
        scaled = x * 100.0
        out: npt.NDArray[np.float64] = np.rint(scaled) / 100.0
        near = np.abs(scaled - np.floor(scaled) - 0.5) <= np.maximum(np.abs(scaled) * 1e-15, 1e-12)
        near |= ~np.isfinite(scaled) | (np.abs(scaled) >= 2.0**52)
    for k in np.flatnonzero(near).tolist():
        out[k] = round(float(x[k]), 2)
    return out
