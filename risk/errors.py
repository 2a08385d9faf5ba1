"""Errors raised by the risk package. Each carries the data that explains it."""

from __future__ import annotations


class RiskError(Exception):
    """Base class for risk failures (never raised for a denial: a denial is a value)."""


class UnknownReviewError(RiskError):
    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        super().__init__(f"no parked order {order_id!r}")


class UnknownSymbolError(RiskError):
    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        super().__init__(f"unknown symbol {symbol!r}")
