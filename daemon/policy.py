"""Signal -> order intent: class and confidence become a target position, the difference an order."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from broker.protocol import Side
from daemon.config import SignalConfig

SELL, HOLD, BUY = 0, 1, 2
CLASS_NAMES = ("sell", "hold", "buy")


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


class SignalPolicy:
    def __init__(self, config: SignalConfig) -> None:
        self.config = config

    def target_position(self, cls: int, price: float, current: int) -> int:
        """Buy: long one signal's notional; sell: short it (or flat); hold: keep what is there."""
        c = self.config
        if cls == HOLD:
            return current
        lots = math.floor(c.notional_per_signal / price / c.lot_size)
        size = lots * c.lot_size
        if cls == BUY:
            return size
        return -size if c.allow_short else 0

    def intent(self, cls: int, confidence: float, close: float, exposure: int) -> Intent | None:
        """The order that moves ``exposure`` (position + working) to the signal's target, if any."""
        if cls == HOLD or confidence < self.config.confidence_threshold:
            return None
        delta = self.target_position(cls, close, exposure) - exposure
        if delta == 0:
            return None
        side = Side.BUY if delta > 0 else Side.SELL
        offset = self.config.limit_offset_bps / 10_000.0
        raw = close * (1.0 + offset) if side is Side.BUY else close * (1.0 - offset)
        return Intent(side=side, qty=abs(delta), price=round(raw, 2), target=exposure + delta)
