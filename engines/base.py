"""The Engine interface every backend implements, and the spec that selects one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from engines.manifest import Manifest


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """How to build one engine: which backend, which model, how to run it."""

    name: str
    backend: str
    model: Path
    batch_buckets: tuple[int, ...] | None = None
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    allow_spinning: bool = False
    expect_sha256: str | None = None
    # The timing backend only: its GPU-time table ("builtin" or a path) and the percentile it sleeps.
    timing_table: str = "builtin"
    timing_quantile: str = "p50"


@dataclass(frozen=True, slots=True)
class EngineHealth:
    ok: bool
    detail: str
    inferences: int
    failures: int


class Engine(Protocol):
    """Load, warm every bucket, infer a [B, W, F] float32 batch, report health.

    The hot path is ``input_buffer`` + ``infer``: the caller gathers a batch straight into the
    engine-owned buffer of the bucket, then runs it. ``infer`` releases the GIL while it runs, so
    it belongs on an inference thread, never on the event loop.
    """

    manifest: Manifest
    name: str
    backend: str
    buckets: tuple[int, ...]

    def bucket_for(self, n: int) -> int:
        """Smallest bucket that holds ``n`` rows."""
        ...

    def input_buffer(self, bucket: int) -> npt.NDArray[np.float32]:
        """The engine-owned [bucket, W, F] float32 input of that bucket."""
        ...

    def infer(self, bucket: int) -> npt.NDArray[np.float32]:
        """Run the bucket's input buffer; returns its [bucket, 3] logits (engine-owned)."""
        ...

    def warm_up(self) -> None:
        """Run every bucket once so the first real batch pays no first-run cost."""
        ...

    def health(self) -> EngineHealth: ...

    def close(self) -> None: ...


def smallest_bucket(buckets: tuple[int, ...], n: int) -> int:
    """The smallest of the (increasing) ``buckets`` that holds ``n`` rows."""
    for bucket in buckets:
        if n <= bucket:
            return bucket
    raise ValueError(f"batch of {n} exceeds the largest bucket {buckets[-1]}")


def describe(engine: Engine) -> str:
    """The backend as a latency summary names it: an engine's ``description`` where it has one
    (the timing engine's says which GPU table it sleeps), through any wrapper (``inner``), else its
    backend."""
    current: object = engine
    while True:
        description = getattr(current, "description", None)
        if isinstance(description, str):
            return description
        inner = getattr(current, "inner", None)
        if inner is None:
            return engine.backend
        current = inner


def run_batch(engine: Engine, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Copy a [n, W, F] batch into its bucket, infer, return a copy of the n rows of logits.

    A convenience for tools and tests; the daemon gathers into the buffer directly instead.
    """
    n = batch.shape[0]
    bucket = engine.bucket_for(n)
    buf = engine.input_buffer(bucket)
    buf[:n] = batch
    buf[n:] = 0.0
    return engine.infer(bucket)[:n].copy()
