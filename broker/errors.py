"""Errors raised by the broker package. Each carries the data that explains it."""

from __future__ import annotations


class BrokerError(Exception):
    """Base class for broker failures."""


class FrameError(BrokerError):
    """A msgpack byte stream cannot be read further; the connection must be dropped."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class IllegalTransitionError(BrokerError):
    """An order was asked to move between two states the life cycle does not connect."""

    def __init__(self, cl_ord_id: str, current: object, target: object) -> None:
        self.cl_ord_id = cl_ord_id
        self.current = current
        self.target = target
        super().__init__(f"order {cl_ord_id}: illegal transition {current} -> {target}")


class JournalError(BrokerError):
    """The journal could not be written, synced or read: what is on disk is no longer known."""

    def __init__(self, path: str, operation: str, cause: BaseException) -> None:
        self.path = path
        self.operation = operation
        self.cause = cause
        super().__init__(f"journal {path}: {operation} failed: {cause}")
