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
from collections import deque
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


class RerunFailedError(Exception):
    """The primary failed over and the standby's re-run of the same batch raised too. The switch
    happened: ``event`` must still be journaled."""

    def __init__(self, event: FailoverEvent, cause: BaseException) -> None:
        self.event = event
        self.cause = cause
        super().__init__(f"standby {event.to_engine} failed re-running the batch: {type(cause).__name__}: {cause}")


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
        self.events: deque[FailoverEvent] = deque(maxlen=100)  # the latest; ``failovers`` counts all
        self.failovers = 0

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
        self.failovers += 1
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
            event = self._judge(engine, self.now_ns() - started, raised=f"{type(exc).__name__}: {exc}")
            return self._rerun(engine, bucket, n, started, event)
        elapsed = self.now_ns() - started
        if not guarded:
            return Outcome(logits, elapsed, engine.name)
        event = self._judge(engine, elapsed, finite=bool(np.isfinite(logits[:n]).all()))
        if event is None or not event.rerun:
            return Outcome(logits, elapsed, engine.name, event)  # a deadline miss: late, but valid
        return self._rerun(engine, bucket, n, started, event)

    def _rerun(self, engine: Engine, bucket: int, n: int, started: int, event: FailoverEvent | None) -> Outcome:
        """The same input on the standby, within the call, so the batch's signals are not lost."""
        standby = self.standby
        assert standby is not None
        try:
            sb = standby.bucket_for(n)
            buf = standby.input_buffer(sb)
            buf[:n] = engine.input_buffer(bucket)[:n]
            buf[n:] = 0.0
            return Outcome(standby.infer(sb), self.now_ns() - started, standby.name, event)
        except Exception as exc:
            if event is None:
                raise
            raise RerunFailedError(event, exc) from exc

    def _judge(
        self, engine: Engine, elapsed_ns: int, *, raised: str | None = None, finite: bool = True
    ) -> FailoverEvent | None:
        """The policy's verdict on one primary batch and, on a fault, the switch: both under the
        lock the loop's switches take, so an operator's failover and this one cannot interleave."""
        with self._lock:
            if self.active is not engine:
                return None  # switched away meanwhile (an operator, a GPU fault): nothing to judge
            verdict = self.policy.observe(elapsed_ns, raised=raised, finite=finite)
            if verdict is None:
                return None
            event = self._fail_over(verdict)
        self.events.append(event)
        self.failovers += 1
        return event

    def _fail_over(self, verdict: Verdict) -> FailoverEvent:
        assert self.standby is not None and self.primary is not None
        self.active = self.standby
        self.policy.reset()
        return FailoverEvent(
            self.primary.name, self.standby.name, verdict.reason, verdict.detail, verdict.reason in RERUN
        )

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
            "failovers": self.failovers,
            "last_failover": None
            if last is None
            else {"from": last.from_engine, "to": last.to_engine, "reason": str(last.reason), "detail": last.detail},
        }
