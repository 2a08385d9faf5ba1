"""The one place that reads the system clocks; everything else is handed a Clock.

``mono_ns`` orders and measures intervals inside the process (``ts_recv``, ``ts_send``);
``wall_ns`` is epoch time for what crosses the process boundary (``ts_event`` from the feed).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def mono_ns(self) -> int: ...

    def wall_ns(self) -> int: ...


class SystemClock:
    """perf_counter_ns for intervals, time_ns for epoch time."""

    mono_ns = staticmethod(time.perf_counter_ns)
    wall_ns = staticmethod(time.time_ns)


class FakeClock:
    """A clock that moves only when told to; for tests."""

    def __init__(self, mono_ns: int = 0, wall_ns: int = 1_700_000_000_000_000_000) -> None:
        self._mono = mono_ns
        self._wall = wall_ns

    def mono_ns(self) -> int:
        return self._mono

    def wall_ns(self) -> int:
        return self._wall

    def advance(self, ns: int) -> None:
        self._mono += ns
        self._wall += ns


class ReplayClock:
    """A backtest's clock: real ``perf_counter_ns`` for intervals (so latencies are measured, not
    assumed), and epoch time that follows the replayed feed: the current minute's close plus the
    real time spent since it was read. Wall-clock rules (order throttle, duplicate window, review
    expiry) then act on the replay's time as they would live, however fast it runs."""

    def __init__(self, start_wall_ns: int = 0) -> None:
        self._minute = start_wall_ns
        self._since = time.perf_counter_ns()

    mono_ns = staticmethod(time.perf_counter_ns)

    def wall_ns(self) -> int:
        return self._minute + (time.perf_counter_ns() - self._since)

    def at_minute(self, ts_ns: int) -> None:
        """The feed has reached the minute closing at ``ts_ns`` (never moves epoch time back)."""
        now = time.perf_counter_ns()
        current = self._minute + (now - self._since)
        self._minute, self._since = max(ts_ns, current), now
