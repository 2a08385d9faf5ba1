"""The commands a user runs first: demo (synthetic and real data), synth, replay."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon.feed.replay import ReplayError, load_csv, symbols_of
from daemon.feed.synth import SynthParams, generate, write_csv

WINDOW = 16


def _tradingd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_json_summary_accounts_for_every_bar_and_order() -> None:
    result = _tradingd("demo", "--minutes", "30", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    bars, orders = summary["bars"], summary["orders"]
    assert bars["received"] == bars["sent_by_feed"] == 32 * 30
    assert bars["accepted"] + sum(bars["rejected"].values()) == bars["received"] and bars["balanced"]
    assert bars["warmup"] == 32 * (WINDOW - 1)
    # Replayed at full speed, every minute past warm-up is still inferred: backpressure, not loss.
    assert summary["batches"] == 30 - (WINDOW - 1) and bars["superseded"] == 0
    assert sum(summary["signals"].values()) == 32 * (30 - (WINDOW - 1))
    assert orders["sent"] + sum(orders["denied"].values()) == orders["intents"] and orders["balanced"]
    assert orders["received_by_broker"] == orders["sent"] == orders["filled"] and orders["open"] == 0
    assert summary["engine"]["backend"] == "onnxruntime" and summary["engine"]["name"] == "qwen-signal"
    for stage in ("tick_to_order", "infer"):
        assert set(summary["latency_us"][stage]) >= {"p50", "p99", "max"}
    assert summary["latency_us"]["infer"]["count"] == summary["batches"]
    assert "demo: minute" in result.stderr or "replayed" in result.stderr


def test_demo_text_summary_is_readable() -> None:
    result = _tradingd("demo", "--minutes", "20", "--symbols", "8")
    assert result.returncode == 0, result.stderr
    assert "balanced" in result.stdout and "tick_to_order" in result.stdout and "NOT BALANCED" not in result.stdout


def test_demo_replays_the_real_week_and_accounts_for_every_bar(minute_csv: Path) -> None:
    with minute_csv.open() as f:
        rows = sum(1 for _ in f) - 1
    result = _tradingd("demo", "--data", str(minute_csv), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    bars, orders = summary["bars"], summary["orders"]
    assert bars["received"] == rows and bars["balanced"]
    assert orders["balanced"] and orders["received_by_broker"] == orders["sent"]
    assert summary["batches"] > 2000


def test_synth_is_seeded_and_has_jumps_of_five_percent() -> None:
    params = SynthParams(symbols=20, minutes=500, seed=3, jump_probability=0.01)
    a, b = generate(params), generate(params)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["S0000"], generate(SynthParams(symbols=20, minutes=500, seed=4))["S0000"])
    moves = np.concatenate([np.abs(np.diff(np.log(x[:, 3]))) for x in a.values()])
    assert (moves >= np.log(1.05)).sum() >= 10
    for ohlcv in a.values():
        o, h, lo, c, v = ohlcv.T
        assert (lo <= np.minimum(o, c)).all() and (h >= np.maximum(o, c)).all() and (lo > 0).all() and (v >= 0).all()


def test_synth_command_writes_the_columns_of_the_real_data(tmp_path: Path) -> None:
    out = tmp_path / "u.csv"
    result = _tradingd("synth", "--symbols", "3", "--minutes", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with out.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["symbol", "ts_utc", "open", "high", "low", "close", "volume"] and len(rows) == 16
    minutes = load_csv(out)
    assert len(minutes) == 5 and symbols_of(minutes) == ("S0000", "S0001", "S0002")
    seqs = [b.seq for m in minutes for b in m.bars]
    assert seqs == sorted(seqs) and len(set(seqs)) == 15


def test_load_csv_groups_real_bars_by_minute_close(minute_csv: Path) -> None:
    minutes = load_csv(minute_csv)
    assert symbols_of(minutes) == ("AIG", "BAC", "IBM", "SPY")
    assert all(b.ts == m.ts for m in minutes for b in m.bars)
    assert [m.ts for m in minutes] == sorted({m.ts for m in minutes})
    assert minutes[0].ts % 60_000_000_000 == 0


def test_load_csv_when_columns_are_wrong_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("symbol,time,price\nA,1,2\n")
    with pytest.raises(ReplayError, match=r"bad\.csv:1: expected columns"):
        load_csv(bad)
    bad.write_text("symbol,ts_utc,open,high,low,close,volume\nA,2013-10-04T13:30:00Z,1,2,x,1,1\n")
    with pytest.raises(ReplayError, match=r"bad\.csv:2"):
        load_csv(bad)
    result = _tradingd("replay", str(bad), "--port", "0")
    assert result.returncode == 1 and "bad.csv:2" in result.stderr


def test_write_csv_round_trips_through_load_csv(tmp_path: Path) -> None:
    universe = generate(SynthParams(symbols=4, minutes=7, seed=9))
    path = tmp_path / "s.csv"
    assert write_csv(universe, path) == 28
    minutes = load_csv(path)
    closes = {b.symbol: [] for b in minutes[0].bars}
    for m in minutes:
        for b in m.bars:
            closes[b.symbol].append(b.close)
    for symbol, series in closes.items():
        np.testing.assert_allclose(series, universe[symbol][:, 3])


def test_demo_with_a_review_threshold_parks_orders_and_reports_reviews_and_halts() -> None:
    result = _tradingd("demo", "--minutes", "30", "--review-threshold", "50000", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    orders = summary["orders"]
    assert orders["parked"] >= 1
    assert {"parked", "approved", "rejected", "expired"} <= set(orders)
    assert orders["sent"] + sum(orders["denied"].values()) + orders["parked"] == orders["intents"] + orders["approved"]
    assert orders["balanced"] and orders["received_by_broker"] == orders["sent"]
    assert isinstance(summary["halts"], list)


def test_logs_are_one_json_line_per_order_fill_and_connection_change_and_none_per_bar(tmp_path: Path) -> None:
    log = tmp_path / "tradingd.log"
    result = _tradingd("demo", "--minutes", "40", "--json", "--log-level", "info", "--log-file", str(log))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    events: dict[str, int] = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        assert {"event", "level", "timestamp"} <= set(record)
        events[record["event"]] = events.get(record["event"], 0) + 1
    assert events["order_sent"] == summary["orders"]["sent"]
    assert events["fill"] == summary["orders"]["filled"]
    assert events["engine_ready"] == 1 and events["journal_replayed"] == 1
    assert events["feed_connected"] == 1 and events["broker_connected"] == 1
    # Nothing scales with the 1,280 bars: the most frequent event is an order's or a fill's.
    bars = summary["bars"]["received"]
    assert max(events.values()) <= max(summary["orders"]["sent"], summary["orders"]["filled"]) < bars
    assert not {"bar", "bar_accepted", "batch"} & set(events)


def test_check_validates_a_configuration_and_prints_its_digest(tmp_path: Path) -> None:
    example = (Path(__file__).parent.parent / "deploy" / "tradingd.example.toml").read_text()
    allowed = tmp_path / "example.toml"
    # The example trades the shipped model, which is not qualified (test_qualification).
    allowed.write_text(example.replace("allow_unqualified = false", "allow_unqualified = true"))
    good = _tradingd("check", "--config", str(allowed))
    assert good.returncode == 0 and "ok, sha256" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[batch]\nmax_batch = 0\n")
    result = _tradingd("check", "--config", str(bad))
    assert result.returncode == 78 and "batch.max_batch" in result.stderr
