"""The halt rule: a move of ``move_pct`` or more from the reference latches a halt.

The reference is the feed's previous session close, else the session's first open (a session is
a UTC calendar day of bar closes). A halted symbol stays halted until an operator lifts it, or
until ``cooloff_ns`` of feed time has passed, if a cool-off is configured. The benchmark symbol
halting, or ``market_share`` of the universe halting, halts the whole market. ``moved_too_far``
is the pure rule; ``HaltBook`` keeps the latches and says what changed, as events to journal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from risk.errors import UnknownSymbolError
from risk.states import StateMap, TradingState, transition

NS_PER_DAY = 86_400_000_000_000


def moved_too_far(close: float, reference: float, move_pct: float) -> bool:
    """True when ``close`` is ``move_pct`` percent or more away from ``reference``."""
    return abs(close / reference - 1.0) * 100.0 >= move_pct - 1e-9


@dataclass(frozen=True, slots=True)
class HaltRule:
    move_pct: float = 5.0
    benchmark: str | None = None
    market_share: float = 1.0  # share of the universe halted that halts the market (>1: never)
    cooloff_ns: int | None = None  # feed time after which a halt lifts by itself; None: operator only


@dataclass(frozen=True, slots=True)
class HaltEvent:
    action: str  # "halt", "reduce", "lift", or "reference" (a session's first open: the reference without prev_close)
    symbol: str | None  # None: the whole market
    ts: int
    reason: str
    close: float | None = None
    reference: float | None = None


class HaltBook:
    def __init__(self, rule: HaltRule, symbols: tuple[str, ...]) -> None:
        self.rule = rule
        self.symbols = symbols
        self.state = StateMap(symbols)
        self.market = TradingState.ACTIVE
        self.halted_at: dict[str | None, int] = {}
        self._session: dict[str, int] = {}
        self._first_open: dict[str, float] = {}
        self._halted = 0
        # The same two, by symbol slot, so ``on_bars`` finds the few bars a minute that change
        # anything without a dictionary lookup per bar.
        self._slot = {s: i for i, s in enumerate(symbols)}
        self._session_day = np.full(len(symbols), -1, dtype=np.int64)
        self._first_open_px = np.full(len(symbols), np.nan)

    def halted_symbols(self) -> list[str]:
        return [s for s, st in self.state.items() if st is TradingState.HALTED]

    def reference(self, symbol: str, prev_close: float | None) -> float | None:
        return prev_close if prev_close is not None else self._first_open.get(symbol)

    def on_bar(self, symbol: str, ts: int, open_: float, close: float, prev_close: float | None) -> list[HaltEvent]:
        """Apply the rule to one accepted bar; returns the halts and lifts it caused."""
        events: list[HaltEvent] = []
        day = ts // NS_PER_DAY
        if self._session.get(symbol) != day:
            self._note_session(symbol, day, open_)
            # Said as an event so it can be journaled: the reference must survive a restart.
            events.append(HaltEvent("reference", symbol, ts, "session first open", close=open_))
        cooloff = self.rule.cooloff_ns
        if cooloff is not None:
            for key in (symbol, None):
                since = self.halted_at.get(key)
                if since is not None and ts - since >= cooloff:
                    events.append(self._lift(key, ts, "cool-off"))
        reference = self.reference(symbol, prev_close)
        if (
            reference is not None
            and self.state[symbol] is not TradingState.HALTED
            and moved_too_far(close, reference, self.rule.move_pct)
        ):
            move = (close / reference - 1.0) * 100.0
            events.append(self._halt(symbol, ts, f"moved {move:+.2f}% from {reference}", close, reference))
            if self.market is not TradingState.HALTED:
                if symbol == self.rule.benchmark:
                    events.append(self._halt(None, ts, f"benchmark {symbol} halted"))
                elif self._halted >= self.rule.market_share * len(self.symbols):
                    events.append(self._halt(None, ts, f"{self._halted} of {len(self.symbols)} symbols halted"))
        return events

    def on_bars(
        self,
        idx: npt.NDArray[np.int64],
        ts: npt.NDArray[np.int64],
        open_: npt.NDArray[np.float64],
        close: npt.NDArray[np.float64],
        prev_close: npt.NDArray[np.float64],
    ) -> list[HaltEvent]:
        """``on_bar`` for bars of distinct symbol slots ``idx`` (NaN ``prev_close``: none): the
        rule is applied, bar by bar, only to the bars that can change something (a new session,
        a move past the limit, a cool-off running); for the rest it would return nothing."""
        day = ts // NS_PER_DAY
        new_day = self._session_day[idx] != day
        with np.errstate(all="ignore"):
            ref = np.where(np.isnan(prev_close), np.where(new_day, open_, self._first_open_px[idx]), prev_close)
            moved = np.abs(close / ref - 1.0) * 100.0 >= self.rule.move_pct - 1e-9
        if self.rule.cooloff_ns is not None and self.halted_at:
            rows = np.arange(len(idx))
        else:
            rows = np.flatnonzero(new_day | moved)
        events: list[HaltEvent] = []
        for r in rows.tolist():
            prev = float(prev_close[r])
            events += self.on_bar(
                self.symbols[idx[r]], int(ts[r]), float(open_[r]), float(close[r]), None if math.isnan(prev) else prev
            )
        return events

    def _note_session(self, symbol: str, day: int, first_open: float) -> None:
        self._session[symbol] = day
        self._first_open[symbol] = first_open
        i = self._slot.get(symbol)
        if i is not None:
            self._session_day[i] = day
            self._first_open_px[i] = first_open

    def halt(self, symbol: str | None, ts: int, reason: str) -> HaltEvent | None:
        """An operator's halt; None when it was already halted."""
        return self.set_state(symbol, TradingState.HALTED, ts, reason)

    def reduce(self, symbol: str | None, ts: int, reason: str) -> HaltEvent | None:
        """An operator puts a symbol (or the market) in REDUCING: only orders that shrink a position."""
        return self.set_state(symbol, TradingState.REDUCING, ts, reason)

    def resume(self, symbol: str | None, ts: int, reason: str) -> HaltEvent | None:
        """An operator's lift back to ACTIVE; None when it was active already."""
        return self.set_state(symbol, TradingState.ACTIVE, ts, reason)

    def set_state(self, symbol: str | None, target: TradingState, ts: int, reason: str) -> HaltEvent | None:
        if symbol is not None and symbol not in self.state:
            raise UnknownSymbolError(symbol)
        current = self.market if symbol is None else self.state[symbol]
        return None if current is target else self._set(symbol, target, ts, reason)

    def export(self) -> dict[str, object]:
        """The book as plain values (for a snapshot); ``load`` takes it back."""
        return {
            "state": {k: str(v) for k, v in self.state.items()},
            "market": str(self.market),
            "halted_at": {("" if k is None else k): v for k, v in self.halted_at.items()},
            "session": dict(self._session),
            "first_open": dict(self._first_open),
        }

    def load(self, saved: dict[str, object]) -> None:
        state: dict[str, str] = saved["state"]  # type: ignore[assignment]
        for symbol, value in state.items():
            if symbol in self.state:
                self.state[symbol] = TradingState(value)
        self.market = TradingState(str(saved["market"]))
        halted_at: dict[str, int] = saved["halted_at"]  # type: ignore[assignment]
        self.halted_at = {(k or None): v for k, v in halted_at.items() if not k or k in self.state}
        sessions: dict[str, int] = saved["session"]  # type: ignore[assignment]
        first_open: dict[str, float] = saved["first_open"]  # type: ignore[assignment]
        for symbol, day in sessions.items():
            if symbol in self.state and symbol in first_open:
                self._note_session(symbol, day, first_open[symbol])
        self._halted = sum(1 for st in self.state.values() if st is TradingState.HALTED)

    def restore(self, event: HaltEvent) -> None:
        """Re-apply a journaled event at start-up."""
        if event.action == "reference":
            assert event.symbol is not None and event.close is not None
            self._note_session(event.symbol, event.ts // NS_PER_DAY, event.close)
        else:
            self.set_state(event.symbol, _TARGET[event.action], event.ts, event.reason)

    def _halt(
        self, symbol: str | None, ts: int, reason: str, close: float | None = None, ref: float | None = None
    ) -> HaltEvent:
        return self._set(symbol, TradingState.HALTED, ts, reason, close, ref)

    def _lift(self, symbol: str | None, ts: int, reason: str) -> HaltEvent:
        return self._set(symbol, TradingState.ACTIVE, ts, reason)

    def _set(
        self,
        symbol: str | None,
        target: TradingState,
        ts: int,
        reason: str,
        close: float | None = None,
        ref: float | None = None,
    ) -> HaltEvent:
        what = symbol or "market"
        if symbol is None:
            self.market = transition(what, self.market, target)
        else:
            before = self.state[symbol]
            self.state[symbol] = transition(what, before, target)
            self._halted += (target is TradingState.HALTED) - (before is TradingState.HALTED)
        if target is TradingState.HALTED:
            self.halted_at[symbol] = ts
        else:
            self.halted_at.pop(symbol, None)
        return HaltEvent(_ACTION[target], symbol, ts, reason, close, ref)


_ACTION = {TradingState.HALTED: "halt", TradingState.REDUCING: "reduce", TradingState.ACTIVE: "lift"}
_TARGET = {action: state for state, action in _ACTION.items()}
