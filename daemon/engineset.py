"""The primary and standby engines, which of them is active, and the failover mechanics.

``run`` is called on the inference thread for each batch. The primary's outcome goes through
the failover policy (``risk.failover``); on an exception or non-finite logits the same input is
copied into the standby's buffer and re-run there within the same call, so the batch's signals
are not lost; on deadline misses the late but valid logits are used and the next batch goes to
the standby. The event is returned with the result, and the loop journals, counts and logs it.

Switches from outside the inference thread (an operator, a GPU health fault) go through
``switch``; the inference thread reads the active engine once per batch under a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engines.base import Engine
from risk.failover import RERUN, FailoverPolicy, FailoverReason, Verdict


@dataclass(frozen=True, slots=True)
class FailoverEvent:
    from_engine: str
    to_engine: str
    reason: FailoverReason
    detail: str
    rerun: bool = False


@dataclass(slots=True)
class Outcome:
    logits: npt.NDArray[np.float32]
    elapsed_ns: int
    engine: str
    event: FailoverEvent | None = None


class EngineSet:
    def __init__(
        self,
        primary: Engine | None,
        standby: Engine | None,
        policy: FailoverPolicy,
        now_ns: Callable[[], int],
        *,
        primary_error: str | None = None,
    ) -> None:
        if primary is None and standby is None:
            raise ValueError("no engine to run")
        self.primary = primary
        self.standby = standby
        self.policy = policy
        self.now_ns = now_ns
        self.primary_error = primary_error
        self._lock = threading.Lock()
        self.active: Engine = primary if primary is not None else standby  # type: ignore[assignment]
        self.events: list[FailoverEvent] = []

    @property
    def engines(self) -> tuple[Engine, ...]:
        return tuple(e for e in (self.primary, self.standby) if e is not None)

    @property
    def max_rows(self) -> int:
        """The most rows one batch may hold: the smaller of the engines' largest buckets."""
        return min(e.buckets[-1] for e in self.engines)

    def input_buffer(self, n: int) -> tuple[Engine, int, npt.NDArray[np.float32]]:
        """The engine that will run the next batch of ``n`` rows, its bucket, and that bucket's buffer."""
        with self._lock:
            engine = self.active
        bucket = engine.bucket_for(n)
        return engine, bucket, engine.input_buffer(bucket)

    def switch(self, to: str, reason: FailoverReason, detail: str) -> FailoverEvent | None:
        """Make ``to`` ("primary" or "standby") active; None when it already is."""
        target = self.primary if to == "primary" else self.standby
        if target is None:
            raise LookupError(f"no {to} engine is loaded" + (f" ({self.primary_error})" if to == "primary" else ""))
        with self._lock:
            if target is self.active:
                return None
            event = FailoverEvent(self.active.name, target.name, reason, detail)
            self.active = target
            self.policy.reset()
        self.events.append(event)
        return event

    def run(self, engine: Engine, bucket: int, n: int) -> Outcome:
        """Infer the batch already gathered into ``engine``'s ``bucket`` buffer (its first ``n`` rows)."""
        started = self.now_ns()
        # Only a primary with a standby behind it is judged; any other engine's fault is raised.
        guarded = engine is self.primary and self.standby is not None
        try:
            logits = engine.infer(bucket)
        except Exception as exc:
            if not guarded:
                raise
            verdict = self.policy.observe(self.now_ns() - started, raised=f"{type(exc).__name__}: {exc}")
        else:
            elapsed = self.now_ns() - started
            if not guarded:
                return Outcome(logits, elapsed, engine.name)
            verdict = self.policy.observe(elapsed, finite=bool(np.isfinite(logits[:n]).all()))
            if verdict is None:
                return Outcome(logits, elapsed, engine.name)
        assert verdict is not None and self.standby is not None
        event = self._fail_over(verdict)
        if verdict.reason not in RERUN:
            return Outcome(logits, elapsed, engine.name, event)  # late, but valid
        standby = self.standby
        sb = standby.bucket_for(n)
        buf = standby.input_buffer(sb)
        buf[:n] = engine.input_buffer(bucket)[:n]
        buf[n:] = 0.0
        return Outcome(standby.infer(sb), self.now_ns() - started, standby.name, event)

    def _fail_over(self, verdict: Verdict) -> FailoverEvent:
        assert self.standby is not None and self.primary is not None
        with self._lock:
            self.active = self.standby
            self.policy.reset()
        event = FailoverEvent(
            self.primary.name, self.standby.name, verdict.reason, verdict.detail, verdict.reason in RERUN
        )
        self.events.append(event)
        return event

    def status(self) -> dict[str, object]:
        def one(e: Engine | None, error: str | None = None) -> dict[str, object] | None:
            if e is None:
                return {"loaded": False, "error": error} if error else None
            h = e.health()
            return {
                "loaded": True,
                "backend": e.backend,
                "model": e.manifest.name,
                "ok": h.ok,
                "detail": h.detail,
                "inferences": h.inferences,
                "failures": h.failures,
            }

        last = self.events[-1] if self.events else None
        return {
            "active": self.active.name,
            "primary": one(self.primary, self.primary_error),
            "standby": one(self.standby),
            "failovers": len(self.events),
            "last_failover": None
            if last is None
            else {"from": last.from_engine, "to": last.to_engine, "reason": str(last.reason), "detail": last.detail},
        }
