"""A backtest's performance and accuracy metrics, and the qualification gates over them.

Pure numpy over frozen inputs: one row per portfolio bar (``Series``), one record per fill
(``Trade``) and one per model call (``Calls``). Ratios use per-bar simple returns, a risk-free
rate of zero and the annualisation factor of the data's session (``detect_session``), so that
``empyrical`` and ``quantstats`` given the same factor agree with them (the tests check).

The scalar functions return NaN (or inf) where a value is undefined; ``compute`` turns those
into ``None`` so that its dict is JSON as it stands, and a ``None`` never passes a gate.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

NS_PER_SECOND = 1_000_000_000
NS_PER_MINUTE = 60 * NS_PER_SECOND
NS_PER_DAY = 1440 * NS_PER_MINUTE

ACCURACY_DEFINITION = (
    "Direction accuracy is the share of buy and sell calls with a known next close whose next "
    "close-to-close move went the called way (up for buy, down for sell); a flat move counts as "
    "wrong, and holds are not judged."
)

CALL_CLASSES = ("sell", "hold", "buy")
MOVE_CLASSES = ("down", "flat", "up")


@dataclass(frozen=True)
class Annualisation:
    """How many per-bar returns make a year."""

    name: str
    minutes_per_day: int
    days_per_year: int

    @property
    def periods_per_year(self) -> int:
        return self.minutes_per_day * self.days_per_year


SESSIONS: dict[str, Annualisation] = {
    "us_equity": Annualisation("us_equity", 390, 252),
    "24h": Annualisation("24h", 1440, 365),
    "daily": Annualisation("daily", 1, 252),  # one bar a trading day
}

_US_SESSION_MAX_SPAN_MINUTES = 7 * 60
_US_SESSION_MAX_MINUTES = 400


def detect_session(bar_ts_ns: npt.NDArray[np.int64]) -> Annualisation:
    """US equity hours if a typical UTC day's bars span at most 7 h (or hold at most 400
    distinct minutes) and no bar falls on a Saturday or Sunday; around the clock otherwise."""
    if len(bar_ts_ns) == 0:
        raise ValueError("detect_session needs at least one bar timestamp")
    # A bar closing at midnight belongs to the day before (its ts is its close).
    minutes = np.unique((np.asarray(bar_ts_ns, dtype=np.int64) - 1) // NS_PER_MINUTE)
    days, first, counts = np.unique(minutes // 1440, return_index=True, return_counts=True)
    if len(days) > 1 and float(np.median(counts)) <= 1.0 and float(np.median(np.diff(days))) >= 1.0:
        return SESSIONS["daily"]
    if np.any((days + 3) % 7 >= 5):  # 1970-01-01 was a Thursday; Monday is 0
        return SESSIONS["24h"]
    spans = minutes[first + counts - 1] - minutes[first]
    typical_span, typical_count = float(np.median(spans)), float(np.median(counts))
    if typical_span <= _US_SESSION_MAX_SPAN_MINUTES or typical_count <= _US_SESSION_MAX_MINUTES:
        return SESSIONS["us_equity"]
    return SESSIONS["24h"]


@dataclass(frozen=True)
class Series:
    """The portfolio per bar, in time order; the first row is the starting capital."""

    ts_ns: IntArray
    equity: FloatArray
    benchmark: FloatArray

    def __post_init__(self) -> None:
        n = len(self.ts_ns)
        if n == 0 or len(self.equity) != n or len(self.benchmark) != n:
            raise ValueError(
                f"Series needs equal, non-zero lengths: ts_ns {n}, equity {len(self.equity)}, "
                f"benchmark {len(self.benchmark)}"
            )
        if np.any(np.diff(self.ts_ns) < 0):
            raise ValueError("Series.ts_ns must be in time order")
        for name in ("equity", "benchmark"):
            values = getattr(self, name)
            if not np.all(np.isfinite(values) & (values > 0)):
                raise ValueError(f"Series.{name} must be finite and positive at every bar")


@dataclass(frozen=True)
class Trade:
    """One fill; ``cost`` is what it paid in commission and slippage, in account currency."""

    ts_ns: int
    symbol: str
    side: str
    qty: int
    price: float
    cost: float
    order_id: str


@dataclass(frozen=True)
class Calls:
    """Every model call, one per inferred row: the call, its confidence and the move that followed."""

    signal: npt.NDArray[np.int8]
    confidence: FloatArray
    next_return: FloatArray

    def __post_init__(self) -> None:
        n = len(self.signal)
        if len(self.confidence) != n or len(self.next_return) != n:
            raise ValueError(
                f"Calls needs equal lengths: signal {n}, confidence {len(self.confidence)}, "
                f"next_return {len(self.next_return)}"
            )
        if not np.all(np.isin(self.signal, (-1, 0, 1))):
            raise ValueError("Calls.signal must hold only -1 (sell), 0 (hold) and +1 (buy)")
        if not np.all(np.isfinite(self.confidence)):
            raise ValueError("Calls.confidence must be finite for every call")


# --- returns and drawdowns ------------------------------------------------------------------


def bar_returns(equity: FloatArray) -> FloatArray:
    """Simple return of each bar over the one before (one fewer than the bars)."""
    e = np.asarray(equity, dtype=np.float64)
    return e[1:] / e[:-1] - 1.0


def drawdown(equity: FloatArray) -> FloatArray:
    """Each bar's fraction below the running peak (zero at a peak, negative under water)."""
    e = np.asarray(equity, dtype=np.float64)
    return e / np.maximum.accumulate(e) - 1.0


def max_drawdown(equity: FloatArray) -> float:
    """The deepest drawdown as a positive fraction (0.08 for a fall of 8 % from a peak)."""
    return abs(float(drawdown(equity).min())) if len(equity) else math.nan


def max_drawdown_duration(ts_ns: IntArray, equity: FloatArray) -> tuple[int, float]:
    """The longest spell under water, from its peak to the bar back at that peak (or the last
    bar, if it never gets back), by time: its length in bars and in seconds."""
    e = np.asarray(equity, dtype=np.float64)
    under = e < np.maximum.accumulate(e)
    if not under.any():
        return 0, 0.0
    index = np.arange(len(e))
    last_peak = np.maximum.accumulate(np.where(under, 0, index))
    ends = np.flatnonzero(under[:-1] & ~under[1:]) + 1
    if under[-1]:
        ends = np.append(ends, len(e) - 1)
    starts = last_peak[ends - 1]
    seconds = (np.asarray(ts_ns, dtype=np.int64)[ends] - np.asarray(ts_ns, dtype=np.int64)[starts]) / NS_PER_SECOND
    longest = int(np.argmax(seconds))
    return int(ends[longest] - starts[longest]), float(seconds[longest])


def daily_pnl(ts_ns: IntArray, equity: FloatArray) -> tuple[list[str], FloatArray]:
    """Profit per UTC calendar day with bars: the day's last equity minus the previous day's
    last (the first day's, minus the starting equity)."""
    if len(ts_ns) == 0:
        return [], np.zeros(0)
    e = np.asarray(equity, dtype=np.float64)
    day = (np.asarray(ts_ns, dtype=np.int64) - 1) // NS_PER_DAY  # a bar's ts is its close
    last = np.append(np.flatnonzero(np.diff(day) != 0), len(day) - 1)
    closes = e[last]
    pnl = closes - np.append(e[0], closes[:-1])
    epoch = dt.date(1970, 1, 1)
    return [(epoch + dt.timedelta(days=int(d))).isoformat() for d in day[last]], pnl


def losing_days_in_a_row(pnl: FloatArray) -> int:
    """The longest run of consecutive days with a loss (pnl < 0)."""
    longest = run = 0
    for losing in np.asarray(pnl) < 0:
        run = run + 1 if losing else 0
        longest = max(longest, run)
    return longest


# --- return ratios --------------------------------------------------------------------------


def total_return(equity: FloatArray) -> float:
    """Final over initial equity, minus one."""
    return float(equity[-1] / equity[0] - 1.0) if len(equity) else math.nan


def annual_return(equity: FloatArray, periods_per_year: int) -> float:
    """Geometric: (final / initial) ** (periods_per_year / returns) - 1."""
    n = len(equity) - 1
    if n < 1:
        return math.nan
    with np.errstate(over="ignore"):
        return float(np.float64(equity[-1] / equity[0]) ** (periods_per_year / n) - 1.0)


def volatility(returns: FloatArray, periods_per_year: int) -> float:
    """Annualised sample standard deviation (ddof=1) of the per-bar returns."""
    if len(returns) < 2:
        return math.nan
    return float(np.std(returns, ddof=1)) * math.sqrt(periods_per_year)


def _per_period_sharpe(returns: FloatArray) -> float:
    if len(returns) < 2:
        return math.nan
    mean, std = float(np.mean(returns)), float(np.std(returns, ddof=1))
    # Constant returns leave a rounding residue for a standard deviation, not a risk to divide by.
    return mean / std if std > 1e-12 * abs(mean) and std > 0 else math.nan


def sharpe(returns: FloatArray, periods_per_year: int) -> float:
    """Annualised Sharpe ratio: mean over sample standard deviation (ddof=1), risk-free zero."""
    return _per_period_sharpe(returns) * math.sqrt(periods_per_year)


def sortino(returns: FloatArray, periods_per_year: int) -> float:
    """Annualised Sortino ratio, downside deviation as empyrical's: sqrt(mean(min(r, 0) ** 2))."""
    if len(returns) < 1:
        return math.nan
    mean = float(np.mean(returns))
    downside = math.sqrt(float(np.mean(np.minimum(returns, 0.0) ** 2)))
    if downside == 0:
        return math.inf if mean > 0 else math.nan
    return mean / downside * math.sqrt(periods_per_year)


def calmar(annual: float, max_dd: float) -> float:
    """Annualised return over maximum drawdown (undefined without a drawdown)."""
    return annual / max_dd if max_dd > 0 and math.isfinite(annual) else math.nan


def probabilistic_sharpe(returns: FloatArray, benchmark_sharpe: float = 0.0) -> float:
    """Probability that the true Sharpe ratio exceeds ``benchmark_sharpe`` (both per period),
    given the sample's length, skewness and kurtosis (Bailey and López de Prado, 2012)."""
    sr = _per_period_sharpe(returns)
    if not math.isfinite(sr):
        return math.nan
    centred = returns - np.mean(returns)
    m2 = float(np.mean(centred**2))
    skew = float(np.mean(centred**3)) / m2**1.5
    kurtosis = float(np.mean(centred**4)) / m2**2
    variance = 1.0 - skew * sr + (kurtosis - 1.0) / 4.0 * sr**2
    if variance <= 0:
        return math.nan
    z = (sr - benchmark_sharpe) * math.sqrt(len(returns) - 1) / math.sqrt(variance)
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def hit_rate(pnl: FloatArray) -> float:
    """Share of winning days among the days that made or lost money (flat days are left out)."""
    decided = np.asarray(pnl)[np.asarray(pnl) != 0]
    return float(np.mean(decided > 0)) if len(decided) else math.nan


# --- accuracy -------------------------------------------------------------------------------


def direction_hits(signal: npt.NDArray[np.int8], next_return: FloatArray) -> BoolArray:
    """For each judged call, in order, whether it was right (see ``ACCURACY_DEFINITION``)."""
    judged = (signal != 0) & np.isfinite(next_return)
    return np.asarray(np.sign(next_return[judged]) == signal[judged], dtype=np.bool_)


def direction_accuracy(signal: npt.NDArray[np.int8], next_return: FloatArray) -> tuple[float, int]:
    """The product's accuracy (``ACCURACY_DEFINITION``) and how many calls it judged."""
    hits = direction_hits(signal, next_return)
    return (float(np.mean(hits)) if len(hits) else math.nan), len(hits)


def confusion(signal: npt.NDArray[np.int8], next_return: FloatArray) -> IntArray:
    """3x3 counts over calls with a known next move: rows call sell/hold/buy, cols move down/flat/up."""
    known = np.isfinite(next_return)
    rows = np.asarray(signal[known], dtype=np.int64) + 1
    cols = np.sign(next_return[known]).astype(np.int64) + 1
    matrix = np.zeros((3, 3), dtype=np.int64)
    np.add.at(matrix, (rows, cols), 1)
    return matrix


def balanced_accuracy(matrix: IntArray) -> float:
    """Mean recall per realised move (sell for down, hold for flat, buy for up), over the moves seen."""
    support = matrix.sum(axis=0)
    seen = support > 0
    return float(np.mean(np.diag(matrix)[seen] / support[seen])) if seen.any() else math.nan


def matthews(matrix: IntArray) -> float:
    """Multiclass Matthews correlation coefficient (Gorodkin's R_K); NaN where it is undefined."""
    m = np.asarray(matrix, dtype=np.float64)
    n, correct = m.sum(), np.trace(m)
    calls, moves = m.sum(axis=1), m.sum(axis=0)
    denominator = math.sqrt((n * n - calls @ calls) * (n * n - moves @ moves))
    return float(correct * n - calls @ moves) / denominator if denominator > 0 else math.nan


def pearson(x: FloatArray, y: FloatArray) -> float:
    """Pearson correlation; NaN with fewer than two points or a constant input."""
    if len(x) < 2:
        return math.nan
    xc, yc = x - np.mean(x), y - np.mean(y)
    denominator = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc) / denominator if denominator > 0 else math.nan


def average_ranks(x: FloatArray) -> FloatArray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x: FloatArray, y: FloatArray) -> float:
    """Spearman rank correlation with average ranks for ties."""
    return pearson(average_ranks(x), average_ranks(y))


# --- everything at once ---------------------------------------------------------------------


class AnnualisationDict(TypedDict):
    name: str
    minutes_per_day: int
    days_per_year: int
    periods_per_year: int


class ClassBalance(TypedDict):
    calls: dict[str, int]
    moves: dict[str, int]


class Metrics(TypedDict):
    """What ``compute`` returns; fractions are fractions (0.08, not 8), ``None`` where undefined."""

    annualisation: AnnualisationDict
    bars: int
    start_equity: float
    final_equity: float
    total_return: float | None
    annual_return: float | None
    benchmark_total_return: float | None
    benchmark_annual_return: float | None
    excess_return: float | None
    volatility: float | None
    sharpe: float | None
    probabilistic_sharpe: float | None
    sortino: float | None
    calmar: float | None
    max_drawdown: float | None
    max_drawdown_bars: int
    max_drawdown_seconds: float
    days: int
    losing_days_in_a_row: int
    hit_rate: float | None
    trades: int
    traded_notional: float
    turnover: float | None
    turnover_per_year: float | None
    costs: float
    calls: int
    accuracy: float | None
    accuracy_judged: int
    accuracy_definition: str
    class_balance: ClassBalance
    confusion: list[list[int]]
    balanced_accuracy: float | None
    mcc: float | None
    ic: float | None
    rank_ic: float | None


def finite_or_none(x: float) -> float | None:
    """The value, or ``None`` where it is NaN or infinite (JSON has neither)."""
    return float(x) if math.isfinite(x) else None


def compute(series: Series, trades: Sequence[Trade], calls: Calls, annualisation: Annualisation) -> Metrics:
    """Every metric of one backtest, as a JSON-ready dict."""
    ppy = annualisation.periods_per_year
    equity, bench = series.equity, series.benchmark
    returns = bar_returns(equity)
    annual, bench_annual = annual_return(equity, ppy), annual_return(bench, ppy)
    max_dd = max_drawdown(equity)
    dd_bars, dd_seconds = max_drawdown_duration(series.ts_ns, equity)
    days, pnl = daily_pnl(series.ts_ns, equity)
    notional = float(sum(t.qty * t.price for t in trades))
    turnover = notional / float(np.mean(equity))
    accuracy, judged = direction_accuracy(calls.signal, calls.next_return)
    matrix = confusion(calls.signal, calls.next_return)
    known = np.isfinite(calls.next_return)
    scores = calls.signal[known] * calls.confidence[known]
    return {
        "annualisation": {
            "name": annualisation.name,
            "minutes_per_day": annualisation.minutes_per_day,
            "days_per_year": annualisation.days_per_year,
            "periods_per_year": ppy,
        },
        "bars": len(equity),
        "start_equity": float(equity[0]),
        "final_equity": float(equity[-1]),
        "total_return": finite_or_none(total_return(equity)),
        "annual_return": finite_or_none(annual),
        "benchmark_total_return": finite_or_none(total_return(bench)),
        "benchmark_annual_return": finite_or_none(bench_annual),
        "excess_return": finite_or_none(annual - bench_annual),
        "volatility": finite_or_none(volatility(returns, ppy)),
        "sharpe": finite_or_none(sharpe(returns, ppy)),
        "probabilistic_sharpe": finite_or_none(probabilistic_sharpe(returns)),
        "sortino": finite_or_none(sortino(returns, ppy)),
        "calmar": finite_or_none(calmar(annual, max_dd)),
        "max_drawdown": finite_or_none(max_dd),
        "max_drawdown_bars": dd_bars,
        "max_drawdown_seconds": dd_seconds,
        "days": len(days),
        "losing_days_in_a_row": losing_days_in_a_row(pnl),
        "hit_rate": finite_or_none(hit_rate(pnl)),
        "trades": len(trades),
        "traded_notional": notional,
        "turnover": finite_or_none(turnover),
        "turnover_per_year": finite_or_none(turnover * ppy / len(returns) if len(returns) else math.nan),
        "costs": float(sum(t.cost for t in trades)),
        "calls": len(calls.signal),
        "accuracy": finite_or_none(accuracy),
        "accuracy_judged": judged,
        "accuracy_definition": ACCURACY_DEFINITION,
        "class_balance": {
            "calls": {c: int(np.sum(calls.signal == s)) for c, s in zip(CALL_CLASSES, (-1, 0, 1), strict=True)},
            "moves": dict(zip(MOVE_CLASSES, (int(v) for v in matrix.sum(axis=0)), strict=True)),
        },
        "confusion": [[int(v) for v in row] for row in matrix],
        "balanced_accuracy": finite_or_none(balanced_accuracy(matrix)),
        "mcc": finite_or_none(matthews(matrix)),
        "ic": finite_or_none(pearson(scores, calls.next_return[known])),
        "rank_ic": finite_or_none(spearman(scores, calls.next_return[known])),
    }


# --- qualification gates --------------------------------------------------------------------


@dataclass(frozen=True)
class GateSpec:
    """The qualification thresholds (the ``[qualification]`` config section)."""

    min_excess_return: float = 0.15
    max_drawdown: float = 0.08
    max_losing_days_in_a_row: int = 3
    min_sharpe: float = 2.0
    min_accuracy: float = 0.65
    min_trades: int = 20
    min_days: int = 5


Gate = TypedDict("Gate", {"value": float | int | None, "threshold": float | int, "op": str, "pass": bool})


def _gate(value: float | int | None, op: str, threshold: float | int) -> Gate:
    if value is None or not math.isfinite(value):
        return {"value": None, "threshold": threshold, "op": op, "pass": False}
    passed = value >= threshold if op == ">=" else value <= threshold
    return {"value": value, "threshold": threshold, "op": op, "pass": passed}


def gates(metrics: Metrics, spec: GateSpec) -> dict[str, Gate]:
    """Each gate's value, threshold, comparison and outcome; a missing value never passes."""
    return {
        "excess_return": _gate(metrics["excess_return"], ">=", spec.min_excess_return),
        "max_drawdown": _gate(metrics["max_drawdown"], "<=", spec.max_drawdown),
        "losing_days_in_a_row": _gate(metrics["losing_days_in_a_row"], "<=", spec.max_losing_days_in_a_row),
        "sharpe": _gate(metrics["sharpe"], ">=", spec.min_sharpe),
        "accuracy": _gate(metrics["accuracy"], ">=", spec.min_accuracy),
        "trades": _gate(metrics["trades"], ">=", spec.min_trades),
        "days": _gate(metrics["days"], ">=", spec.min_days),
    }


def verdict(gate_results: Mapping[str, Gate]) -> bool:
    """Qualified: there are gates and every one passes."""
    return bool(gate_results) and all(g["pass"] for g in gate_results.values())
