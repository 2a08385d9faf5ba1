"""Pre-trade risk: pure gates over frozen values, trading states, the halt rule and the review
queue. Nothing here does I/O or imports the daemon."""

from risk.gates import Denial, DenyReason, Limits, OrderCheck, RiskView, SymbolLimits, check_order, needs_review
from risk.states import TradingState

__all__ = [
    "Denial",
    "DenyReason",
    "Limits",
    "OrderCheck",
    "RiskView",
    "SymbolLimits",
    "TradingState",
    "check_order",
    "needs_review",
]
