"""Pre-trade risk: pure gates over frozen values. Nothing here does I/O or imports the daemon."""

from risk.gates import Denial, DenyReason, Limits, OrderCheck, check_order

__all__ = ["Denial", "DenyReason", "Limits", "OrderCheck", "check_order"]
