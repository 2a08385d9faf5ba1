"""Timing backend: a benchmark stand-in for the GPU engine that runs no model (``backend = "timing"``).

Each batch sleeps the GPU time a measured table gives for its bucket, then returns logits from a
fixed rule, so the daemon around it (feed, windows, batcher, gates, orders, journal) can be
measured on a machine without a GPU as it would run on the GPU server. The table is
``gpu_time_table`` of a ``bench/gpu_check.py`` result (schema in bench/RESULTS.md); a bucket the
table has no row for is interpolated linearly between its measured neighbours, or past the
largest measured bucket extrapolated from the last two at their per-row slope, and is marked
not measured. ``description`` says which table, which percentile and what was not measured, for
every summary that reports latency.

The sleep is ``time.sleep`` (``clock_nanosleep``), which releases the GIL and burns no CPU; it
is repeated if it wakes early, never busy-waited, so an inference takes at least the table's time
and a little more (the oversleep is counted and shown in ``health``). Linux pads every sleep by
the thread's timer slack (50 us by default), so the first inference on a thread sets that
thread's slack to 1 ns.

The rule reads the newest bar's normalised ``log_return`` ``z``: logits ``(-4z, 1, 4z)`` for
(sell, hold, buy), so ``z > 0.25`` is a buy, ``z < -0.25`` a sell and anything between a hold,
with a softmax confidence that grows with ``|z|``. 0.25 is about the shipped model's training
hold band (5.3e-4) in standard deviations of the return, so flat bars hold and orders flow on
the rest. Rows are independent; finite input gives finite logits, NaN input NaN logits, as a
real model would.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt

from engines.base import EngineHealth, EngineSpec, smallest_bucket
from engines.errors import ManifestError, ModelMismatchError
from engines.manifest import load_manifest, manifest_path_for

# Where bench/gpu_check.py's result lies in a source checkout. bench/ is not in the wheel, so an
# installed daemon has no builtin table and must be given one (``engine.*.timing_table``).
BUILTIN_TABLE = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "gpu_check.json"
TABLE_KEY = "gpu_time_table"
TABLE_SCHEMA = 1
QUANTILES = ("p50", "p99")
RETURN_FEATURE = "log_return"
LOGIT_SCALE = 4.0
HOLD_BAND_Z = 0.25
HOLD_LOGIT = LOGIT_SCALE * HOLD_BAND_Z

Source = Literal["measured", "interpolated", "extrapolated"]

_PR_SET_TIMERSLACK = 29  # linux/prctl.h


class TimingTableError(ManifestError):
    """A GPU-time table is missing, malformed, or cannot give a configured bucket's time.

    A ManifestError (the table is the timing engine's manifest), so the CLI exits 78 naming the
    file and the field.
    """


@dataclass(frozen=True, slots=True)
class MeasuredRow:
    bucket: int
    gpu_ms_p50: float
    gpu_ms_p99: float

    def ms(self, quantile: str) -> float:
        return self.gpu_ms_p50 if quantile == "p50" else self.gpu_ms_p99


@dataclass(frozen=True, slots=True)
class GpuTimeTable:
    """A validated ``gpu_time_table``: measured rows in ascending bucket order."""

    path: str
    gpu: str
    rows: tuple[MeasuredRow, ...]
    model_sha256: str | None = None
    window: int | None = None
    features: int | None = None


@dataclass(frozen=True, slots=True)
class BucketTime:
    """The time one configured bucket sleeps, and whether the table measured it."""

    bucket: int
    ms: float
    source: Source

    @property
    def measured(self) -> bool:
        return self.source == "measured"


@dataclass(frozen=True, slots=True)
class SleepStats:
    """How far the sleeps overshot the table's times (the stand-in's own error)."""

    batches: int
    oversleep_mean_ns: int
    oversleep_max_ns: int


class _Row(msgspec.Struct, frozen=True):
    # Only the columns the engine sleeps; the table's other columns (wall, step wall) are read past.
    gpu_ms_p50: float
    gpu_ms_p99: float
    measured: bool


class _Table(msgspec.Struct, frozen=True):
    schema: int
    buckets: dict[str, object]  # each converted on its own, so an error names its bucket
    gpu: str | None = None
    model_sha256: str | None = None
    window: int | None = None
    features: int | None = None
    dry_run: bool = False


class _File(msgspec.Struct, frozen=True):
    gpu_time_table: _Table


def resolve_timing_table(value: str, builtin: Path = BUILTIN_TABLE) -> Path:
    """``builtin`` is the source checkout's bench/gpu/gpu_check.json; anything else is a path."""
    if value != "builtin":
        return Path(value)
    if not builtin.is_file():
        raise TimingTableError(
            str(builtin),
            "(file)",
            "no builtin GPU-time table: it is bench/gpu/gpu_check.json of a source checkout, and bench/ "
            "is not shipped in the wheel; give the path of a gpu_check.json (timing_table)",
        )
    return builtin


def load_timing_table(path: Path) -> GpuTimeTable:
    """Read and validate the ``gpu_time_table`` of a gpu_check.json; every error names the field."""
    where = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise TimingTableError(where, "(file)", "no such file") from exc
    except OSError as exc:
        raise TimingTableError(where, "(file)", f"cannot read: {exc.strerror or exc}") from exc
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise TimingTableError(where, "(file)", f"not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or TABLE_KEY not in doc:
        raise TimingTableError(where, TABLE_KEY, "missing: not a gpu_check.json with a GPU-time table")
    try:
        table = msgspec.convert(doc, _File).gpu_time_table
    except msgspec.ValidationError as exc:
        field, problem = _split_error(str(exc))
        raise TimingTableError(where, field, problem) from exc
    if table.schema != TABLE_SCHEMA:
        raise TimingTableError(where, f"{TABLE_KEY}.schema", f"unsupported schema {table.schema}, expected 1")
    if table.dry_run:
        raise TimingTableError(where, f"{TABLE_KEY}.dry_run", "a --dry-run table (CPU, fp32) is not a measurement")
    if not table.buckets:
        raise TimingTableError(where, f"{TABLE_KEY}.buckets", "no buckets")
    rows = []
    for key, raw in table.buckets.items():
        field = f"{TABLE_KEY}.buckets.{key}"
        if not key.isdecimal() or int(key) < 1:
            raise TimingTableError(where, field, f"{key!r} is not a batch size")
        try:
            row = msgspec.convert(raw, _Row)
        except msgspec.ValidationError as exc:
            sub, problem = _split_error(str(exc))
            raise TimingTableError(where, field if sub == "(root)" else f"{field}.{sub}", problem) from exc
        if not row.measured:
            raise TimingTableError(
                where, f"{field}.measured", "false: the table must hold measurements only (the engine extends them)"
            )
        for name, ms in (("gpu_ms_p50", row.gpu_ms_p50), ("gpu_ms_p99", row.gpu_ms_p99)):
            if not (math.isfinite(ms) and ms > 0):
                raise TimingTableError(where, f"{field}.{name}", f"must be a positive number of ms, got {ms}")
        if row.gpu_ms_p99 < row.gpu_ms_p50:
            raise TimingTableError(
                where, f"{field}.gpu_ms_p99", f"{row.gpu_ms_p99} ms is below gpu_ms_p50 {row.gpu_ms_p50} ms"
            )
        rows.append(MeasuredRow(int(key), row.gpu_ms_p50, row.gpu_ms_p99))
    rows.sort(key=lambda r: r.bucket)
    for before, after in itertools.pairwise(rows):
        if before.bucket == after.bucket:
            raise TimingTableError(where, f"{TABLE_KEY}.buckets", f"bucket {after.bucket} appears twice")
    return GpuTimeTable(
        path=where,
        gpu=table.gpu or "unnamed GPU",
        rows=tuple(rows),
        model_sha256=table.model_sha256,
        window=table.window,
        features=table.features,
    )


def _split_error(message: str) -> tuple[str, str]:
    # msgspec says "Expected `float`, got `str` - at `$.gpu_ms_p50`"
    problem, sep, where = message.rpartition(" - at `")
    if not sep:
        return "(root)", message
    return where.rstrip("`").removeprefix("$").removeprefix(".") or "(root)", problem


def bucket_times(table: GpuTimeTable, buckets: tuple[int, ...], quantile: str) -> tuple[BucketTime, ...]:
    """Each bucket's time at ``quantile``: measured, interpolated between the measured buckets
    around it, or extrapolated past the largest from the last two at their per-row slope."""
    if quantile not in QUANTILES:
        raise ValueError(f"unknown quantile {quantile!r}; known: {list(QUANTILES)}")
    xs = [r.bucket for r in table.rows]
    ys = [r.ms(quantile) for r in table.rows]
    field = f"{TABLE_KEY}.buckets"
    out = []
    for bucket in buckets:
        i = bisect.bisect_left(xs, bucket)
        if i < len(xs) and xs[i] == bucket:
            out.append(BucketTime(bucket, ys[i], "measured"))
        elif i == 0:
            raise TimingTableError(
                table.path,
                field,
                f"bucket {bucket} is below the smallest measured bucket {xs[0]}; measure it or leave it out",
            )
        elif i < len(xs):
            share = (bucket - xs[i - 1]) / (xs[i] - xs[i - 1])
            out.append(BucketTime(bucket, ys[i - 1] + share * (ys[i] - ys[i - 1]), "interpolated"))
        elif len(xs) < 2:
            raise TimingTableError(
                table.path, field, f"one measured bucket ({xs[0]}) cannot be extrapolated to bucket {bucket}"
            )
        else:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            if slope < 0:
                raise TimingTableError(
                    table.path,
                    field,
                    f"the time falls from bucket {xs[-2]} ({ys[-2]} ms) to {xs[-1]} ({ys[-1]} ms), "
                    f"so bucket {bucket} cannot be extrapolated",
                )
            out.append(BucketTime(bucket, ys[-1] + slope * (bucket - xs[-1]), "extrapolated"))
    return tuple(out)


def describe_times(table: GpuTimeTable, quantile: str, times: tuple[BucketTime, ...]) -> str:
    """One line for summaries: ``timing (NVIDIA H200 table, p50; buckets > 8192 extrapolated)``."""
    parts = [f"{table.gpu} table, {quantile}"]
    interpolated = [str(t.bucket) for t in times if t.source == "interpolated"]
    if interpolated:
        parts.append(f"buckets {', '.join(interpolated)} interpolated")
    if any(t.source == "extrapolated" for t in times):
        parts.append(f"buckets > {table.rows[-1].bucket} extrapolated")
    if all(t.measured for t in times):
        parts.append("all buckets measured")
    return f"timing ({'; '.join(parts)})"


def _tighten_timer_slack() -> bool:
    # Linux wakes a sleeping thread up to its timer slack late (50 us by default): a fifth of a
    # one-row batch's GPU time. 1 ns makes the wake-up as prompt as the timer allows.
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        one = ctypes.c_ulong(1)
        zero = ctypes.c_ulong(0)
        return int(libc.prctl(ctypes.c_int(_PR_SET_TIMERSLACK), one, zero, zero, zero)) == 0
    except (OSError, AttributeError):
        return False


class TimingEngine:
    """An Engine that sleeps each bucket's measured GPU time and returns rule-based logits.

    Buckets: ``spec.batch_buckets``, else the manifest's and the table's together (up to 8,192
    rows with the shipped table, so a full-market minute is one batch).
    """

    backend = "timing"

    def __init__(
        self,
        spec: EngineSpec,
        *,
        now_ns: Callable[[], int] = time.perf_counter_ns,
        sleep: Callable[[float], None] = time.sleep,
        builtin_table: Path = BUILTIN_TABLE,
    ) -> None:
        self.name = spec.name
        self.model_path = Path(spec.model)
        self.manifest = load_manifest(self.model_path)
        if spec.expect_sha256 and spec.expect_sha256 != self.manifest.sha256:
            raise ModelMismatchError(str(self.model_path), "sha256", spec.expect_sha256, self.manifest.sha256)
        if spec.timing_quantile not in QUANTILES:
            raise ValueError(f"unknown timing quantile {spec.timing_quantile!r}; known: {list(QUANTILES)}")
        self.quantile = spec.timing_quantile
        self.table = load_timing_table(resolve_timing_table(spec.timing_table, builtin_table))
        self._check_table()
        if RETURN_FEATURE not in self.manifest.feature_names:
            raise ManifestError(
                str(manifest_path_for(self.model_path)),
                "features",
                f"the timing engine's rule reads {RETURN_FEATURE!r}, which this model has not",
            )
        self._return_index = self.manifest.feature_names.index(RETURN_FEATURE)

        measured = tuple(r.bucket for r in self.table.rows)
        self.buckets = tuple(spec.batch_buckets or sorted({*self.manifest.batch_buckets, *measured}))
        if list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ModelMismatchError(
                str(self.model_path), "batch_buckets", "strictly increasing positive ints", self.buckets
            )
        self.times = bucket_times(self.table, self.buckets, self.quantile)
        self.description = describe_times(self.table, self.quantile, self.times)
        self._sleep_ns = {t.bucket: round(t.ms * 1e6) for t in self.times}

        window, n_features = self.manifest.window, self.manifest.n_features
        self._inputs = {b: np.zeros((b, window, n_features), dtype=np.float32) for b in self.buckets}
        self._outputs = {b: np.zeros((b, 3), dtype=np.float32) for b in self.buckets}
        self._now_ns = now_ns
        self._sleep = sleep
        self._tightened = threading.local()
        self._lock = threading.Lock()
        self._inferences = 0
        self._oversleep_total_ns = 0
        self._oversleep_max_ns = 0

    def _check_table(self) -> None:
        t, m = self.table, self.manifest
        for field, theirs, ours in (
            ("window", t.window, m.window),
            ("features", t.features, m.n_features),
            ("model_sha256", t.model_sha256, m.sha256),
        ):
            if theirs is not None and theirs != ours:
                raise TimingTableError(
                    t.path, f"{TABLE_KEY}.{field}", f"measured with {theirs}, the model {self.model_path} has {ours}"
                )

    def bucket_for(self, n: int) -> int:
        return smallest_bucket(self.buckets, n)

    def input_buffer(self, bucket: int) -> npt.NDArray[np.float32]:
        return self._inputs[bucket]

    def infer(self, bucket: int) -> npt.NDArray[np.float32]:
        x, y = self._inputs[bucket], self._outputs[bucket]
        if not getattr(self._tightened, "done", False):
            self._tightened.done = True
            _tighten_timer_slack()
        with self._lock:
            deadline = self._now_ns() + self._sleep_ns[bucket]
            # The rule runs inside the GPU time, as the copies and the kernels would.
            z = x[:, -1, self._return_index]
            np.multiply(z, -LOGIT_SCALE, out=y[:, 0])
            y[:, 1] = HOLD_LOGIT
            np.multiply(z, LOGIT_SCALE, out=y[:, 2])
            now = self._now_ns()
            while now < deadline:  # again only if woken early: a sleep, never a spin
                self._sleep((deadline - now) / 1e9)
                now = self._now_ns()
            over = now - deadline
            self._oversleep_total_ns += over
            self._oversleep_max_ns = max(self._oversleep_max_ns, over)
            self._inferences += 1
        return y

    def warm_up(self) -> None:
        for bucket in self.buckets:
            self.infer(bucket)

    def sleep_stats(self) -> SleepStats:
        """The oversleep so far: what the stand-in adds to the table's times."""
        n = self._inferences
        return SleepStats(n, self._oversleep_total_ns // n if n else 0, self._oversleep_max_ns)

    def health(self) -> EngineHealth:
        s = self.sleep_stats()
        detail = (
            f"{self.description}; oversleep mean {s.oversleep_mean_ns / 1000:.0f} us, "
            f"max {s.oversleep_max_ns / 1000:.0f} us over {s.batches} batches"
        )
        return EngineHealth(ok=True, detail=detail, inferences=self._inferences, failures=0)

    def close(self) -> None:
        self._inputs.clear()
        self._outputs.clear()
