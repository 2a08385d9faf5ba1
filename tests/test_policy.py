"""Signal policy: class and confidence to a target position and an order intent."""

from __future__ import annotations

import math

import numpy as np
import pytest

from broker.protocol import Side
from daemon.config import SignalConfig
from daemon.policy import BUY, HOLD, SELL, SignalPolicy, classify


def test_classify_returns_argmax_and_its_softmax_probability() -> None:
    logits = np.array([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 1.0, 3.0]], dtype=np.float32)
    cls, conf = classify(logits)
    assert cls.tolist() == [0, SELL, BUY]
    assert conf[0] == pytest.approx(1 / 3)
    assert conf[2] == pytest.approx(math.exp(3) / (1 + math.e + math.exp(3)))


def test_intent_when_buy_from_flat_buys_whole_lots_of_the_notional_at_last_close() -> None:
    policy = SignalPolicy(SignalConfig(notional_per_signal=10_000.0, lot_size=10, confidence_threshold=0.6))
    intent = policy.intent(BUY, 0.9, close=33.0, exposure=0)
    assert intent is not None
    assert (intent.side, intent.qty, intent.price, intent.target) == (Side.BUY, 300, 33.0, 300)


def test_intent_when_sell_while_long_sells_through_to_short_target() -> None:
    policy = SignalPolicy(SignalConfig(notional_per_signal=1_000.0, limit_offset_bps=10.0))
    intent = policy.intent(SELL, 0.9, close=100.0, exposure=4)
    assert intent is not None
    assert (intent.side, intent.qty, intent.target, intent.price) == (Side.SELL, 14, -10, 99.9)


def test_intent_is_none_for_hold_low_confidence_or_target_already_held() -> None:
    policy = SignalPolicy(SignalConfig(notional_per_signal=1_000.0, confidence_threshold=0.6))
    assert policy.intent(HOLD, 0.99, 100.0, 0) is None
    assert policy.intent(BUY, 0.59, 100.0, 0) is None
    assert policy.intent(BUY, 0.9, 100.0, 10) is None


def test_intent_when_short_not_allowed_sells_only_to_flat() -> None:
    policy = SignalPolicy(SignalConfig(notional_per_signal=1_000.0, allow_short=False))
    assert policy.intent(SELL, 0.9, 100.0, 0) is None
    intent = policy.intent(SELL, 0.9, 100.0, 7)
    assert intent is not None and intent.qty == 7 and intent.target == 0
