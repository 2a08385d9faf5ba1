"""Training on real bars up to a date, and walk-forward qualification.

``training_series`` cuts each symbol's bars at ``train_until`` (00:00 UTC of that day) and drops
its last ``embargo`` bars before the cut, so no training label (the next bar's move) reaches into
the period a backtest then runs on. ``walk_forward`` splits the data's trading days into K + 1
blocks and, for each of the last K, trains on every day before it, exports, and runs
``tradingd backtest`` on that block alone: K out-of-sample verdicts instead of one.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from daemon.backtest.run import NS, Options, finite_or_none, load_minutes, run_backtest
from daemon.config import Config, load_config
from daemon.feed.replay import Minute


def _ohlcv(minutes: Sequence[Minute]) -> dict[str, npt.NDArray[np.float64]]:
    rows: dict[str, list[tuple[float, float, float, float, float]]] = {}
    for m in minutes:
        for b in m.bars:
            rows.setdefault(b.symbol, []).append((b.open, b.high, b.low, b.close, b.volume))
    return {s: np.asarray(r, dtype=np.float64) for s, r in sorted(rows.items())}


def training_series(
    data: Sequence[Path], train_until: date | None, embargo: int | None, window: int = 16
) -> tuple[list[npt.NDArray[np.float64]], str]:
    """Per-symbol [T, 5] OHLCV arrays of the bars before ``train_until``, less the embargo; and a
    label for the manifest naming the files and the cut."""
    minutes = load_minutes(data)
    if train_until is not None:
        cut = int(datetime.combine(train_until, time(), UTC).timestamp()) * NS
        minutes = [m for m in minutes if m.ts <= cut]
    drop = window if embargo is None else embargo
    series = [a[: len(a) - drop] if drop else a for a in _ohlcv(minutes).values()]
    series = [a for a in series if len(a) > window + 1]
    if not series:
        raise SystemExit(f"tradingd model train: no symbol has more than {window + 1} bars before {train_until}")
    names = ", ".join(p.name for p in data)
    label = f"real bars: {names}" + (f", before {train_until}, embargo {drop} bars" if train_until else "")
    return series, label


def _day_blocks(minutes: Sequence[Minute], k: int) -> list[list[date]]:
    days = sorted({datetime.fromtimestamp((m.ts - 1) // NS, UTC).date() for m in minutes})  # ts: the close
    if len(days) < k + 1:
        raise SystemExit(
            f"tradingd model train: {k} folds need at least {k + 1} trading days; the data has {len(days)}"
        )
    size = math.ceil(len(days) / (k + 1))
    blocks = [days[i : i + size] for i in range(0, len(days), size)]
    while len(blocks) > k + 1:  # a short tail joins the block before it
        blocks[-2].extend(blocks.pop())
    return blocks


def walk_forward(args: argparse.Namespace) -> int:
    """Train and backtest K folds; exit 0 only when every fold passes its gates."""
    from daemon.cli import _run_async, train_and_export  # noqa: PLC0415
    from daemon.logs import configure_logging  # noqa: PLC0415

    configure_logging("error")  # the daemon's per-order lines would drown the progress
    base = load_config(args.config) if getattr(args, "config", None) else Config()
    minutes = load_minutes(args.data)
    blocks = _day_blocks(minutes, args.walk_forward)
    out = Path(args.out)
    folds: list[dict[str, Any]] = []
    for f, test_days in enumerate(blocks[1:], start=1):
        start, end = test_days[0], test_days[-1]
        print(f"fold {f}/{len(blocks) - 1}: train before {start}, backtest {start} .. {end}", file=sys.stderr)
        series, label = training_series(args.data, start, args.embargo_bars, args.window)
        model = train_and_export(args, series, label, out / f"fold-{f}")
        result = _run_async(
            run_backtest(
                Options(data=tuple(args.data), model=str(model), start=start, end=end, baselines=False), base, "(walk)"
            )
        )
        folds.append(
            {
                "fold": f,
                "train_until": start.isoformat(),
                "test": {"from": start.isoformat(), "to": end.isoformat()},
                "model": str(model),
                "passed": result.passed,
                "gates": result.gates,
                "metrics": result.metrics,
            }
        )
    summary = {"folds": folds, "passed": all(f["passed"] for f in folds)}
    (out / "walk_forward.json").write_bytes(orjson.dumps(finite_or_none(summary), option=orjson.OPT_INDENT_2))
    print("| fold | test days | accuracy | sharpe | max drawdown | excess/yr | trades | verdict |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for fold in folds:
        m = fold["metrics"]

        def fmt(value: Any) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        print(
            f"| {fold['fold']} | {fold['test']['from']} .. {fold['test']['to']} | {fmt(m['accuracy'])}"
            f" | {fmt(m['sharpe'])} | {fmt(m['max_drawdown'])} | {fmt(m['excess_return'])} | {m['trades']}"
            f" | {'pass' if fold['passed'] else 'FAIL'} |"
        )
    print(f"wrote {out / 'walk_forward.json'}")
    return 0 if summary["passed"] else 1
