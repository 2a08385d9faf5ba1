"""The timing backend: sleeps the measured GPU time of its bucket, costs no CPU, and says so."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.config import load_config
from daemon.errors import EX_CONFIG, ConfigError
from daemon.preflight import build_configured
from engines.base import EngineSpec, describe, run_batch
from engines.chooser import build_engine
from engines.inject import FaultInjectingEngine, Injection
from engines.manifest import load_manifest
from engines.timing import (
    BUILTIN_TABLE,
    HOLD_BAND_Z,
    TimingEngine,
    TimingTableError,
    bucket_times,
    load_timing_table,
    resolve_timing_table,
)


def _write_table(path: Path, rows: dict[str, object], **top: object) -> Path:
    table: dict[str, object] = {"schema": 1, "gpu": "Test GPU", "buckets": rows, **top}
    path.write_text(json.dumps({"date": "today", "gpu_time_table": table}))
    return path


def _rows(times: dict[int, float]) -> dict[str, object]:
    return {str(b): {"gpu_ms_p50": ms, "gpu_ms_p99": ms * 1.5, "measured": True} for b, ms in times.items()}


def _timing(shipped_model: Path, table: Path | None = None, **spec: object) -> TimingEngine:
    built = build_engine(
        EngineSpec("primary", "timing", shipped_model, timing_table=str(table or "builtin"), **spec)  # type: ignore[arg-type]
    )
    assert isinstance(built, TimingEngine)
    return built


def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tradingd.toml"
    path.write_text(text)
    return path


def test_shipped_table_when_loaded_gives_every_bucket_to_8192_as_measured(shipped_model: Path) -> None:
    engine = _timing(shipped_model)
    manifest = load_manifest(shipped_model)
    assert set(manifest.batch_buckets) <= set(engine.buckets) and engine.buckets[-1] == 8192
    assert engine.bucket_for(5000) == 8192
    assert all(t.measured for t in engine.times)
    assert engine.description == "timing (NVIDIA H200 table, p50; all buckets measured)"
    assert describe(engine) == engine.description
    row = json.loads(BUILTIN_TABLE.read_text())["gpu_time_table"]["buckets"]["8192"]
    assert engine.times[-1].ms == row["gpu_ms_p50"]


def test_quantile_when_p99_sleeps_the_p99_column(shipped_model: Path) -> None:
    engine = _timing(shipped_model, timing_quantile="p99")
    row = json.loads(BUILTIN_TABLE.read_text())["gpu_time_table"]["buckets"]["1"]
    assert engine.times[0].ms == row["gpu_ms_p99"] and "p99" in engine.description


def test_infer_sleeps_at_least_the_bucket_table_time(shipped_model: Path) -> None:
    """Only a lower bound: a busy machine may oversleep, never undersleep."""
    engine = _timing(shipped_model)
    for t in engine.times:
        for _ in range(3):
            started = time.perf_counter_ns()
            engine.infer(t.bucket)
            assert time.perf_counter_ns() - started >= t.ms * 1e6 - 1  # -1: the ns rounding of the ms
    assert engine.sleep_stats().batches == 3 * len(engine.times)


def test_infer_when_sleeping_releases_the_gil_and_burns_no_cpu(shipped_model: Path, tmp_path: Path) -> None:
    """A counter thread runs while the engine sleeps; a spin would starve it for the whole switch
    interval, raised here well past the sleep."""
    table = _write_table(tmp_path / "slow.json", _rows({1: 60.0, 8: 60.0}))
    engine = _timing(shipped_model, table, batch_buckets=(1,))
    counter = [0]
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            counter[0] += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.2)
    thread = threading.Thread(target=count)
    try:
        thread.start()
        before, cpu_before = counter[0], time.thread_time()
        engine.infer(1)
        progress, cpu = counter[0] - before, time.thread_time() - cpu_before
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old)
    assert progress > 10_000
    assert cpu < 0.030


def test_infer_when_woken_early_sleeps_again_until_the_deadline(shipped_model: Path, tmp_path: Path) -> None:
    """Every wait is a sleep: a clock that says it woke early gets another sleep, not a spin."""
    now = [0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += max(1, int(seconds * 1e9) // 2)  # wakes halfway

    table = _write_table(tmp_path / "t.json", _rows({1: 1.0, 8: 2.0}))
    engine = TimingEngine(
        EngineSpec("primary", "timing", shipped_model, batch_buckets=(1,), timing_table=str(table)),
        now_ns=lambda: now[0],
        sleep=sleep,
    )
    engine.infer(1)
    assert now[0] >= 1_000_000 and len(slept) > 1
    assert slept[0] == pytest.approx(1e-3) and all(b < a for a, b in itertools.pairwise(slept))


def test_bucket_times_when_between_measured_buckets_interpolates_and_marks_it(tmp_path: Path) -> None:
    table = load_timing_table(_write_table(tmp_path / "t.json", _rows({1: 1.0, 9: 2.0, 17: 4.0})))
    (t,) = bucket_times(table, (5,), "p50")
    assert t.ms == pytest.approx(1.5) and t.source == "interpolated" and not t.measured
    (t,) = bucket_times(table, (13,), "p99")
    assert t.ms == pytest.approx(4.5) and not t.measured


def test_bucket_times_past_the_largest_extrapolates_from_the_last_two_and_marks_it(
    shipped_model: Path, tmp_path: Path
) -> None:
    table = _write_table(tmp_path / "t.json", _rows({1: 1.0, 8: 1.5, 16: 2.0}))
    engine = _timing(shipped_model, table, batch_buckets=(1, 8, 12, 16, 32))
    by_bucket = {t.bucket: t for t in engine.times}
    assert by_bucket[32].ms == pytest.approx(2.0 + 0.5 / 8 * 16) and by_bucket[32].source == "extrapolated"
    assert by_bucket[12].ms == pytest.approx(1.75) and by_bucket[12].source == "interpolated"
    assert by_bucket[16].measured and not by_bucket[32].measured
    assert engine.description == "timing (Test GPU table, p50; buckets 12 interpolated; buckets > 16 extrapolated)"


def test_shipped_table_past_8192_extrapolates_at_the_last_per_row_slope(shipped_model: Path) -> None:
    engine = _timing(shipped_model, batch_buckets=(1, 4096, 8192, 16384))
    rows = json.loads(BUILTIN_TABLE.read_text())["gpu_time_table"]["buckets"]
    slope = (rows["8192"]["gpu_ms_p50"] - rows["4096"]["gpu_ms_p50"]) / 4096
    assert engine.times[-1].ms == pytest.approx(rows["8192"]["gpu_ms_p50"] + slope * 8192)
    assert not engine.times[-1].measured and engine.bucket_for(10_000) == 16384
    assert engine.description.endswith("p50; buckets > 8192 extrapolated)")


@pytest.mark.parametrize(
    ("times", "buckets", "problem"),
    [
        ({8: 1.0, 16: 2.0}, (1, 8), "below the smallest measured bucket 8"),
        ({8: 1.0}, (8, 16), "one measured bucket"),
        ({8: 2.0, 16: 1.0}, (8, 32), "cannot be extrapolated"),
    ],
)
def test_bucket_times_when_the_table_cannot_give_a_bucket_refuses_naming_it(
    shipped_model: Path, tmp_path: Path, times: dict[int, float], buckets: tuple[int, ...], problem: str
) -> None:
    table = _write_table(tmp_path / "t.json", _rows(times))
    with pytest.raises(TimingTableError, match=problem) as err:
        _timing(shipped_model, table, batch_buckets=buckets)
    assert str(table) in str(err.value)


def _good_row() -> dict[str, object]:
    return {"gpu_ms_p50": 0.3, "gpu_ms_p99": 0.4, "wall_ms_p50": 0.31, "measured": True}


@pytest.mark.parametrize(
    ("doc", "field", "problem"),
    [
        ("{not json", "(file)", "not valid JSON"),
        ({"date": "today"}, "gpu_time_table", "missing"),
        ({"gpu_time_table": {"schema": 2, "buckets": {"1": _good_row()}}}, "gpu_time_table.schema", "schema 2"),
        ({"gpu_time_table": {"buckets": {"1": _good_row()}}}, "gpu_time_table", "schema"),
        ({"gpu_time_table": {"schema": 1}}, "gpu_time_table", "buckets"),
        ({"gpu_time_table": {"schema": 1, "buckets": {}}}, "gpu_time_table.buckets", "no buckets"),
        (
            {"gpu_time_table": {"schema": 1, "buckets": {"1": {**_good_row(), "gpu_ms_p50": -0.3}}}},
            "gpu_time_table.buckets.1.gpu_ms_p50",
            "positive",
        ),
        (
            {"gpu_time_table": {"schema": 1, "buckets": {"1": {**_good_row(), "gpu_ms_p99": 0}}}},
            "gpu_time_table.buckets.1.gpu_ms_p99",
            "positive",
        ),
        (
            {"gpu_time_table": {"schema": 1, "buckets": {"1": {**_good_row(), "gpu_ms_p99": 0.1}}}},
            "gpu_time_table.buckets.1.gpu_ms_p99",
            "below gpu_ms_p50",
        ),
        (
            {"gpu_time_table": {"schema": 1, "buckets": {"1": {**_good_row(), "gpu_ms_p50": "fast"}}}},
            "gpu_time_table.buckets.1.gpu_ms_p50",
            "Expected `float`",
        ),
        (
            {"gpu_time_table": {"schema": 1, "buckets": {"one": _good_row()}}},
            "gpu_time_table.buckets.one",
            "not a batch size",
        ),
        (
            {"gpu_time_table": {"schema": 1, "buckets": {"1": {**_good_row(), "measured": False}}}},
            "gpu_time_table.buckets.1.measured",
            "measurements only",
        ),
        (
            {"gpu_time_table": {"schema": 1, "dry_run": True, "buckets": {"1": _good_row()}}},
            "gpu_time_table.dry_run",
            "not a measurement",
        ),
    ],
)
def test_load_timing_table_when_malformed_names_the_file_and_the_field(
    tmp_path: Path, doc: object, field: str, problem: str
) -> None:
    path = tmp_path / "gpu_check.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(TimingTableError, match=problem) as err:
        load_timing_table(path)
    assert err.value.field == field and err.value.path == str(path)
    assert str(path) in str(err.value)


def test_load_timing_table_when_missing_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TimingTableError, match="no such file") as err:
        load_timing_table(tmp_path / "absent.json")
    assert str(tmp_path / "absent.json") in str(err.value)


def test_builtin_table_when_bench_is_not_shipped_says_to_give_a_path(tmp_path: Path) -> None:
    with pytest.raises(TimingTableError, match="not shipped in the wheel") as err:
        resolve_timing_table("builtin", builtin=tmp_path / "bench" / "gpu" / "gpu_check.json")
    assert "gpu_check.json" in str(err.value)


@pytest.mark.parametrize(("field", "value"), [("window", 32), ("features", 5), ("model_sha256", "0" * 64)])
def test_table_when_measured_on_another_model_is_refused_naming_the_field(
    shipped_model: Path, tmp_path: Path, field: str, value: object
) -> None:
    table = _write_table(tmp_path / "t.json", _rows({1: 0.3, 256: 0.4}), **{field: value})
    with pytest.raises(TimingTableError) as err:
        _timing(shipped_model, table)
    assert err.value.field == f"gpu_time_table.{field}"


def _windows(returns: np.ndarray, shipped_model: Path) -> np.ndarray:
    m = load_manifest(shipped_model)
    rng = np.random.default_rng(3)
    batch = rng.standard_normal((len(returns), m.window, m.n_features)).astype(np.float32)
    batch[:, -1, m.feature_names.index("log_return")] = returns
    return batch


def test_logits_rule_when_returns_vary_is_deterministic_and_gives_all_three_classes(shipped_model: Path) -> None:
    returns = np.random.default_rng(4).standard_normal(1000).astype(np.float32)
    batch = _windows(returns, shipped_model)
    first = run_batch(_timing(shipped_model), batch)
    again = run_batch(_timing(shipped_model), batch)
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.float32 and np.isfinite(first).all()
    classes = np.bincount(first.argmax(axis=1), minlength=3)
    assert classes.min() > 100, classes  # sell, hold, buy each a real share
    expected = np.where(returns > HOLD_BAND_Z, 2, np.where(returns < -HOLD_BAND_Z, 0, 1))
    np.testing.assert_array_equal(first.argmax(axis=1), expected)


def test_logits_rule_reads_only_the_newest_bar_return(shipped_model: Path) -> None:
    batch = _windows(np.array([1.0, -1.0, 0.0], dtype=np.float32), shipped_model)
    engine = _timing(shipped_model)
    logits = run_batch(engine, batch)
    batch[:, :-1, :] = 7.0  # every older bar and every other feature of the newest
    batch[:, -1, 1:] = -7.0
    np.testing.assert_array_equal(run_batch(engine, batch), logits)
    assert list(logits.argmax(axis=1)) == [2, 0, 1]


def test_health_shows_the_description_and_the_oversleep(shipped_model: Path) -> None:
    engine = _timing(shipped_model)
    engine.warm_up()
    health = engine.health()
    assert health.ok and health.inferences == len(engine.buckets)
    assert health.detail.startswith(engine.description) and "oversleep" in health.detail


def test_describe_when_engine_is_wrapped_or_has_no_description(shipped_model: Path) -> None:
    timing = _timing(shipped_model)
    assert describe(FaultInjectingEngine(timing, Injection("latency"))) == timing.description
    onnx = build_engine(EngineSpec("standby", "onnxruntime", shipped_model))
    assert describe(onnx) == "onnxruntime"


def test_config_when_backend_is_timing_loads_and_builds_the_timing_engine(tmp_path: Path) -> None:
    text = "[batch]\nmax_batch = 8192\n[engine.primary]\nbackend = 'timing'\n"
    config = load_config(_write_config(tmp_path, text))
    assert config.engine.primary.backend == "timing" and config.engine.primary.timing_table == "builtin"
    engine = build_configured("primary", config.engine.primary)
    assert engine.backend == "timing" and engine.buckets[-1] >= config.batch.max_batch
    assert describe(engine).startswith("timing (")


def test_config_timing_keys_reach_the_engine(tmp_path: Path) -> None:
    table = _write_table(tmp_path / "t.json", _rows({1: 0.5, 8: 0.6, 256: 0.9}))
    text = f"[engine.primary]\nbackend = 'timing'\ntiming_table = '{table}'\ntiming_quantile = 'p99'\n"
    engine = build_configured("primary", load_config(_write_config(tmp_path, text)).engine.primary)
    assert isinstance(engine, TimingEngine)
    assert engine.table.path == str(table) and engine.quantile == "p99"


@pytest.mark.parametrize(
    ("rows", "table_problem"),
    [
        (None, "no such file"),
        ({"1": {**_good_row(), "gpu_ms_p50": -1.0}}, "gpu_time_table.buckets.1.gpu_ms_p50"),
    ],
)
def test_load_config_when_timing_table_is_bad_names_the_key_the_table_and_the_problem(
    tmp_path: Path, rows: dict[str, object] | None, table_problem: str
) -> None:
    table = tmp_path / "gpu_check.json"
    if rows is not None:
        _write_table(table, rows)
    text = f"[engine.standby]\nbackend = 'timing'\ntiming_table = '{table}'\n"
    path = _write_config(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "engine.standby.timing_table"
    assert str(path) in str(err.value) and str(table) in str(err.value) and table_problem in str(err.value)


def test_load_config_when_timing_quantile_is_unknown_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write_config(tmp_path, "[engine.primary]\nbackend = 'timing'\ntiming_quantile = 'p90'\n"))
    assert err.value.key == "engine.primary.timing_quantile"


def test_load_config_when_backend_is_not_timing_does_not_read_the_table(tmp_path: Path) -> None:
    config = load_config(_write_config(tmp_path, f"[engine.primary]\ntiming_table = '{tmp_path / 'absent.json'}'\n"))
    assert config.engine.primary.backend == "onnxruntime"


def test_check_when_timing_table_is_missing_exits_78_naming_the_key_and_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    path = _write_config(tmp_path, f"[engine.primary]\nbackend = 'timing'\ntiming_table = '{missing}'\n")
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == EX_CONFIG, result.stderr
    assert "engine.primary.timing_table" in result.stderr and str(missing) in result.stderr
    assert "Traceback" not in result.stderr
