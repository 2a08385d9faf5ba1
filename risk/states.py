"""Trading states of the market and of each symbol, as an enum with a transition table."""

from __future__ import annotations

from enum import StrEnum


class TradingState(StrEnum):
    ACTIVE = "active"
    REDUCING = "reducing"  # only orders that shrink the position
    HALTED = "halted"


TRANSITIONS: dict[TradingState, frozenset[TradingState]] = {
    TradingState.ACTIVE: frozenset({TradingState.REDUCING, TradingState.HALTED}),
    TradingState.REDUCING: frozenset({TradingState.ACTIVE, TradingState.HALTED}),
    TradingState.HALTED: frozenset({TradingState.ACTIVE, TradingState.REDUCING}),
}


class IllegalStateTransitionError(ValueError):
    def __init__(self, what: str, current: TradingState, target: TradingState) -> None:
        self.what = what
        self.current = current
        self.target = target
        super().__init__(f"{what}: illegal transition {current} -> {target}")


def transition(what: str, current: TradingState, target: TradingState) -> TradingState:
    """The new state, or ``IllegalStateTransitionError`` naming both."""
    if target not in TRANSITIONS[current]:
        raise IllegalStateTransitionError(what, current, target)
    return target
