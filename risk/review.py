"""The manual-review queue: orders at or over the review threshold wait here for an operator."""

from __future__ import annotations

from dataclasses import dataclass

from risk.errors import UnknownReviewError


@dataclass(frozen=True, slots=True)
class Parked:
    id: str
    symbol: str
    side: int
    qty: int
    price: float
    ts_event: int
    parked_at_ns: int  # wall clock
    expires_at_ns: int  # wall clock

    @property
    def notional(self) -> float:
        return self.qty * self.price


class ReviewQueue:
    def __init__(self) -> None:
        self._parked: dict[str, Parked] = {}

    def __len__(self) -> int:
        return len(self._parked)

    def __contains__(self, order_id: object) -> bool:
        return order_id in self._parked

    def has_symbol(self, symbol: str) -> bool:
        return any(p.symbol == symbol for p in self._parked.values())

    def park(self, order: Parked) -> None:
        self._parked[order.id] = order

    def waiting(self) -> list[Parked]:
        return sorted(self._parked.values(), key=lambda p: p.parked_at_ns)

    def take(self, order_id: str) -> Parked:
        """Remove and return a parked order (to approve or reject it)."""
        try:
            return self._parked.pop(order_id)
        except KeyError:
            raise UnknownReviewError(order_id) from None

    def expire(self, now_ns: int) -> list[Parked]:
        """Remove and return every order whose time to live has run out."""
        gone = [p for p in self._parked.values() if p.expires_at_ns <= now_ns]
        for p in gone:
            del self._parked[p.id]
        return gone

    def oldest_age_ns(self, now_ns: int) -> int:
        return max((now_ns - p.parked_at_ns for p in self._parked.values()), default=0)
