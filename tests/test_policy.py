"""Signal policy: class and confidence to a target position and an order intent."""

from __future__ import annotations

import math

import numpy as np
import pytest

from broker.protocol import Side
from daemon.config import Config, RiskConfig, SignalConfig, SymbolRiskConfig, UniverseConfig
from daemon.policy import BUY, HOLD, MAX_QTY, SELL, SignalPolicy, classify


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


def test_target_position_when_price_is_tiny_is_capped_at_max_position() -> None:
    """1e-300 used to ask for ~1e304 shares, which no journal or wire can hold."""
    policy = SignalPolicy(SignalConfig(notional_per_signal=10_000.0), max_order_qty=100_000, max_position=1_000_000)
    assert policy.target_position(BUY, 1e-300, 0) == 1_000_000
    assert policy.target_position(SELL, 5e-324, 0) == -1_000_000


def test_target_position_when_notional_is_infinite_is_capped_without_raising() -> None:
    policy = SignalPolicy(SignalConfig(notional_per_signal=math.inf, lot_size=7), max_position=1000)
    assert policy.target_position(BUY, 100.0, 0) == 994  # whole lots of 7 within 1000


def test_intent_when_target_is_past_max_order_qty_orders_at_most_that_in_whole_lots() -> None:
    policy = SignalPolicy(SignalConfig(notional_per_signal=10_000.0, lot_size=30), max_order_qty=1000)
    intent = policy.intent(BUY, 0.9, close=0.05, exposure=0)
    assert intent is not None
    assert (intent.side, intent.qty, intent.price, intent.target) == (Side.BUY, 990, 0.05, 990)
    assert all(isinstance(x, int) for x in (intent.qty, intent.target))


@pytest.mark.parametrize("close", [1e-300, 0.004, 0.0, -1.0, math.nan, math.inf])
def test_intent_when_limit_price_would_not_be_positive_is_none(close: float) -> None:
    """A price that rounds to zero (or is no price) must never become an order."""
    policy = SignalPolicy(SignalConfig(notional_per_signal=10_000.0), max_order_qty=100_000, max_position=1_000_000)
    assert policy.intent(BUY, 0.9, close=close, exposure=0) is None
    assert policy.intent(SELL, 0.9, close=close, exposure=5) is None


def test_intent_without_limits_stays_within_the_largest_configurable_quantity() -> None:
    policy = SignalPolicy(SignalConfig(notional_per_signal=1e12))
    intent = policy.intent(BUY, 0.9, close=0.01, exposure=0)
    assert intent is not None and intent.qty == MAX_QTY


def test_policy_from_config_sizes_within_the_largest_limit_any_symbol_has() -> None:
    config = Config(
        signal=SignalConfig(notional_per_signal=1e9),
        risk=RiskConfig(max_order_qty=1000, max_position=5000, symbols={"SPY": SymbolRiskConfig(max_order_qty=3000)}),
        universe=UniverseConfig(symbols=("SPY", "IBM")),
    )
    policy = SignalPolicy.from_config(config)
    assert policy.target_position(BUY, 10.0, 0) == 5000
    intent = policy.intent(BUY, 0.9, 10.0, 0)
    assert intent is not None and intent.qty == 3000
