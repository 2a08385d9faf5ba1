"""Signal policy and the first risk gates: pure functions, denials as values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.protocol import Side
from daemon.config import SignalConfig
from daemon.policy import BUY, HOLD, SELL, SignalPolicy, classify
from risk.gates import DenyReason, Limits, OrderCheck, check_order

LIMITS = Limits(max_order_qty=1000, max_order_notional=50_000.0)


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


@given(qty=st.integers(1, 10_000), price=st.floats(0.01, 10_000))
def test_check_order_denies_exactly_the_orders_over_a_limit(qty: int, price: float) -> None:
    denial = check_order(OrderCheck("A", "buy", qty, price), LIMITS)
    if qty > LIMITS.max_order_qty:
        assert denial is not None and denial.reason is DenyReason.MAX_QUANTITY
    elif qty * price > LIMITS.max_order_notional:
        assert denial is not None and denial.reason is DenyReason.MAX_NOTIONAL
    else:
        assert denial is None


@pytest.mark.parametrize("price", [math.nan, 0.0, -1.0, math.inf])
def test_check_order_fails_closed_when_price_is_unusable(price: float) -> None:
    denial = check_order(OrderCheck("A", "buy", 1, price), LIMITS)
    assert denial is not None and denial.reason is DenyReason.NO_PRICE
