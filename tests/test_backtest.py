"""``tradingd backtest``: the daemon's own path over real bars, a report, gates and exit codes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from broker import protocol as wire
from broker.venue import SimVenue
from daemon.backtest.run import Options, run_backtest
from daemon.config import Config, RiskConfig, SignalConfig
from tests.conftest import SPY_DAILY_CSV

NS = 1_000_000_000
T0 = 1_700_000_040 * NS


def _tradingd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=300)


def test_backtest_when_run_on_real_bars_reports_gates_and_exits_by_the_verdict(
    tmp_path: Path, minute_csv: Path, model_copy: Path
) -> None:
    report = tmp_path / "report"
    result = _tradingd(
        "backtest", "--data", str(minute_csv), "--model", str(model_copy), "--report", str(report), "--json"
    )
    summary = json.loads(result.stdout)
    gates = summary["gates"]
    for name in ("excess_return", "max_drawdown", "losing_days_in_a_row", "sharpe", "accuracy"):
        assert set(gates[name]) >= {"value", "threshold", "pass"}
    passed = all(g["pass"] for g in gates.values())
    assert result.returncode == (0 if passed else 1), result.stderr
    # The shipped model's direction accuracy on this week is well under the guide's 65 %.
    assert gates["accuracy"]["pass"] is False and gates["accuracy"]["value"] < 0.5
    assert summary["verdict"] == "fail"
    assert "minute" in result.stderr  # progress on the terminal

    metrics = json.loads((report / "metrics.json").read_text())
    with (report / "equity.csv").open() as f:
        equity = np.array([float(row["equity"]) for row in csv.DictReader(f)])
    peak = np.maximum.accumulate(equity)
    assert metrics["metrics"]["max_drawdown"] == pytest.approx(float(np.max(1 - equity / peak)), rel=1e-9)
    assert len(list(report.glob("*.png"))) >= 4
    assert {"report.md", "report.html", "trades.csv"} <= {p.name for p in report.iterdir()}

    written = json.loads((model_copy.parent / "qualification.json").read_text())
    manifest = json.loads(model_copy.with_name("model.manifest.json").read_text())
    assert written["model_sha256"] == manifest["sha256"] and written["passed"] is False
    assert written["data"][0]["sha256"] and written["period"]["from"] == "2013-10-04"

    # The deploy gate reads it: a failed qualification keeps the model from trading.
    config = tmp_path / "tradingd.toml"
    config.write_text(f"[engine.primary]\nmodel = '{model_copy}'\n[journal]\npath = '{tmp_path / 'j'}'\n")
    check = _tradingd("check", "--config", str(config))
    assert check.returncode == 78 and "failed the gates" in check.stderr and "accuracy" in check.stderr


def test_backtest_when_arguments_are_wrong_exits_2_and_78_for_a_bad_configuration(
    tmp_path: Path, minute_csv: Path
) -> None:
    assert _tradingd("backtest").returncode == 2  # --data is required
    backwards = _tradingd("backtest", "--data", str(minute_csv), "--from", "2013-10-10", "--to", "2013-10-07")
    assert backwards.returncode == 2 and "--from" in backwards.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[qualification]\nmax_drawdown = 2.0\n")
    result = _tradingd("backtest", "--data", str(minute_csv), "--config", str(bad), "--no-qualify")
    assert result.returncode == 78 and "qualification.max_drawdown" in result.stderr
    empty = _tradingd("backtest", "--data", str(minute_csv), "--from", "2020-01-01", "--no-qualify")
    assert empty.returncode == 78 and "no bars" in empty.stderr


def _small_week(minute_csv: Path, tmp_path: Path) -> Path:
    """Two days of the real bars, for the in-process runs."""
    lines = minute_csv.read_text().splitlines()
    keep = [lines[0]] + [x for x in lines[1:] if x.split(",")[1][:10] in ("2013-10-07", "2013-10-08")]
    path = tmp_path / "two_days.csv"
    path.write_text("\n".join(keep) + "\n")
    return path


async def test_backtest_when_orders_need_review_they_trade_only_if_approved(tmp_path: Path, minute_csv: Path) -> None:
    """Every always-buy order (10,000 notional) is at the review threshold: parked, and by
    default rejected, as live without an operator; --approve-reviews lets them trade."""
    data = _small_week(minute_csv, tmp_path)
    base = Config(risk=RiskConfig(review_threshold=5_000.0), signal=SignalConfig(confidence_threshold=0.0))
    rejected = await run_backtest(Options(data=(data,)), base, "(test)", out=None)
    approved = await run_backtest(Options(data=(data,), approve_reviews=True), base, "(test)", out=None)
    for result in (rejected, approved):
        assert result.extra_passes["always buy"].counts["reviews_parked"] > 0
    assert rejected.extra_passes["always buy"].trades == []
    assert approved.extra_passes["always buy"].trades


async def test_backtest_fills_come_after_the_signal_bar_at_the_next_open(tmp_path: Path, minute_csv: Path) -> None:
    data = _small_week(minute_csv, tmp_path)
    result = await run_backtest(Options(data=(data,), slippage_bps=0.0), Config(), "(test)", out=None)
    p = result.extra_passes["always buy"]
    bars = {}
    with data.open() as f:
        for row in csv.DictReader(f):
            bars[(row["symbol"], row["ts_utc"])] = (float(row["open"]), float(row["low"]), float(row["high"]))
    assert p.trades
    at_open = 0
    for trade in p.trades:
        assert trade.ts_ns > p.series.ts_ns[1]  # nothing fills on the first bar of the data
        # The fill's bar (it closes a minute after its ts_utc): its open, or the order's limit
        # where the open was past it and the bar traded through.
        start = np.datetime_as_string(np.datetime64(trade.ts_ns - 60 * NS, "ns"), unit="s") + "Z"
        open_, low, high = bars[(trade.symbol, start)]
        at_open += trade.price == open_
        assert trade.price == open_ or low <= trade.price <= high
    assert at_open > len(p.trades) / 2


def _venue(slippage_bps: float = 0.0) -> tuple[SimVenue, list[wire.ExecReport]]:
    reports: list[wire.ExecReport] = []
    venue = SimVenue(
        10_000.0,
        on_report=reports.append,
        on_status=lambda _: None,
        on_event=lambda *_: None,
        slippage_bps=slippage_bps,
        cost_bps=10.0,
    )
    return venue, reports


def _order(side: wire.Side, price: float, order_id: str = "o1") -> wire.NewOrder:
    return wire.NewOrder(order_id, "AAA", side, 10, price, 0)


def test_venue_when_an_order_arrives_it_never_fills_on_the_bar_it_was_sent_after() -> None:
    venue, reports = _venue(slippage_bps=10.0)
    venue.on_bar("AAA", T0, 100.0, 101.0, 99.0)
    venue.send(_order(wire.Side.BUY, 101.0))
    venue.on_bar("AAA", T0, 100.0, 101.0, 99.0)  # the same bar again: nothing new to trade on
    venue.deliver()
    assert [r.status for r in reports] == [wire.ExecStatus.NEW]
    venue.on_bar("AAA", T0 + 60 * NS, 100.5, 102.0, 100.0)
    venue.deliver()
    fill = reports[-1]
    assert fill.status is wire.ExecStatus.FILLED and fill.last_px == pytest.approx(100.5 * 1.001)
    cost = 10 * fill.last_px * 0.001
    assert venue.account.cash == pytest.approx(10_000.0 - 10 * fill.last_px - cost)
    assert venue.account.positions == {"AAA": 10}


def test_venue_when_the_next_open_gaps_past_the_limit_fills_at_the_limit_or_waits() -> None:
    venue, reports = _venue()
    venue.on_bar("AAA", T0, 100.0, 100.0, 100.0)
    venue.send(_order(wire.Side.BUY, 100.0))
    venue.on_bar("AAA", T0 + 60 * NS, 103.0, 104.0, 102.0)  # never traded at 100: still working
    venue.deliver()
    assert reports[-1].status is wire.ExecStatus.NEW
    venue.on_bar("AAA", T0 + 120 * NS, 101.0, 101.0, 99.5)  # trades through the limit
    venue.deliver()
    assert reports[-1].status is wire.ExecStatus.FILLED and reports[-1].last_px == 100.0


def test_venue_when_the_trading_day_ends_a_day_order_is_cancelled() -> None:
    """A day order works through the day of the first bar it can trade on (with daily bars, the
    next day's), then expires."""
    venue, reports = _venue()
    venue.on_bar("AAA", T0, 100.0, 100.0, 100.0)
    venue.send(_order(wire.Side.SELL, 120.0))
    venue.on_bar("AAA", T0 + 86_400 * NS, 100.0, 100.0, 100.0)  # the next day: its one day
    venue.deliver()
    assert reports[-1].status is wire.ExecStatus.NEW
    venue.on_bar("AAA", T0 + 86_400 * NS + 60 * NS, 100.0, 100.0, 100.0)  # still that day
    venue.deliver()
    assert reports[-1].status is wire.ExecStatus.NEW
    venue.on_bar("AAA", T0 + 2 * 86_400 * NS, 100.0, 100.0, 100.0)
    venue.deliver()
    assert reports[-1].status is wire.ExecStatus.CANCELED and "expired" in reports[-1].text


def test_training_series_when_cut_at_a_date_holds_nothing_from_that_day_on(minute_csv: Path) -> None:
    from daemon.backtest.walk import training_series  # noqa: PLC0415

    cut = date(2013, 10, 9)
    full, _ = training_series([minute_csv], cut, embargo=0)
    embargoed, label = training_series([minute_csv], cut, embargo=16)
    rows = list(csv.DictReader(minute_csv.read_text().splitlines()))
    before = [r for r in rows if r["ts_utc"] <= "2013-10-08T23:59"]
    per_symbol = {s: sum(1 for r in before if r["symbol"] == s) for s in {r["symbol"] for r in before}}
    assert sorted(len(a) for a in full) == sorted(per_symbol.values())
    assert sorted(len(a) for a in embargoed) == sorted(n - 16 for n in per_symbol.values())
    assert "before 2013-10-09" in label and "embargo 16" in label


def test_model_train_when_walking_forward_trains_before_each_fold_and_backtests_it(
    tmp_path: Path, minute_csv: Path
) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "wf"
    result = _tradingd(
        "model", "train", "--data", str(minute_csv), "--walk-forward", "2", "--steps", "20", "--out", str(out)
    )
    assert result.returncode in (0, 1), result.stderr
    folds = json.loads((out / "walk_forward.json").read_text())["folds"]
    assert [f["fold"] for f in folds] == [1, 2]
    for fold in folds:
        manifest = json.loads((out / f"fold-{fold['fold']}" / "model.manifest.json").read_text())
        assert f"before {fold['test']['from']}" in manifest["training"]["data"]
        assert fold["train_until"] == fold["test"]["from"]
        assert set(fold["gates"]) >= {"accuracy", "sharpe", "max_drawdown"}
    assert folds[0]["test"]["to"] < folds[1]["test"]["from"]
    assert result.returncode == (0 if all(f["passed"] for f in folds) else 1)


def test_backtest_when_a_data_row_is_bad_exits_78_naming_the_file_and_line(tmp_path: Path, minute_csv: Path) -> None:
    lines = minute_csv.read_text().splitlines()[:50]
    lines[7] = "AIG,notatime,1,1,1,1,1"
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    result = _tradingd("backtest", "--data", str(bad), "--no-qualify", "--json")
    assert result.returncode == 78 and result.stdout == ""
    assert "bad.csv:8" in result.stderr and "Traceback" not in result.stderr


async def test_backtest_when_a_bar_has_no_usable_price_counts_it_rejected_and_goes_on(
    tmp_path: Path, minute_csv: Path
) -> None:
    """The daemon rejects the bar, and the venue, the marks and the benchmark never see it."""
    rows = _small_week(minute_csv, tmp_path).read_text().splitlines()
    k = next(i for i, row in enumerate(rows) if row.startswith("BAC,2013-10-08T15:"))
    symbol, ts, *_ = rows[k].split(",")
    rows[k] = f"{symbol},{ts},nan,nan,nan,nan,100"
    data = tmp_path / "nan.csv"
    data.write_text("\n".join(rows) + "\n")
    result = await run_backtest(
        Options(data=(data,)), Config(signal=SignalConfig(confidence_threshold=0.0)), "(t)", out=None
    )
    assert result.model.counts["bars_rejected"] == 1
    assert np.isfinite(result.model.series.equity).all() and np.isfinite(result.model.series.benchmark).all()


async def test_backtest_when_bars_are_daily_annualises_by_day_and_fills_at_the_next_open(tmp_path: Path) -> None:
    daily = SPY_DAILY_CSV
    if not daily.is_file():
        pytest.skip(f"real daily bars not found at {daily} (the shared data folder is absent)")
    rows = daily.read_text().splitlines()
    part = tmp_path / "spy.csv"
    part.write_text("\n".join([rows[0], *rows[1:400]]) + "\n")
    result = await run_backtest(Options(data=(part,)), Config(), "(t)", out=None)
    assert result.annualisation.name == "daily" and result.annualisation.periods_per_year == 252
    assert result.extra_passes["always buy"].trades  # a day order gets the next day's bar


async def test_backtest_when_halts_are_kept_trades_nothing_after_the_first_big_move(tmp_path: Path) -> None:
    """SPY's 1998-2021 daily bars hold 38 moves of 5 % or more: kept, the first halt (of the only
    symbol, so of the market) stops trading for good; lifted at the next session, trading goes on."""
    if not SPY_DAILY_CSV.is_file():
        pytest.skip(f"real daily bars not found at {SPY_DAILY_CSV} (the shared data folder is absent)")
    data = (SPY_DAILY_CSV,)
    kept = await run_backtest(Options(data=data, lift_halts=False, baselines=False), Config(), "(t)", out=None)
    lifted = await run_backtest(Options(data=data, baselines=False), Config(), "(t)", out=None)
    assert kept.model.counts["halts"] and lifted.model.counts["halts"]
    last_fill = max(t.ts_ns for t in lifted.model.trades)
    assert not kept.model.trades or max(t.ts_ns for t in kept.model.trades) < last_fill
    assert len(lifted.model.trades) > 10 * max(1, len(kept.model.trades))
