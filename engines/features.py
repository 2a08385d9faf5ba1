"""Bar features the signal model is trained on, named in its manifest.

One definition serves both the daemon (one bar at a time, on the hot path) and training (whole
arrays at once), so the two can never drift apart. Raw features go into the windows; the
manifest's z-score normalisation is applied to the whole batch at gather time.

Neither form raises on any float input: where a log is undefined both give what numpy gives
(inf, -inf or nan), and the caller decides what a non-finite feature means (the feature
windows refuse the bar). The feed's price bounds keep every ratio of an accepted bar finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

# name -> (scalar form over open, high, low, close, volume, previous close; vector form)
_ScalarFn = Callable[[float, float, float, float, float, float], float]


def _log(x: float) -> float:
    # numpy's log without its exceptions: -inf at 0, nan below 0 and for nan, inf at inf.
    if x > 0.0:
        return math.log(x)
    return -math.inf if x == 0.0 else math.nan


def _log_ratio(a: float, b: float) -> float:
    # log(a / b) as numpy computes it in float64: never raises, may return inf or nan.
    if b > 0.0 and math.isfinite(b):
        return _log(a / b)
    with np.errstate(all="ignore"):
        return float(np.log(np.float64(a) / np.float64(b)))


def _log_return(o: float, h: float, lo: float, c: float, v: float, pc: float) -> float:
    return _log_ratio(c, pc) if pc > 0.0 else 0.0


def _log_range(o: float, h: float, lo: float, c: float, v: float, pc: float) -> float:
    return _log_ratio(h, lo)


def _log_body(o: float, h: float, lo: float, c: float, v: float, pc: float) -> float:
    return _log_ratio(c, o)


def _upper_wick(o: float, h: float, lo: float, c: float, v: float, pc: float) -> float:
    return _log_ratio(h, max(o, c) + 0.0)  # + 0.0: -0.0 becomes 0.0, as in the vector form


def _lower_wick(o: float, h: float, lo: float, c: float, v: float, pc: float) -> float:
    return _log_ratio(min(o, c) + 0.0, lo)


def _log_volume(o: float, h: float, lo: float, c: float, v: float, pc: float) -> float:
    if v > -1.0:
        return math.log1p(v)
    return -math.inf if v == -1.0 else math.nan


SCALAR_FEATURES: dict[str, _ScalarFn] = {
    "log_return": _log_return,
    "log_range": _log_range,
    "log_body": _log_body,
    "upper_wick": _upper_wick,
    "lower_wick": _lower_wick,
    "log_volume": _log_volume,
}

DEFAULT_FEATURES: tuple[str, ...] = tuple(SCALAR_FEATURES)


def feature_row_fn(names: tuple[str, ...]) -> Callable[..., list[float]]:
    """Bind the named features, in order, into one function of a bar returning a list."""
    unknown = [n for n in names if n not in SCALAR_FEATURES]
    if unknown:
        raise KeyError(f"unknown features {unknown}; known: {sorted(SCALAR_FEATURES)}")
    fns = tuple(SCALAR_FEATURES[n] for n in names)

    def row(o: float, h: float, lo: float, c: float, v: float, pc: float) -> list[float]:
        return [fn(o, h, lo, c, v, pc) for fn in fns]

    return row


_MATRIX_ROWS = {name: k for k, name in enumerate(DEFAULT_FEATURES)}  # feature_matrix's rows


def feature_matrix(
    names: tuple[str, ...],
    o: npt.NDArray[np.float64],
    h: npt.NDArray[np.float64],
    lo: npt.NDArray[np.float64],
    c: npt.NDArray[np.float64],
    v: npt.NDArray[np.float64],
    pc: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """The vector form, one row per feature: [F, n] float64, bar k's features in column k,
    each bar with its own previous close ``pc`` (0 where there is none, making the return 0 as
    the scalar form does). A feature's row is contiguous, so whole-row arithmetic is cheap."""
    unknown = [name for name in names if name not in _MATRIX_ROWS]
    if unknown:
        raise KeyError(f"unknown features {unknown}; known: {sorted(_MATRIX_ROWS)}")
    n = len(c)
    out = np.empty((len(DEFAULT_FEATURES), n), dtype=np.float64)
    with np.errstate(all="ignore"):  # as the scalar form: inf or nan where a log is undefined
        # Five of the six are logs of ratios: one division and one log over a [5, n] block.
        den = np.empty((5, n), dtype=np.float64)
        has_prev = pc > 0.0
        out[0], den[0] = c, np.where(has_prev, pc, 1.0)
        out[1], den[1] = h, lo
        out[2], den[2] = c, o
        # Python's max(o, c) and min(o, c), NaN included: o unless c compares past it.
        out[3] = h
        den[3] = np.where(c > o, c, o) + 0.0
        out[4] = np.where(c < o, c, o) + 0.0
        den[4] = lo
        logs = out[:5]
        np.divide(logs, den, out=logs)
        np.log(logs, out=logs)
        if not has_prev.all():
            logs[0][~has_prev] = 0.0
        np.log1p(v, out=out[5])
    if names == DEFAULT_FEATURES:
        return out
    return out[[_MATRIX_ROWS[name] for name in names]]


def feature_columns(
    names: tuple[str, ...],
    o: npt.NDArray[np.float64],
    h: npt.NDArray[np.float64],
    lo: npt.NDArray[np.float64],
    c: npt.NDArray[np.float64],
    v: npt.NDArray[np.float64],
    pc: npt.NDArray[np.float64],
) -> FloatArray:
    """``feature_matrix`` as rows of bars: [n, F] float32."""
    return np.ascontiguousarray(feature_matrix(names, o, h, lo, c, v, pc).T, dtype=np.float32)


def feature_array(names: tuple[str, ...], ohlcv: npt.NDArray[np.float64]) -> FloatArray:
    """Features for one symbol's bars in time order: ``ohlcv`` [T, 5] -> [T, F] float32.

    The first bar has no previous close, so its return is 0, as on the hot path.
    """
    o, h, lo, c, v = (ohlcv[:, i] for i in range(5))
    pc = np.concatenate(([0.0], c[:-1]))
    return feature_columns(names, o, h, lo, c, v, pc)
