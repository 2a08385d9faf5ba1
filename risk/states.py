"""Trading states of the market and of each symbol, as an enum with a transition table."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt


class TradingState(StrEnum):
    ACTIVE = "active"
    REDUCING = "reducing"  # only orders that shrink the position
    HALTED = "halted"


# States as small integers, for arrays.
STATE_CODE = {TradingState.ACTIVE: 0, TradingState.REDUCING: 1, TradingState.HALTED: 2}


class StateMap(dict[str, TradingState]):
    """Each symbol's state (every symbol starts active), with ``codes``, the states as
    ``STATE_CODE`` in the symbols' order, kept in step on every change."""

    __slots__ = ("_slot", "codes")

    def __init__(self, symbols: Iterable[str]) -> None:
        super().__init__(dict.fromkeys(symbols, TradingState.ACTIVE))
        self._slot = {s: i for i, s in enumerate(self)}
        self.codes: npt.NDArray[np.int8] = np.zeros(len(self), dtype=np.int8)

    def __setitem__(self, symbol: str, state: TradingState) -> None:
        i = self._slot.get(symbol)
        if i is not None:
            self.codes[i] = STATE_CODE[state]
        super().__setitem__(symbol, state)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a StateMap changes one symbol at a time (state[symbol] = s), so its codes stay right")

    update = setdefault = pop = popitem = clear = __delitem__ = __ior__ = _refuse


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
