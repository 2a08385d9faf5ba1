"""Engine failover policy: when the primary engine stops being trusted.

Pure and synchronous: it is told what each primary batch did and answers whether to fail over
and why. The mechanics (re-running the batch, switching, journaling) live in the daemon.

The primary fails over on the first of:

- ``exception``: the inference call raised;
- ``nonfinite``: the logits of the batch's rows hold a NaN or an infinity;
- ``deadline``: ``misses`` of the last ``window`` batches took longer than the budget;
- ``gpu_health``: the GPU monitor reported a fault (uncorrected ECC errors, over temperature, Xid);
- ``unavailable``: the primary could not be loaded at all (no GPU, for instance).

Failback to the primary is an operator's decision (``operator``), never automatic.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum


class FailoverReason(StrEnum):
    EXCEPTION = "exception"
    NONFINITE = "nonfinite"
    DEADLINE = "deadline"
    GPU_HEALTH = "gpu_health"
    UNAVAILABLE = "unavailable"
    OPERATOR = "operator"


# Faults after which the batch's own output cannot be used: it is re-run on the standby.
RERUN = frozenset({FailoverReason.EXCEPTION, FailoverReason.NONFINITE})


@dataclass(frozen=True, slots=True)
class Verdict:
    reason: FailoverReason
    detail: str


class FailoverPolicy:
    """k deadline misses in the last n primary batches, or any hard fault, fails over."""

    def __init__(self, budget_ns: int, misses: int, window: int) -> None:
        if not 1 <= misses <= window:
            raise ValueError(f"need 1 <= misses <= window, got misses={misses} window={window}")
        self.budget_ns = budget_ns
        self.misses = misses
        self.window = window
        self._late: deque[bool] = deque(maxlen=window)

    def observe(self, elapsed_ns: int, *, raised: str | None = None, finite: bool = True) -> Verdict | None:
        """One primary batch: how long it took, what it raised, whether its logits were finite."""
        if raised is not None:
            return Verdict(FailoverReason.EXCEPTION, raised)
        if not finite:
            return Verdict(FailoverReason.NONFINITE, "non-finite logits")
        self._late.append(elapsed_ns > self.budget_ns)
        late = sum(self._late)
        if late >= self.misses:
            return Verdict(
                FailoverReason.DEADLINE,
                f"{late} of the last {len(self._late)} batches over the {self.budget_ns / 1000:.0f} us budget "
                f"(last {elapsed_ns / 1000:.0f} us)",
            )
        return None

    def reset(self) -> None:
        self._late.clear()
