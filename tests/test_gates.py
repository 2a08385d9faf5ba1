"""Pre-trade gates: each gate's rule as a property, and which reason wins when several apply."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from risk.gates import (
    DenyReason,
    Limits,
    OrderCheck,
    RiskView,
    SymbolLimits,
    check_order,
    kill_switch,
    needs_review,
    rate_limits,
    reference_price,
    size_limits,
    stale_signal,
    symbol_state,
)
from risk.states import TradingState

NOW = 1_700_000_000_000_000_000
S = 1_000_000_000
LIMITS = Limits(
    default=SymbolLimits(max_order_qty=1000, max_order_notional=50_000.0, max_position=2000, collar_pct=5.0),
    per_symbol={"BIG": SymbolLimits(max_order_qty=10, max_order_notional=1e9, max_position=10, collar_pct=1.0)},
    max_gross_exposure=100_000.0,
    max_signal_age_ns=60 * S,
    max_price_age_ns=120 * S,
    throttle_orders=3,
    throttle_window_ns=S,
    duplicate_window_ns=5 * S,
    review_notional=20_000.0,
)


def _order(qty: int = 10, price: float = 100.0, side: int = 1, symbol: str = "A", age_s: float = 1.0) -> OrderCheck:
    return OrderCheck(symbol, side, qty, price, NOW - int(age_s * S))


def _view(**kw: object) -> RiskView:
    base: dict[str, object] = {"now_ns": NOW, "wall_ns": NOW, "ref_price": 100.0, "ref_price_ts": NOW - S}
    base.update(kw)
    return RiskView(**base)  # type: ignore[arg-type]


def _reason(order: OrderCheck, view: RiskView) -> DenyReason | None:
    denial = check_order(order, LIMITS, view)
    return None if denial is None else denial.reason


def test_a_plain_order_within_every_limit_passes() -> None:
    assert check_order(_order(), LIMITS, _view()) is None


@given(
    kill=st.booleans(),
    market=st.sampled_from(TradingState),
    position=st.integers(-50, 50),
    side=st.sampled_from([1, -1]),
    qty=st.integers(1, 100),
)
def test_kill_switch_and_market_state_gate(
    kill: bool, market: TradingState, position: int, side: int, qty: int
) -> None:
    denial = kill_switch(_order(qty=qty, side=side), LIMITS, _view(kill=kill, market=market, position=position))
    after = position + side * qty
    shrinks = abs(after) < abs(position) and after * position >= 0
    if kill:
        assert denial is not None and denial.reason is DenyReason.KILL_SWITCH
    elif market is TradingState.HALTED:
        assert denial is not None and denial.reason is DenyReason.MARKET_HALTED
    elif market is TradingState.REDUCING and not shrinks:
        assert denial is not None and denial.reason is DenyReason.REDUCING_ONLY
    else:
        assert denial is None


@given(
    state=st.sampled_from(TradingState),
    position=st.integers(-50, 50),
    side=st.sampled_from([1, -1]),
    qty=st.integers(1, 100),
)
def test_symbol_state_gate_lets_reducing_orders_shrink_only(
    state: TradingState, position: int, side: int, qty: int
) -> None:
    denial = symbol_state(_order(qty=qty, side=side), LIMITS, _view(symbol_state=state, position=position))
    after = position + side * qty
    if state is TradingState.HALTED:
        assert denial is not None and denial.reason is DenyReason.SYMBOL_HALTED
    elif state is TradingState.REDUCING:
        assert (denial is None) == (abs(after) < abs(position) and after * position >= 0)
    else:
        assert denial is None


@given(age_s=st.floats(0, 600))
def test_stale_signal_gate(age_s: float) -> None:
    denial = stale_signal(_order(age_s=age_s), LIMITS, _view())
    assert (denial is not None) == (int(age_s * S) > LIMITS.max_signal_age_ns)


@given(
    ref=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    ref_age_s=st.none() | st.floats(0, 600),
    price=st.floats(allow_nan=True, allow_infinity=True),
)
def test_reference_price_gate_fails_closed(ref: float | None, ref_age_s: float | None, price: float) -> None:
    ts = None if ref_age_s is None else NOW - int(ref_age_s * S)
    denial = reference_price(_order(price=price), LIMITS, _view(ref_price=ref, ref_price_ts=ts))
    usable = (
        ref is not None
        and ts is not None
        and math.isfinite(ref)
        and ref > 0
        and NOW - ts <= LIMITS.max_price_age_ns
        and math.isfinite(price)
        and price > 0
    )
    assert (denial is None) == usable
    if denial is not None:
        assert denial.reason is DenyReason.NO_PRICE


@given(
    qty=st.integers(1, 3000),
    price=st.floats(90, 110),
    position=st.integers(-2500, 2500),
    side=st.sampled_from([1, -1]),
    gross=st.floats(0, 150_000),
)
def test_size_gates_deny_exactly_the_orders_over_a_limit(
    qty: int, price: float, position: int, side: int, gross: float
) -> None:
    denial = size_limits(
        _order(qty=qty, price=price, side=side), LIMITS, _view(position=position, gross_exposure=gross)
    )
    lim = LIMITS.default
    after = position + side * qty
    grows = abs(after) > abs(position)
    expected = (
        DenyReason.PRICE_COLLAR
        if abs(price / 100.0 - 1) * 100 > lim.collar_pct
        else DenyReason.MAX_QUANTITY
        if qty > lim.max_order_qty
        else DenyReason.MAX_NOTIONAL
        if qty * 100.0 > lim.max_order_notional
        else DenyReason.MAX_POSITION
        if grows and abs(after) > lim.max_position
        else DenyReason.MAX_GROSS_EXPOSURE
        if grows and gross + (abs(after) - abs(position)) * 100.0 > LIMITS.max_gross_exposure
        else None
    )
    assert (None if denial is None else denial.reason) == expected


def test_size_gates_use_per_symbol_limits() -> None:
    assert _reason(_order(qty=11, symbol="BIG"), _view()) is DenyReason.MAX_QUANTITY
    assert _reason(_order(qty=5, price=101.5, symbol="BIG"), _view()) is DenyReason.PRICE_COLLAR
    assert _reason(_order(qty=11), _view()) is None


@given(sends=st.lists(st.floats(0, 3), max_size=6), same_ago_s=st.none() | st.floats(0, 10))
def test_throttle_and_duplicate_window(sends: list[float], same_ago_s: float | None) -> None:
    recent = tuple(NOW - int(a * S) for a in sends)
    last_same = None if same_ago_s is None else NOW - int(same_ago_s * S)
    denial = rate_limits(_order(), LIMITS, _view(recent_order_ts=recent, last_same_order_ts=last_same))
    in_window = sum(1 for ts in recent if ts > NOW - LIMITS.throttle_window_ns)
    if in_window >= LIMITS.throttle_orders:
        assert denial is not None and denial.reason is DenyReason.THROTTLE
    elif last_same is not None and NOW - last_same < LIMITS.duplicate_window_ns:
        assert denial is not None and denial.reason is DenyReason.DUPLICATE
    else:
        assert denial is None


@given(qty=st.integers(1, 1000), ref=st.floats(1, 1000))
def test_review_gate_parks_at_or_over_the_threshold(qty: int, ref: float) -> None:
    assert needs_review(_order(qty=qty, price=ref), LIMITS, _view(ref_price=ref)) == (
        qty * ref >= LIMITS.review_notional
    )


# Every condition below is true at once in the first row; each later row removes the winner
# of the row before, so the table is the gate order of the design.
ALL_BAD = {
    "kill": True,
    "market": TradingState.HALTED,
    "symbol_state": TradingState.HALTED,
    "ref_price": None,
    "recent_order_ts": (NOW, NOW, NOW),
    "position": 1990,
}
GATE_ORDER = [
    ({}, DenyReason.KILL_SWITCH),
    ({"kill": False}, DenyReason.MARKET_HALTED),
    ({"kill": False, "market": TradingState.ACTIVE}, DenyReason.SYMBOL_HALTED),
    ({"kill": False, "market": TradingState.ACTIVE, "symbol_state": TradingState.ACTIVE}, DenyReason.STALE_SIGNAL),
    (
        {"kill": False, "market": TradingState.ACTIVE, "symbol_state": TradingState.ACTIVE, "age": 1},
        DenyReason.NO_PRICE,
    ),
    (
        {
            "kill": False,
            "market": TradingState.ACTIVE,
            "symbol_state": TradingState.ACTIVE,
            "age": 1,
            "ref_price": 100.0,
        },
        DenyReason.MAX_QUANTITY,
    ),
    (
        {
            "kill": False,
            "market": TradingState.ACTIVE,
            "symbol_state": TradingState.ACTIVE,
            "age": 1,
            "ref_price": 100.0,
            "qty": 20,
        },
        DenyReason.MAX_POSITION,
    ),
    (
        {
            "kill": False,
            "market": TradingState.ACTIVE,
            "symbol_state": TradingState.ACTIVE,
            "age": 1,
            "ref_price": 100.0,
            "qty": 20,
            "position": 0,
        },
        DenyReason.THROTTLE,
    ),
    (
        {
            "kill": False,
            "market": TradingState.ACTIVE,
            "symbol_state": TradingState.ACTIVE,
            "age": 1,
            "ref_price": 100.0,
            "qty": 20,
            "position": 0,
            "recent_order_ts": (),
        },
        None,
    ),
]


@pytest.mark.parametrize(("changes", "winner"), GATE_ORDER)
def test_gate_order_first_applicable_reason_wins(changes: dict[str, object], winner: DenyReason | None) -> None:
    fields = {**ALL_BAD, **changes}
    age = float(fields.pop("age", 3600))  # type: ignore[arg-type]
    qty = int(fields.pop("qty", 5000))  # type: ignore[call-overload]
    assert _reason(_order(qty=qty, age_s=age), _view(**fields)) is winner
