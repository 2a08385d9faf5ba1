"""A fault-injecting Engine wrapper, for failover drills and tests (``engine.primary.inject``).

It runs the wrapped engine untouched for ``after_batches`` batches, then on each of the next
``batches`` batches (0: every one from then on) does one of:

- ``latency``: sleeps ``latency_ms`` before inferring (a deadline miss);
- ``exception``: raises ``InferenceError`` instead of inferring;
- ``nan``: infers, then writes NaN into the first row of the logits.

The input buffer is never touched, so a failed batch can be re-run on the standby.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engines.base import Engine, EngineHealth
from engines.errors import InferenceError

KINDS = ("latency", "exception", "nan")


@dataclass(frozen=True, slots=True)
class Injection:
    kind: str
    after_batches: int = 0
    batches: int = 0
    latency_ms: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {list(KINDS)}")


class FaultInjectingEngine:
    def __init__(self, inner: Engine, injection: Injection) -> None:
        self.inner = inner
        self.injection = injection
        self.manifest = inner.manifest
        self.name = inner.name
        self.backend = inner.backend
        self.buckets = inner.buckets
        self.calls = 0
        self.injected = 0
        self._warming = False

    def bucket_for(self, n: int) -> int:
        return self.inner.bucket_for(n)

    def input_buffer(self, bucket: int) -> npt.NDArray[np.float32]:
        return self.inner.input_buffer(bucket)

    def _due(self) -> bool:
        if self._warming:
            return False
        self.calls += 1
        inj = self.injection
        if self.calls <= inj.after_batches:
            return False
        return inj.batches == 0 or self.calls <= inj.after_batches + inj.batches

    def infer(self, bucket: int) -> npt.NDArray[np.float32]:
        if not self._due():
            return self.inner.infer(bucket)
        self.injected += 1
        match self.injection.kind:
            case "latency":
                time.sleep(self.injection.latency_ms / 1000)
                return self.inner.infer(bucket)
            case "exception":
                raise InferenceError(f"{self.name}: injected fault on batch {self.calls}")
            case _:
                out = self.inner.infer(bucket)
                out[0, :] = np.nan
                return out

    def warm_up(self) -> None:
        self._warming = True
        try:
            self.inner.warm_up()
        finally:
            self._warming = False

    def health(self) -> EngineHealth:
        h = self.inner.health()
        return EngineHealth(h.ok, f"{h.detail}; injecting {self.injection.kind}", h.inferences, h.failures)

    def close(self) -> None:
        self.inner.close()
