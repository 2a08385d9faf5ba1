"""Direction accuracy of the shipped model on real minute bars, against naive baselines.

    python -m bench.accuracy [--data ../shared/data/us_equity_minute_2013-10.csv] [--model PATH]

Each symbol's bars are taken in time order, as the daemon sees them (gaps in trading stay gaps).
For every full window the model's call (sell / hold / buy) is compared with the next bar's
close-to-close move. Direction accuracy is the share of buy and sell calls whose direction was
right; flat next moves count as wrong. Baselines in the same run: momentum (the sign of the
last return) and always-buy, scored the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from daemon.backtest.metrics import direction_accuracy
from daemon.feed.replay import load_csv
from daemon.policy import BUY, SELL, classify
from daemon.windows import FeatureWindows
from engines.base import EngineSpec, run_batch
from engines.chooser import DEFAULT_MODEL, build_engine

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "us_equity_minute_2013-10.csv"


def _score(calls: np.ndarray, moves: np.ndarray) -> tuple[float, int]:
    # The product's one definition (daemon.backtest.metrics.ACCURACY_DEFINITION): calls are
    # sell 0 / hold 1 / buy 2 here, -1 / 0 / +1 there.
    value, judged = direction_accuracy((calls - 1).astype(np.int8), moves)
    return value, judged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"no data at {args.data}: the shared data folder is absent")

    engine = build_engine(EngineSpec("bench", "onnxruntime", args.model))
    m = engine.manifest
    minutes = load_csv(args.data)
    symbols = tuple(sorted({b.symbol for mm in minutes for b in mm.bars}))
    windows = FeatureWindows(symbols, m.window, m.features)
    inputs, last_ret, closes, sym_of = [], [], [], []
    for minute in minutes:
        for bar in minute.bars:
            i = windows.index[bar.symbol]
            prev = windows.last_close[i]
            windows.push(i, bar.ts, bar.open, bar.high, bar.low, bar.close, bar.volume, None)
            if windows.full(i):
                inputs.append(windows.window_of(i))
                last_ret.append(np.log(bar.close / prev) if prev else 0.0)
                closes.append(bar.close)
                sym_of.append(i)
    x = np.stack(inputs)
    logits = np.concatenate([run_batch(engine, x[k : k + 256]) for k in range(0, len(x), 256)])
    calls, _ = classify(logits)
    # The next bar of the same symbol gives the realised move; the last window of each has none.
    moves = np.full(len(x), np.nan)
    last_index: dict[int, int] = {}
    for k, i in enumerate(sym_of):
        if i in last_index:
            j = last_index[i]
            moves[j] = np.log(closes[k] / closes[j])
        last_index[i] = k
    ok = ~np.isnan(moves)
    calls, moves, last_ret_a = calls[ok], moves[ok], np.asarray(last_ret)[ok]
    momentum = np.where(last_ret_a > 0, BUY, np.where(last_ret_a < 0, SELL, 1))
    rows = [
        ("shipped model", *_score(calls, moves)),
        ("momentum (sign of last return)", *_score(momentum, moves)),
        ("always buy", *_score(np.full(len(moves), BUY), moves)),
    ]
    print(f"data {args.data.name}: {len(moves)} windows over {len(symbols)} symbols; model {m.name} {m.version}")
    print(
        f"model calls: buy {(calls == BUY).sum()}  hold {(calls == 1).sum()}  sell {(calls == SELL).sum()}; "
        f"next move flat in {(moves == 0).sum()} windows"
    )
    print()
    print("| predictor | direction accuracy | calls |")
    print("|---|---:|---:|")
    for name, acc, n in rows:
        print(f"| {name} | {acc:.3f} | {n} |")


if __name__ == "__main__":
    main()
