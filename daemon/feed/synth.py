"""A seeded synthetic universe: random walks with a little momentum, volume, and rare jumps.

The demo and the shipped model's training both use it; real bars live outside the project.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from daemon.feed import dbn

START = datetime(2026, 1, 5, 14, 30, tzinfo=UTC)
NS_PER_MIN = 60_000_000_000


@dataclass(frozen=True, slots=True)
class SynthParams:
    symbols: int = 100
    minutes: int = 30
    seed: int = 1
    momentum: float = 0.15  # AR(1) coefficient of one-minute returns: what a model can learn
    vol_per_minute: float = 0.0012
    jump_probability: float = 0.0005  # per symbol-minute
    jump_size: tuple[float, float] = (0.05, 0.09)


def symbol_names(n: int) -> list[str]:
    """S0000, S0001, ... : names that sort like their index."""
    return [f"S{i:04d}" for i in range(n)]


def generate(params: SynthParams) -> dict[str, npt.NDArray[np.float64]]:
    """symbol -> OHLCV [minutes, 5], prices rounded to cents and internally consistent."""
    rng = np.random.default_rng(params.seed)
    out: dict[str, npt.NDArray[np.float64]] = {}
    for name in symbol_names(params.symbols):
        sigma = params.vol_per_minute * rng.uniform(0.6, 1.6)
        eps = rng.standard_normal(params.minutes) * sigma
        r = np.empty(params.minutes)
        prev = 0.0
        for t in range(params.minutes):
            prev = params.momentum * prev + eps[t]
            r[t] = prev
        jumps = rng.random(params.minutes) < params.jump_probability
        r[jumps] += rng.choice([-1.0, 1.0], jumps.sum()) * rng.uniform(*params.jump_size, jumps.sum())
        start = rng.uniform(20.0, 400.0)
        close = start * np.exp(np.cumsum(r))
        open_ = np.concatenate(([start], close[:-1])) * np.exp(rng.standard_normal(params.minutes) * sigma * 0.1)
        wick = np.abs(rng.standard_normal((2, params.minutes))) * sigma * 0.5
        high = np.maximum(open_, close) * np.exp(wick[0])
        low = np.minimum(open_, close) * np.exp(-wick[1])
        o, h, lo, c = (np.round(a, 2) for a in (open_, high, low, close))
        h = np.maximum.reduce([h, o, c])
        lo = np.minimum.reduce([lo, o, c])
        volume = np.round(rng.lognormal(8.0, 0.6, params.minutes) * (1.0 + 200.0 * np.abs(r)))
        out[name] = np.stack([o, h, lo, c, volume], axis=1)
    return out


def write_csv(universe: dict[str, npt.NDArray[np.float64]], path: Path, start: datetime = START) -> int:
    """Write in the columns of the real minute data, minute by minute; returns rows written."""
    base_ns = int(start.timestamp()) * 1_000_000_000
    minutes = min(len(a) for a in universe.values())
    rows = 0
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["symbol", "ts_utc", "open", "high", "low", "close", "volume"])
        for t in range(minutes):
            stamp = datetime.fromtimestamp((base_ns + t * NS_PER_MIN) / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for name, a in universe.items():
                o, h, lo, c, v = a[t]
                writer.writerow([name, stamp, f"{o:.2f}", f"{h:.2f}", f"{lo:.2f}", f"{c:.2f}", f"{int(v)}"])
                rows += 1
    return rows


def write_dbn_file(
    universe: dict[str, npt.NDArray[np.float64]],
    path: Path,
    start: datetime = START,
    compress: Literal["zstd"] | None = None,
    version: int = 3,
) -> int:
    """Write the universe as an OHLCV-1m DBN file (``compress="zstd"`` for ``.dbn.zst``), the
    same bars as ``write_csv``: ``ts_event`` is the minute's start, instrument ids 1, 2, ... in
    the universe's order. Returns the records written."""
    base_ns = int(start.timestamp()) * 1_000_000_000
    names = list(universe)
    minutes = min(len(a) for a in universe.values())
    stacked = np.stack([universe[name][:minutes] for name in names], axis=1)  # [minutes, symbols, 5]
    ids = np.broadcast_to(np.arange(1, len(names) + 1, dtype=np.uint32), (minutes, len(names)))
    ts = np.broadcast_to((base_ns + np.arange(minutes, dtype=np.int64) * NS_PER_MIN)[:, None], ids.shape)
    o, h, lo, c = (np.rint(stacked[..., k] * dbn.FIXED_PRICE_SCALE).astype(np.int64).ravel() for k in range(4))
    volume = stacked[..., 4].ravel().astype(np.uint64)
    records = dbn.make_ohlcv(ids.ravel(), ts.ravel(), o, h, lo, c, volume)
    return dbn.write_dbn(path, records, dict(enumerate(names, start=1)), version=version, compress=compress)
