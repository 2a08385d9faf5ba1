"""Brief, seeded training of the signal model on bars: next bar's move as sell / hold / buy."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from daemon.backtest import metrics
from engines.features import DEFAULT_FEATURES, feature_array
from engines.model.qwen_signal import (
    FeatureNorm,
    QwenSignalModel,
    SignalMeta,
    new_model,
    small_config,
)


@dataclass(frozen=True)
class TrainReport:
    steps: int
    seconds: float
    train_loss: float
    holdout_accuracy: float
    holdout_direction_accuracy: float
    holdout_samples: int


def make_dataset(
    series: Sequence[npt.NDArray[np.float64]],
    features: tuple[str, ...],
    window: int,
    hold_band: float,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Windows [N, W, F] of raw features, labels [N] (0 sell, 1 hold, 2 buy), next returns [N]."""
    xs, ys, rs = [], [], []
    for ohlcv in series:
        feats = feature_array(features, ohlcv)
        close = ohlcv[:, 3]
        nxt = np.log(close[1:] / close[:-1])
        for end in range(window, len(ohlcv)):
            r = nxt[end - 1]
            xs.append(feats[end - window : end])
            ys.append(2 if r > hold_band else 0 if r < -hold_band else 1)
            rs.append(r)
    return np.stack(xs).astype(np.float32), np.asarray(ys, dtype=np.int64), np.asarray(rs)


def direction_accuracy(pred: npt.NDArray[np.int64], next_return: npt.NDArray[np.float64]) -> float:
    """The product's one definition (``daemon.backtest.metrics.ACCURACY_DEFINITION``) over
    classes 0 sell / 1 hold / 2 buy: buy and sell calls judged, a flat next move a miss."""
    value, _ = metrics.direction_accuracy((pred - 1).astype(np.int8), next_return.astype(np.float64))
    return value


def train(
    series: Sequence[npt.NDArray[np.float64]],
    *,
    name: str = "qwen-signal",
    version: str = "1.0.0",
    window: int = 16,
    features: tuple[str, ...] = DEFAULT_FEATURES,
    steps: int = 300,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 7,
    hidden: int = 32,
    layers: int = 2,
    progress: Callable[[int, float], None] | None = None,
    data: str = "synthetic bars (tradingd synth)",
) -> tuple[QwenSignalModel, SignalMeta, TrainReport]:
    """Train on per-symbol OHLCV arrays ([T, 5] each, time order); last 20 % of each held out."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    split = [int(len(s) * 0.8) for s in series]
    train_series = [s[:k] for s, k in zip(series, split, strict=True)]
    hold_series = [s[k - window :] for s, k in zip(series, split, strict=True)]
    all_returns = np.concatenate([np.diff(np.log(s[:, 3])) for s in train_series])
    hold_band = float(0.25 * all_returns.std())
    x, y, _ = make_dataset(train_series, features, window, hold_band)
    xh, yh, rh = make_dataset(hold_series, features, window, hold_band)

    flat = x.reshape(-1, x.shape[-1])
    mean, std = flat.mean(axis=0), np.maximum(flat.std(axis=0), 1e-6)
    norms = tuple(FeatureNorm(n, float(m), float(s)) for n, m, s in zip(features, mean, std, strict=True))

    def normalise(a: npt.NDArray[np.float32]) -> torch.Tensor:
        return torch.from_numpy(np.clip((a - mean) / std, -5.0, 5.0).astype(np.float32))

    meta = SignalMeta(name=name, version=version, window=window, features=norms)
    model = new_model(
        meta,
        small_config(window=window, hidden=hidden, layers=layers, intermediate=3 * hidden),
        seed,
    )
    model.train()
    xt, yt = normalise(x), torch.from_numpy(y)
    counts = np.bincount(y, minlength=3).astype(np.float64)
    weights = torch.tensor(counts.sum() / (3 * np.maximum(counts, 1)), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    started = time.perf_counter()
    loss_value = float("nan")
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(xt), size=batch_size))
        loss = loss_fn(model(xt[idx]), yt[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        loss_value = float(loss.detach())
        if progress is not None and (step % 25 == 0 or step == steps):
            progress(step, loss_value)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(normalise(xh[i : i + 1024])).argmax(-1) for i in range(0, len(xh), 1024)]).numpy()
    report = TrainReport(
        steps=steps,
        seconds=time.perf_counter() - started,
        train_loss=loss_value,
        holdout_accuracy=float((pred == yh).mean()),
        holdout_direction_accuracy=direction_accuracy(pred, rh),
        holdout_samples=len(yh),
    )
    training = {
        "data": data,
        "steps": steps,
        "seed": seed,
        "hold_band": hold_band,
        "holdout_accuracy": round(report.holdout_accuracy, 4),
        "holdout_direction_accuracy": round(report.holdout_direction_accuracy, 4),
    }
    meta = SignalMeta(name=name, version=version, window=window, features=norms, training=training)
    return model, meta, report
