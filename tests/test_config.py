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
