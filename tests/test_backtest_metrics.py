"""The backtest's metrics against empyrical and quantstats and against hand computations; the
qualification gates; the report's files."""

from __future__ import annotations

import csv
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from statistics import NormalDist
from typing import Any, cast

import numpy as np
import orjson
import pytest

from daemon.backtest.metrics import (
    ACCURACY_DEFINITION,
    SESSIONS,
    Annualisation,
    Calls,
    GateSpec,
    Metrics,
    Series,
    Trade,
    annual_return,
    average_ranks,
    balanced_accuracy,
    bar_returns,
    calmar,
    compute,
    confusion,
    daily_pnl,
    detect_session,
    direction_accuracy,
    gates,
    losing_days_in_a_row,
    matthews,
    max_drawdown,
    max_drawdown_duration,
    probabilistic_sharpe,
    sharpe,
    sortino,
    spearman,
    verdict,
    volatility,
)
from daemon.backtest.report import ReportDependencyError, write_report
from daemon.feed.replay import load_csv
from tests.conftest import SPY_DAILY_CSV

MINUTE = 60 * 10**9
DAY = 1440 * MINUTE
MONDAY = int(np.datetime64("2013-10-07T00:00", "ns").astype(np.int64))
DAILY = Annualisation("custom", 1, 252)  # one bar a day


def _quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    # pandas and quantstats warn about their own internals; the project turns warnings into errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(*args, **kwargs))


def _us_session_ts(days: int) -> np.ndarray:
    """Bar close times of ``days`` weekdays of US hours (13:31 to 20:00 UTC), from a Monday."""
    weekdays = [d for d in range(days * 7 // 5 + 7) if d % 7 < 5][:days]
    return np.concatenate([MONDAY + d * DAY + (13 * 60 + 31 + np.arange(390)) * MINUTE for d in weekdays])


def _random_equity(seed: int, n: int, drift: float = 5e-5, scale: float = 8e-4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    returns = drift + scale * rng.standard_t(4, n - 1)  # fat tails, as minute returns have
    return 100_000.0 * np.cumprod(np.r_[1.0, 1.0 + returns])


def _spy_closes() -> np.ndarray:
    if not SPY_DAILY_CSV.is_file():
        pytest.skip(f"real SPY daily bars not found at {SPY_DAILY_CSV} (the shared data folder is absent)")
    with SPY_DAILY_CSV.open() as f:
        return np.array([float(row["close"]) for row in csv.DictReader(f)])


# A known curve: a 10 % fall from 110 to 99, back above the peak three bars after it, then under again.
HAND_EQUITY = np.array([100.0, 110.0, 99.0, 104.5, 121.0, 115.0])


def _curves() -> list[tuple[str, np.ndarray, Annualisation]]:
    return [
        ("random us_equity", _random_equity(1, 390 * 20), SESSIONS["us_equity"]),
        ("random 24h", _random_equity(2, 1440 * 10, drift=-2e-5), SESSIONS["24h"]),
        ("hand-made", HAND_EQUITY, DAILY),
    ]


CURVE_IDS = ["random-us_equity", "random-24h", "hand-made", "spy-daily"]


@pytest.fixture(params=range(4), ids=CURVE_IDS)
def curve(request: pytest.FixtureRequest) -> tuple[np.ndarray, Annualisation]:
    if request.param == 3:
        return _spy_closes(), DAILY
    _, equity, annualisation = _curves()[request.param]
    return equity, annualisation


def _ours(equity: np.ndarray, ppy: int) -> dict[str, float]:
    r = bar_returns(equity)
    annual = annual_return(equity, ppy)
    return {
        "sharpe": sharpe(r, ppy),
        "sortino": sortino(r, ppy),
        "max_drawdown": max_drawdown(equity),
        "annual_return": annual,
        "calmar": calmar(annual, max_drawdown(equity)),
        "volatility": volatility(r, ppy),
    }


def test_ratios_when_checked_against_empyrical_agree(curve: tuple[np.ndarray, Annualisation]) -> None:
    ep = pytest.importorskip("empyrical")
    equity, annualisation = curve
    ppy = annualisation.periods_per_year
    r = bar_returns(equity)
    theirs = {
        "sharpe": _quiet(ep.sharpe_ratio, r, annualization=ppy),
        "sortino": _quiet(ep.sortino_ratio, r, annualization=ppy),
        "max_drawdown": -_quiet(ep.max_drawdown, r),
        "annual_return": _quiet(ep.annual_return, r, annualization=ppy),
        "calmar": _quiet(ep.calmar_ratio, r, annualization=ppy),
        "volatility": _quiet(ep.annual_volatility, r, annualization=ppy),
    }
    assert _ours(equity, ppy) == pytest.approx(theirs, rel=1e-9)


def test_ratios_when_checked_against_quantstats_agree(curve: tuple[np.ndarray, Annualisation]) -> None:
    pd = pytest.importorskip("pandas")
    qs = pytest.importorskip("quantstats")
    equity, annualisation = curve
    ppy = annualisation.periods_per_year
    r = pd.Series(bar_returns(equity), index=pd.date_range("2000-01-03", periods=len(equity) - 1, freq="min"))
    theirs = {
        "sharpe": _quiet(qs.stats.sharpe, r, periods=ppy),
        "sortino": _quiet(qs.stats.sortino, r, periods=ppy),
        "max_drawdown": -_quiet(qs.stats.max_drawdown, r),
        "annual_return": _quiet(qs.stats.cagr, r, periods=ppy),
        "calmar": _quiet(qs.stats.calmar, r, periods=ppy),
        "volatility": _quiet(qs.stats.volatility, r, periods=ppy),
    }
    assert _ours(equity, ppy) == pytest.approx(theirs, rel=1e-9)


def test_max_drawdown_when_the_curve_falls_ten_percent_from_its_peak_is_the_fall_and_its_spell() -> None:
    ts = MONDAY + np.arange(len(HAND_EQUITY)) * MINUTE
    assert max_drawdown(HAND_EQUITY) == pytest.approx(0.10)
    # Peak at bar 1, back above it at bar 4: three bars, three minutes (the later dip is one bar).
    assert max_drawdown_duration(ts, HAND_EQUITY) == (3, 180.0)
    assert max_drawdown_duration(ts, np.array([1.0, 2.0, 3.0])) == (0, 0.0)


def test_max_drawdown_duration_when_never_recovered_runs_to_the_last_bar() -> None:
    ts = MONDAY + np.arange(5) * MINUTE
    assert max_drawdown_duration(ts, np.array([100.0, 90.0, 120.0, 110.0, 115.0])) == (2, 120.0)


def test_daily_pnl_when_bars_straddle_midnight_utc_splits_there_and_starts_from_initial_equity() -> None:
    """Times are bar closes: the bar that closes at midnight is the day before's last."""
    ts = np.array([MONDAY - 2 * MINUTE, MONDAY - MINUTE, MONDAY, MONDAY + MINUTE, MONDAY + DAY, MONDAY + DAY + MINUTE])
    equity = np.array([100.0, 103.0, 104.0, 101.0, 99.0, 98.0])
    days, pnl = daily_pnl(ts, equity)
    assert days == ["2013-10-06", "2013-10-07", "2013-10-08"]
    assert pnl.tolist() == [4.0, -5.0, -1.0]


def test_losing_days_in_a_row_when_a_flat_day_interrupts_restarts_the_count() -> None:
    assert losing_days_in_a_row(np.array([1.0, -1.0, -2.0, 0.0, -1.0, -1.0, -1.0, 2.0])) == 3
    assert losing_days_in_a_row(np.array([1.0, 2.0])) == 0
    assert losing_days_in_a_row(np.array([])) == 0


def test_direction_accuracy_when_moves_are_flat_unknown_or_holds_judges_only_known_directional_calls() -> None:
    signal = np.array([1, 1, -1, -1, 1, 0, 0, -1], dtype=np.int8)
    nxt = np.array([0.01, -0.01, -0.02, 0.0, 0.0, 0.03, -0.03, np.nan])
    # Judged: the first five (holds and the unknown next move are not); right: the 1st and 3rd.
    assert direction_accuracy(signal, nxt) == (0.4, 5)
    value, judged = direction_accuracy(np.zeros(3, dtype=np.int8), np.ones(3))
    assert math.isnan(value) and judged == 0
    assert "flat" in ACCURACY_DEFINITION and "holds are not judged" in ACCURACY_DEFINITION


SIGNAL = np.array([-1, -1, -1, 0, 0, 1, 1, 1, 1, 0, -1, 1], dtype=np.int8)
NEXT = np.array([-0.1, 0.2, 0.0, 0.0, -0.3, 0.1, 0.2, -0.1, 0.0, 0.1, -0.2, np.nan])


def test_confusion_when_calls_and_moves_are_known_counts_rows_by_call_and_columns_by_move() -> None:
    matrix = confusion(SIGNAL, NEXT)
    assert matrix.tolist() == [[2, 1, 1], [1, 1, 1], [1, 1, 2]]
    # Recall per move: down 2/4, flat 1/3, up 2/4.
    assert balanced_accuracy(matrix) == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    # Gorodkin: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), s=11, c=5.
    calls, moves = [4, 3, 4], [4, 3, 4]
    expected = (5 * 11 - np.dot(calls, moves)) / math.sqrt((121 - np.dot(calls, calls)) * (121 - np.dot(moves, moves)))
    assert matthews(matrix) == pytest.approx(expected)


def test_confusion_scores_when_checked_against_sklearn_agree() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    signal = rng.integers(-1, 2, 500).astype(np.int8)
    nxt = np.where(rng.random(500) < 0.1, 0.0, rng.normal(0, 1, 500) + 0.5 * signal)
    moved = np.sign(nxt).astype(int)
    matrix = confusion(signal, nxt)
    assert balanced_accuracy(matrix) == pytest.approx(skm.balanced_accuracy_score(moved, signal))
    assert matthews(matrix) == pytest.approx(skm.matthews_corrcoef(moved, signal))


def test_rank_ic_when_values_tie_uses_average_ranks() -> None:
    x = np.array([0.5, 0.5, -0.7, 0.0, 0.0, 0.0, 0.9])
    y = np.array([1.0, 2.0, -1.0, 0.5, 0.5, -0.2, 3.0])
    assert average_ranks(x).tolist() == [5.5, 5.5, 1.0, 3.0, 3.0, 3.0, 7.0]
    assert average_ranks(y).tolist() == [5.0, 6.0, 1.0, 3.5, 3.5, 2.0, 7.0]
    rx, ry = average_ranks(x), average_ranks(y)
    hand = np.corrcoef(rx, ry)[0, 1]
    assert spearman(x, y) == pytest.approx(hand)
    pd = pytest.importorskip("pandas")
    assert spearman(x, y) == pytest.approx(pd.Series(x).corr(pd.Series(y), method="spearman"))


def test_probabilistic_sharpe_when_returns_take_two_values_matches_the_closed_form() -> None:
    """Returns a +/- b alternately: skewness 0 and kurtosis 1, so PSR = Phi(SR * sqrt(n - 1))."""
    n, a, b = 100, 0.001, 0.01
    r = a + b * np.tile([1.0, -1.0], n // 2)
    sr = a / (b * math.sqrt(n / (n - 1)))
    assert probabilistic_sharpe(r) == pytest.approx(NormalDist().cdf(sr * math.sqrt(n - 1)), rel=1e-9)


def test_probabilistic_sharpe_when_mean_is_zero_is_one_half_and_when_clearly_positive_near_one() -> None:
    assert probabilistic_sharpe(0.01 * np.tile([1.0, -1.0], 500)) == pytest.approx(0.5)
    rng = np.random.default_rng(3)
    assert probabilistic_sharpe(0.001 + 0.01 * rng.standard_normal(20_000)) > 0.999
    assert math.isnan(probabilistic_sharpe(np.full(10, 0.001)))


def test_detect_session_when_bars_are_us_hours_on_weekdays_is_us_equity() -> None:
    assert detect_session(_us_session_ts(10)) == SESSIONS["us_equity"]


def test_detect_session_when_bars_run_around_the_clock_or_on_weekends_is_24h() -> None:
    assert detect_session(MONDAY + np.arange(1440 * 3) * MINUTE) == SESSIONS["24h"]
    saturday = MONDAY + 5 * DAY + (13 * 60 + 31 + np.arange(390)) * MINUTE
    assert detect_session(np.concatenate((_us_session_ts(5), saturday))) == SESSIONS["24h"]


def test_detect_session_when_given_real_us_minute_bars_is_us_equity(minute_csv: Path) -> None:
    ts = np.array([m.ts for m in load_csv(minute_csv)], dtype=np.int64)
    assert detect_session(ts) == SESSIONS["us_equity"]
    assert SESSIONS["us_equity"].periods_per_year == 390 * 252


def test_series_when_lengths_differ_or_equity_is_not_positive_is_rejected() -> None:
    with pytest.raises(ValueError, match="equal"):
        Series(np.arange(3), np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="equity"):
        Series(np.arange(3), np.array([1.0, 0.0, 1.0]), np.ones(3))
    with pytest.raises(ValueError, match="signal"):
        Calls(np.array([2], dtype=np.int8), np.ones(1), np.ones(1))


# --- compute and the gates ------------------------------------------------------------------


def _backtest(seed: int = 11) -> tuple[Series, list[Trade], Calls]:
    ts = _us_session_ts(8)
    equity = _random_equity(seed, len(ts))
    benchmark = _random_equity(seed + 1, len(ts), drift=0.0)
    trades = [
        Trade(int(ts[i]), "SPY", "buy" if i % 2 else "sell", 10, 100.0 + i / 100, 0.25, f"o{i}")
        for i in range(5, len(ts), 97)
    ]
    rng = np.random.default_rng(seed)
    signal = rng.integers(-1, 2, 2000).astype(np.int8)
    nxt = rng.normal(0, 1e-3, 2000) + 4e-4 * signal
    nxt[-5:] = np.nan
    return Series(ts, equity, benchmark), trades, Calls(signal, rng.uniform(0.34, 1.0, 2000), nxt)


def test_compute_when_given_a_backtest_returns_every_key_as_json_without_nan() -> None:
    series, trades, calls = _backtest()
    metrics = compute(series, trades, calls, SESSIONS["us_equity"])
    assert set(metrics) == set(Metrics.__annotations__)
    assert orjson.loads(orjson.dumps(metrics)) == metrics
    assert metrics["days"] == 8 and metrics["trades"] == len(trades)
    assert metrics["costs"] == pytest.approx(0.25 * len(trades))
    assert metrics["accuracy_judged"] == int(np.sum(calls.signal[:-5] != 0))
    assert sum(map(sum, metrics["confusion"])) == 1995
    assert metrics["annualisation"]["periods_per_year"] == 98_280
    annual, benchmark = metrics["annual_return"], metrics["benchmark_annual_return"]
    assert annual is not None and benchmark is not None
    assert metrics["excess_return"] == pytest.approx(annual - benchmark)
    assert metrics["rank_ic"] is not None and metrics["rank_ic"] > 0  # the calls lean the right way


def test_compute_when_nothing_was_called_or_traded_leaves_those_metrics_none() -> None:
    series, _, _ = _backtest()
    empty = Calls(np.zeros(0, dtype=np.int8), np.zeros(0), np.zeros(0))
    metrics = compute(series, [], empty, SESSIONS["us_equity"])
    assert metrics["accuracy"] is None and metrics["accuracy_judged"] == 0
    assert metrics["mcc"] is None and metrics["ic"] is None and metrics["balanced_accuracy"] is None
    assert metrics["trades"] == 0 and metrics["turnover"] == 0.0


def _metrics(**changes: object) -> Metrics:
    """A backtest's metrics with every gated value comfortably passing, then ``changes``."""
    series, trades, calls = _backtest()
    passing = {"excess_return": 0.2, "max_drawdown": 0.05, "losing_days_in_a_row": 2, "sharpe": 2.5}
    passing |= {"accuracy": 0.7, "trades": 25, "days": 6}
    return cast(Metrics, compute(series, trades, calls, SESSIONS["us_equity"]) | passing | changes)


def test_gates_when_every_value_is_within_its_threshold_all_pass() -> None:
    results = gates(_metrics(), GateSpec())
    names = ["excess_return", "max_drawdown", "losing_days_in_a_row", "sharpe", "accuracy", "trades", "days"]
    assert list(results) == names
    assert all(g["pass"] for g in results.values()) and verdict(results)
    assert results["max_drawdown"] == {"value": 0.05, "threshold": 0.08, "op": "<=", "pass": True}


def test_gates_when_a_value_sits_exactly_on_its_threshold_pass() -> None:
    metrics = _metrics(max_drawdown=0.08, accuracy=0.65, losing_days_in_a_row=3, trades=20)
    assert verdict(gates(metrics, GateSpec()))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("excess_return", 0.1),
        ("max_drawdown", 0.09),
        ("losing_days_in_a_row", 4),
        ("sharpe", 1.9),
        ("accuracy", 0.6),
        ("trades", 19),
        ("days", 4),
    ],
)
def test_gates_when_one_value_misses_its_threshold_fail_that_gate_and_the_verdict(key: str, value: float) -> None:
    results = gates(_metrics(**{key: value}), GateSpec())
    assert [name for name, g in results.items() if not g["pass"]] == [key]
    assert not verdict(results)


@pytest.mark.parametrize("missing", [None, math.nan, math.inf])
def test_gates_when_a_value_is_missing_or_not_finite_never_pass(missing: float | None) -> None:
    results = gates(_metrics(sharpe=missing, max_drawdown=missing), GateSpec())
    assert not results["sharpe"]["pass"] and not results["max_drawdown"]["pass"]
    assert results["sharpe"]["value"] is None
    assert not verdict(results) and not verdict({})


# --- the report -----------------------------------------------------------------------------

META = {
    "model": {"name": "qwen-signal", "path": "models/qwen-signal.onnx", "sha256": "ab" * 32},
    "data": [{"path": "bars.csv", "sha256": "cd" * 32}],
    "period": {"from": "2013-10-07", "to": "2013-10-16"},
    "cost_bps": 1.0,
    "slippage_bps": 2.0,
    "engine_backend": "onnxruntime",
}
REPORT_FILES = {
    "metrics.json",
    "equity.csv",
    "trades.csv",
    "equity.png",
    "drawdown.png",
    "daily_pnl.png",
    "rolling_accuracy.png",
    "confusion.png",
    "tick_to_order.png",
    "report.md",
    "report.html",
}


def _write(folder: Path, seed: int = 11, t2o_us: np.ndarray | None = None) -> list[Path]:
    series, trades, calls = _backtest(seed)
    metrics = compute(series, trades, calls, SESSIONS["us_equity"])
    baselines = {name: compute(series, [], calls, SESSIONS["us_equity"]) for name in ("momentum", "always buy")}
    latencies = np.random.default_rng(seed).lognormal(4, 1, 300) if t2o_us is None else t2o_us
    return write_report(
        folder,
        metrics=metrics,
        gates=gates(metrics, GateSpec()),
        baselines=baselines,
        series=series,
        trades=trades,
        calls=calls,
        t2o_us=latencies,
        meta=META,
        rolling=200,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    _write(folder)
    return folder


def test_write_report_when_given_a_backtest_writes_every_file(report: Path) -> None:
    assert {p.name for p in report.iterdir()} == REPORT_FILES
    for png in report.glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 1000


def test_write_report_when_read_back_equity_csv_drawdown_reproduces_max_drawdown_exactly(report: Path) -> None:
    doc = orjson.loads((report / "metrics.json").read_bytes())
    assert set(doc) == {"meta", "metrics", "gates", "verdict", "baselines"}
    with (report / "equity.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["ts", "time_utc", "equity", "benchmark", "drawdown"]
    assert max(-float(r["drawdown"]) for r in rows) == doc["metrics"]["max_drawdown"]
    assert rows[0]["time_utc"] == "2013-10-07T13:31:00Z"
    with (report / "trades.csv").open() as f:
        assert next(csv.reader(f)) == ["ts", "time_utc", "order_id", "symbol", "side", "qty", "price", "cost"]


def test_write_report_when_rendered_states_verdict_gates_definition_baselines_and_meta(report: Path) -> None:
    md = (report / "report.md").read_text()
    assert md.startswith("# Backtest report: qwen-signal\n\n## Verdict:")
    assert ACCURACY_DEFINITION in md and "98,280 bars a year" in md
    assert "| metric | model | momentum | always buy |" in md
    assert "ab" * 32 in md and "cd" * 32 in md and "onnxruntime" in md
    assert "![equity](equity.png)" in md


def test_write_report_when_rendered_as_html_is_self_contained(report: Path) -> None:
    page = (report / "report.html").read_text()
    assert 'src="http' not in page and "<link" not in page and "<script" not in page
    assert page.count("data:image/png;base64,") == 6
    assert ACCURACY_DEFINITION in page


def test_write_report_when_run_twice_on_the_same_inputs_writes_the_same_bytes(report: Path, tmp_path: Path) -> None:
    _write(tmp_path)
    for name in REPORT_FILES:
        assert (tmp_path / name).read_bytes() == (report / name).read_bytes(), name


def test_write_report_when_there_are_no_orders_or_calls_still_writes_every_plot(tmp_path: Path) -> None:
    series, _, _ = _backtest()
    calls = Calls(np.zeros(0, dtype=np.int8), np.zeros(0), np.zeros(0))
    metrics = compute(series, [], calls, SESSIONS["us_equity"])
    paths = write_report(
        tmp_path,
        metrics=metrics,
        gates=gates(metrics, GateSpec()),
        baselines={},
        series=series,
        trades=[],
        calls=calls,
        t2o_us=np.zeros(0),
        meta={},
    )
    assert {p.name for p in paths} == REPORT_FILES
    assert "no orders were sent" in (tmp_path / "report.md").read_text()


def test_write_report_when_matplotlib_is_missing_names_the_report_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ReportDependencyError, match=r"tradingd\[report\]"):
        _write(tmp_path)
    assert not any(tmp_path.iterdir())
