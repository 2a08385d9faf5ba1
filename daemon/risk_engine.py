"""The risk engine: the state the pre-trade gates read, and the decision for one order.

It owns the kill switch, the trading states (``risk.halts``), the manual-review queue, the order
rate and duplicate memory and the risk clock; it builds the frozen ``RiskView`` and runs the pure
gates of ``risk.gates`` over it. It does no I/O: the desk journals what it decides.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from broker import protocol as wire
from broker.orders import Order, OrderBook
from daemon.clock import Clock
from daemon.config import Config, RiskConfig
from daemon.windows import FeatureWindows
from risk import batch_gates as bg
from risk.gates import Limits, OrderCheck, RiskView, SymbolLimits, check_order, needs_review
from risk.halts import HaltBook, HaltEvent, HaltRule
from risk.review import Parked, ReviewQueue

NS = 1_000_000_000


def limits_from_config(risk: RiskConfig) -> Limits:
    default = SymbolLimits(risk.max_order_qty, risk.max_order_notional, risk.max_position, risk.collar_pct)
    per_symbol = {
        symbol: SymbolLimits(
            o.max_order_qty or default.max_order_qty,
            o.max_order_notional or default.max_order_notional,
            o.max_position or default.max_position,
            o.collar_pct or default.collar_pct,
        )
        for symbol, o in risk.symbols.items()
    }
    return Limits(
        default=default,
        per_symbol=per_symbol,
        max_gross_exposure=risk.max_gross_exposure,
        max_signal_age_ns=int(risk.max_signal_age_s * NS),
        max_price_age_ns=int(risk.max_price_age_s * NS),
        throttle_orders=risk.throttle_orders,
        throttle_window_ns=risk.throttle_window_ms * 1_000_000,
        duplicate_window_ns=risk.duplicate_window_ms * 1_000_000,
        review_notional=risk.review_threshold,
    )


def sign(side: wire.Side) -> int:
    return 1 if side is wire.Side.BUY else -1


@dataclass(frozen=True, slots=True)
class Gross:
    """Gross exposure at reference prices; ``unpriced`` names a held symbol with no price at all
    (after a restart, before its first bar): then the exposure is unknown and the gate fails closed."""

    value: float
    unpriced: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The gates' answer for one order: a denial reason (with detail), park, or send."""

    reason: str | None
    detail: str = ""
    park: bool = False
    notional: float = 0.0


class RiskEngine:
    def __init__(self, config: Config, windows: FeatureWindows, clock: Clock) -> None:
        self.config = config
        self.windows = windows
        self.clock = clock
        self.limits = limits_from_config(config.risk)
        halt = config.risk.halt
        self.halts = HaltBook(
            HaltRule(
                halt.move_pct, halt.benchmark, halt.market_share, int(halt.cooloff_s * NS) if halt.cooloff_s else None
            ),
            windows.symbols,
        )
        self.reviews = ReviewQueue()
        self.kill = False
        self.feed_now = 0
        self.recent_sends: deque[int] = deque()
        self._last_same: dict[tuple[str, str, int, float], int] = {}
        self._feed_clock = config.risk.clock == "feed"

    def now(self) -> int:
        """The risk clock: feed time in a replay (``risk.clock = "feed"``), else wall time."""
        return self.feed_now if self._feed_clock else self.clock.wall_ns()

    def on_bar(self, symbol: str, ts: int, open_: float, close: float, prev_close: float | None) -> list[HaltEvent]:
        self.feed_now = max(self.feed_now, ts)
        return self.halts.on_bar(symbol, ts, open_, close, prev_close)

    def on_bars(
        self,
        idx: npt.NDArray[np.int64],
        ts: npt.NDArray[np.int64],
        open_: npt.NDArray[np.float64],
        close: npt.NDArray[np.float64],
        prev_close: npt.NDArray[np.float64],
    ) -> list[HaltEvent]:
        self.feed_now = max(self.feed_now, int(ts.max()))
        return self.halts.on_bars(idx, ts, open_, close, prev_close)

    def gross(self, book: OrderBook) -> Gross:
        """Sum of |position + working| at the last close, or the last fill price where no bar has
        arrived since a restart; a held symbol with neither makes the exposure unknown."""
        totals = book.exposure_totals
        if totals is None:
            return self._gross_of(book, set(book.positions) | set(book.open_qty), 0.0)
        w = self.windows
        held = np.flatnonzero(totals)
        priced = w.count[held] > 0
        at = held[priced]
        prices = w.last_close[at]
        if not (np.isfinite(prices).all() and (prices > 0.0).all()):
            bad = at[~(np.isfinite(prices) & (prices > 0.0))]
            return Gross(math.inf, self.windows.symbols[int(bad[0])])
        total = float(np.abs(totals[at]).astype(np.float64) @ prices)
        # Held with no bar since a restart (priced by the last fill), or outside the universe.
        rest = [self.windows.symbols[i] for i in held[~priced].tolist()]
        rest += book.outside_symbols()
        return self._gross_of(book, rest, total)

    def _gross_of(self, book: OrderBook, symbols: Iterable[str], total: float) -> Gross:
        index, closes, counts = self.windows.index, self.windows.last_close, self.windows.count
        for symbol in symbols:
            held = abs(book.exposure(symbol))
            if not held:
                continue
            i = index.get(symbol)
            price = closes[i] if i is not None and counts[i] else book.last_fill_px.get(symbol, 0.0)
            if not (math.isfinite(price) and price > 0.0):
                return Gross(math.inf, symbol)
            total += held * price
        return Gross(total)

    def decide(self, order: Order, position: int, gross: Gross, ts_event: int, *, review: bool) -> Decision:
        """Gates 1-6, the one-order-in-review-per-symbol rule, then gate 7 (review)."""
        check = OrderCheck(order.symbol, sign(order.side), order.qty, order.price, ts_event)
        view = self._view(order, position, gross)
        denial = check_order(check, self.limits, view)
        if denial is not None:
            return Decision(str(denial.reason), denial.detail)
        if review and self.reviews.has_symbol(order.symbol):
            return Decision("review_pending", f"{order.symbol} already has an order waiting for review")
        if review and needs_review(check, self.limits, view):
            return Decision(None, park=True, notional=check.notional)
        return Decision(None, notional=check.notional)

    def batch_view(
        self, idx: npt.NDArray[np.int64], symbols: list[str], position: npt.NDArray[np.int64], gross: Gross, orders: Any
    ) -> bg.BatchView:
        """What ``_view`` gives each order, for a batch of orders of distinct symbols at once."""
        wall = self.clock.wall_ns()
        window_start = wall - self.limits.throttle_window_ns
        recent = self.recent_sends
        while recent and recent[0] <= window_start:
            recent.popleft()
        w = self.windows
        priced = w.count[idx] > 0
        ref = np.where(priced, w.last_close[idx], 0.0)
        codes = self.halts.state.codes[idx]
        self._forget_same(wall)
        last_same = self._last_same
        same = (
            np.fromiter(
                (
                    last_same.get((s, "buy" if side > 0 else "sell", q, p), bg.NO_TIME)
                    for s, side, q, p in zip(
                        symbols, orders.side.tolist(), orders.qty.tolist(), orders.price.tolist(), strict=True
                    )
                ),
                dtype=np.int64,
                count=len(symbols),
            )
            if last_same
            else np.full(len(symbols), bg.NO_TIME, dtype=np.int64)
        )
        reviews = self.reviews
        pending = (
            np.fromiter((reviews.has_symbol(s) for s in symbols), dtype=bool, count=len(symbols))
            if len(reviews)
            else np.zeros(len(symbols), dtype=bool)
        )
        lim = self.limits
        per = [lim.for_symbol(s) for s in symbols] if lim.per_symbol else None
        d = lim.default

        def column(name: str, dtype: Any) -> Any:
            if per is None:
                return np.full(len(symbols), getattr(d, name), dtype=dtype)
            return np.array([getattr(x, name) for x in per], dtype=dtype)

        return bg.BatchView(
            now_ns=self.now(),
            wall_ns=wall,
            kill=self.kill,
            market=self.halts.market,
            symbol_state=codes,
            ref_price=ref,
            ref_price_ts=w.last_ts[idx],
            position=position,
            gross_exposure=gross.value,
            unpriced=gross.unpriced is not None,
            recent_orders=len(recent),
            last_same_ts=same,
            review_pending=pending,
            max_order_qty=column("max_order_qty", np.int64),
            max_order_notional=column("max_order_notional", np.float64),
            max_position=column("max_position", np.int64),
            collar_pct=column("collar_pct", np.float64),
        )

    def exposure_change(self, order: Order, position: int) -> float:
        """How much an order adds to gross exposure if it fills (for the rest of the batch)."""
        i = self.windows.index[order.symbol]
        ref = self.windows.last_close[i] or order.price
        after = position + sign(order.side) * order.qty
        return (abs(after) - abs(position)) * ref

    def _view(self, order: Order, position: int, gross: Gross) -> RiskView:
        i = self.windows.index[order.symbol]
        wall = self.clock.wall_ns()
        window_start = wall - self.limits.throttle_window_ns
        recent = self.recent_sends
        while recent and recent[0] <= window_start:
            recent.popleft()
        return RiskView(
            now_ns=self.now(),
            wall_ns=wall,
            kill=self.kill,
            market=self.halts.market,
            symbol_state=self.halts.state[order.symbol],
            ref_price=self.windows.last_close[i] or None,
            ref_price_ts=self.windows.last_ts[i] if self.windows.count[i] else None,
            position=position,
            gross_exposure=gross.value,
            unpriced=gross.unpriced,
            recent_orders=len(recent),  # pruned to the window just above
            last_same_order_ts=self._last_same.get((order.symbol, order.side, order.qty, order.price)),
        )

    def remember_send(self, order: Order, wall: int) -> None:
        self.count_sends(1, wall)
        self._remember_same([(order.symbol, order.side, order.qty, order.price)], wall)

    def count_sends(self, n: int, wall: int) -> None:
        """``n`` orders sent at ``wall``, for the throttle."""
        recent = self.recent_sends
        recent.extend([wall] * n)
        horizon = wall - self.limits.throttle_window_ns
        while recent and recent[0] <= horizon:  # only sends inside the throttle window count
            recent.popleft()

    def remember_same_columns(
        self,
        symbols: list[str],
        side: npt.NDArray[np.int8],
        qty: npt.NDArray[np.int64],
        price: npt.NDArray[np.float64],
        wall: int,
    ) -> None:
        """Orders sent together at ``wall``, as columns, for the duplicate window."""
        if self.limits.duplicate_window_ns <= 0:
            return
        sides = ["buy" if x > 0 else "sell" for x in side.tolist()]
        self._remember_same(zip(symbols, sides, qty.tolist(), price.tolist(), strict=True), wall)

    def _remember_same(self, keys: Iterable[tuple[str, str, int, float]], wall: int) -> None:
        """Sends at ``wall`` by (symbol, side, qty, price), kept oldest first; nothing to keep
        when the duplicate window is off."""
        if self.limits.duplicate_window_ns <= 0:
            return
        last_same = self._last_same
        for key in keys:
            last_same.pop(key, None)
            last_same[key] = wall
        if len(last_same) > 4 * len(self.windows.symbols) + 1024:
            self._forget_same(wall)

    def _forget_same(self, wall: int) -> None:
        """Only sends inside the duplicate window matter: forget the older ones (the oldest
        come first, so this stops at the first one still inside)."""
        horizon = wall - self.limits.duplicate_window_ns
        last_same = self._last_same
        old = []
        for key, ts in last_same.items():
            if ts > horizon:
                break
            old.append(key)
        for key in old:
            del last_same[key]

    def recent_same(self) -> list[tuple[str, str, int, float, int]]:
        """The sends still inside the duplicate window (for a snapshot)."""
        horizon = self.clock.wall_ns() - self.limits.duplicate_window_ns
        return [(s, side, q, p, ts) for (s, side, q, p), ts in self._last_same.items() if ts > horizon]

    def load_same(self, entries: list[tuple[str, str, int, float, int]]) -> None:
        for symbol, side, qty, price, ts in entries:
            self._last_same[(symbol, side, qty, price)] = ts

    @staticmethod
    def parked(order: Order, wall: int, expires: int) -> Parked:
        return Parked(
            order.cl_ord_id, order.symbol, sign(order.side), order.qty, order.price, order.ts_event, wall, expires
        )
