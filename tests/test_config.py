"""Configuration: one load point, unknown keys and bad values named, exit code 78."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from daemon.config import Config, load_config
from daemon.errors import EX_CONFIG, ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "tradingd.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tradingd.toml"
    path.write_text(text)
    return path


def _fields(struct: type[msgspec.Struct], prefix: str = "") -> set[str]:
    out = set()
    for field in msgspec.structs.fields(struct):
        key = f"{prefix}{field.name}"
        out.add(key)
        default = field.default
        if isinstance(default, msgspec.Struct):
            out |= _fields(type(default), key + ".")
    return out


def _keys(doc: dict[str, object], prefix: str = "") -> set[str]:
    out = set()
    for key, value in doc.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _keys(value, f"{prefix}{key}.")
    return out


def test_example_config_loads_and_shows_every_key() -> None:
    load_config(EXAMPLE)
    documented = _keys(tomllib.loads(EXAMPLE.read_text())) | {
        "engine.primary.sha256",
        "engine.primary.batch_buckets",
        "engine.standby",
        "risk.halt.benchmark",
        "risk.halt.cooloff_s",  # shown commented out
        "engine.failover.budget_us",
        "engine.primary.inject",
        "broker.fix.store",
    }
    missing = _fields(Config) - documented
    assert not missing, f"deploy/tradingd.example.toml does not document {sorted(missing)}"
    for key in (
        "engine.standby",
        "engine.primary.sha256",
        "engine.primary.batch_buckets",
        "engine.failover.budget_us",
        "engine.primary.inject",
    ):
        assert key.rsplit(".", 1)[-1] in EXAMPLE.read_text()


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[feed]\nport = 70000\n", "feed.port", "<= 65535"),
        ("[feed]\nprot = 7001\n", "feed.prot", "unknown key"),
        ("[feeds]\n", "feeds", "unknown key"),
        ("[engine.primary]\nbackend = 'cuda'\n", "engine.primary.backend", "Invalid enum value"),
        ("[engine.primary]\nfoo = 1\n", "engine.primary.foo", "unknown key"),
        ("[signal]\nconfidence_threshold = 1.5\n", "signal.confidence_threshold", "<= 1"),
        ("[universe]\nsymbols = []\n", "universe.symbols", "length >= 1"),
        ("[universe]\nsymbols = ['A', 'B', 'A']\n", "universe.symbols", "duplicate"),
        ("[feed]\nreconnect_initial_ms = 9000\n", "feed.reconnect_initial_ms", "reconnect_max_ms"),
        ("[journal]\nfsync = 'sometimes'\n", "journal.fsync", "Invalid enum value"),
        ("[feed\n", "(syntax)", "Expected"),
    ],
)
def test_load_config_when_value_is_bad_names_the_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key
    assert problem in err.value.problem
    assert str(path) in str(err.value)


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "[feed]\nport = 1234\n"))
    assert config.feed.port == 1234
    with pytest.raises(AttributeError):
        config.feed.port = 1  # type: ignore[misc]


def test_run_when_config_is_bad_exits_78_naming_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "[risk]\nmax_order_qty = -5\n")
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EX_CONFIG
    assert "risk.max_order_qty" in result.stderr


def test_run_when_model_hash_is_pinned_wrong_exits_78_naming_sha256(tmp_path: Path) -> None:
    path = _write(tmp_path, f"[engine.primary]\nsha256 = '{'0' * 64}'\n[journal]\npath = '{tmp_path / 'j'}'\n")
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EX_CONFIG
    assert "sha256" in result.stderr


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[signal]\nnotional_per_signal = inf\n", "signal.notional_per_signal"),
        ("[signal]\nnotional_per_signal = nan\n", "signal.notional_per_signal"),
        ("[risk]\ncollar_pct = inf\n", "risk.collar_pct"),
        ("[signal]\nlot_size = 99999999999999999999\n", "signal.lot_size"),
        ("[risk]\nmax_order_qty = 99999999999999999999\n", "risk.max_order_qty"),
        ("[risk]\nmax_gross_exposure = 1e300\n", "risk.max_gross_exposure"),
        ("[risk]\nmax_signal_age_s = inf\n", "risk.max_signal_age_s"),
        ("[risk.halt]\nmarket_share = 1e300\n", "risk.halt.market_share"),
        ("[risk.symbols.SPY]\ncollar_pct = inf\n", "risk.symbols.SPY.collar_pct"),
        ("[engine.gpu]\npoll_s = 1e-300\n", "engine.gpu.poll_s"),
        ("[batch]\nmax_delay_us = 99999999999999999999\n", "batch.max_delay_us"),
        ("[feed]\nmax_price = inf\n", "feed.max_price"),
        ("[feed]\nmin_price = 0.0\n", "feed.min_price"),
        ("[feed]\nmin_price = 10.0\nmax_price = 5.0\n", "feed.min_price"),
        ("[admin]\noperators = [4294967296]\n", "admin.operators[0]"),
    ],
)
def test_load_config_when_number_is_infinite_or_absurd_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    assert err.value.key == key


def test_load_config_when_file_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes("# caf\u00e9\n[feed]\nport = 7001\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "(file)" and "UTF-8" in err.value.problem
    assert str(path) in str(err.value)


def _tradingd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[signal]\nnotional_per_signal = inf\n", "signal.notional_per_signal"),
        ("[risk]\ncollar_pct = inf\n", "risk.collar_pct"),
        ("[signal]\nlot_size = 99999999999999999999\n", "signal.lot_size"),
    ],
)
def test_check_and_run_when_value_would_break_the_daemon_exit_78_naming_the_key(
    tmp_path: Path, command: str, text: str, key: str
) -> None:
    path = _write(tmp_path, text + f"[journal]\npath = '{tmp_path / 'journal'}'\n")
    result = _tradingd(command, "--config", str(path))
    assert result.returncode == EX_CONFIG, result.stderr
    assert key in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["check", "run"])
def test_check_and_run_when_file_is_not_utf8_exit_78_naming_the_file(tmp_path: Path, command: str) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# \xff\xfe\n[feed]\nport = 7001\n")
    result = _tradingd(command, "--config", str(path))
    assert result.returncode == EX_CONFIG, result.stderr
    assert str(path) in result.stderr and "UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_when_max_batch_exceeds_the_largest_bucket_exits_78_naming_the_key(tmp_path: Path) -> None:
    result = _tradingd("check", "--config", str(_write(tmp_path, "[batch]\nmax_batch = 512\n")))
    assert result.returncode == EX_CONFIG, result.stderr
    assert "batch.max_batch" in result.stderr and "256" in result.stderr


def test_check_when_model_file_is_missing_exits_78_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "absent.onnx"
    result = _tradingd("check", "--config", str(_write(tmp_path, f"[engine.primary]\nmodel = '{missing}'\n")))
    assert result.returncode == EX_CONFIG, result.stderr
    assert str(missing) in result.stderr


def test_check_when_model_hash_is_pinned_wrong_exits_78_naming_sha256(tmp_path: Path) -> None:
    result = _tradingd("check", "--config", str(_write(tmp_path, f"[engine.primary]\nsha256 = '{'0' * 64}'\n")))
    assert result.returncode == EX_CONFIG, result.stderr
    assert "sha256" in result.stderr


def test_check_when_admin_socket_path_is_too_long_exits_78_naming_the_key(tmp_path: Path) -> None:
    result = _tradingd("check", "--config", str(_write(tmp_path, f"[admin]\nsocket = '/run/{'s' * 120}.sock'\n")))
    assert result.returncode == EX_CONFIG, result.stderr
    assert "admin.socket" in result.stderr


def test_check_when_primary_cannot_run_here_reports_the_standby_serving_as_run_would(tmp_path: Path) -> None:
    """A tensorrt primary on a machine without TensorRT or a GPU leaves the standby serving."""
    text = (
        "[engine]\nallow_unqualified = true\n"
        "[engine.primary]\nbackend = 'tensorrt'\nmodel = 'builtin:absent'\n[engine.standby]\nbackend = 'onnxruntime'\n"
    )
    result = _tradingd("check", "--config", str(_write(tmp_path, text)))
    assert result.returncode == 0, result.stderr
    assert "engine standby (active)" in result.stdout and "the standby would serve" in result.stdout
