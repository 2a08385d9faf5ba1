"""The deploy gate: ``run`` and ``check`` refuse a model without a passing qualification."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import qualification
from daemon.config import QualificationConfig
from daemon.stats import SignalAccuracy

EX_CONFIG = 78


def _tradingd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=120)


def _config(tmp_path: Path, engine: str = "", model: str = "builtin") -> Path:
    path = tmp_path / "tradingd.toml"
    path.write_text(
        f"[engine]\n{engine}\n[engine.primary]\nmodel = '{model}'\n"
        f"[journal]\npath = '{tmp_path / 'journal'}'\n[metrics]\nenabled = false\n"
        f"[admin]\nsocket = '{tmp_path / 'admin.sock'}'\n[feed]\nconnect_timeout_ms = 100\n"
    )
    return path


def _qualify(model: Path, *, sha256: str | None = None, passed: bool = True, lax: str | None = None) -> None:
    manifest = json.loads(model.with_name("model.manifest.json").read_text())
    required = qualification.required_gates(QualificationConfig())
    gates: dict[str, dict[str, object]] = {
        name: {"value": threshold, "threshold": threshold, "op": op, "pass": passed}
        for name, (op, threshold) in required.items()
    }
    if lax is not None:  # passed, but under a threshold laxer than the deployment's
        op, threshold = required[lax]
        gates[lax]["threshold"] = threshold - 1 if op == ">=" else threshold + 1
    qualification.write(
        model,
        qualification.Qualification(
            format=qualification.FORMAT,
            model=model.name,
            model_sha256=sha256 or manifest["sha256"],
            passed=passed,
            written_utc="2026-12-01T00:00:00+00:00",
            period={"from": "2013-10-04", "to": "2013-10-11"},
            data=[{"path": "bars.csv", "sha256": "0" * 64}],
            gates=gates,
            metrics={"accuracy": 0.7},
        ),
    )


@pytest.mark.parametrize("command", ["check", "run"])
def test_command_when_the_shipped_model_is_unqualified_exits_78_naming_the_model(tmp_path: Path, command: str) -> None:
    result = _tradingd(command, "--config", str(_config(tmp_path)))
    assert result.returncode == EX_CONFIG, result.stderr
    assert "engine.primary.model" in result.stderr and "model.onnx" in result.stderr
    assert "not qualified" in result.stderr and "allow_unqualified" in result.stderr


def test_check_when_allow_unqualified_passes_and_logs_an_error(tmp_path: Path) -> None:
    result = _tradingd("check", "--config", str(_config(tmp_path, "allow_unqualified = true")))
    assert result.returncode == 0, result.stderr
    logged = [json.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
    assert any(x["event"] == "model_unqualified" and x["level"] == "error" for x in logged)


def test_check_when_a_passing_qualification_matches_the_model_sha256_passes(tmp_path: Path, model_copy: Path) -> None:
    _qualify(model_copy)
    result = _tradingd("check", "--config", str(_config(tmp_path, model=str(model_copy))))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("sha256", "passed", "says"),
    [("f" * 64, True, "not this model"), (None, False, "failed the gates accuracy")],
)
def test_check_when_the_qualification_is_for_another_model_or_failed_exits_78(
    tmp_path: Path, model_copy: Path, sha256: str | None, passed: bool, says: str
) -> None:
    _qualify(model_copy, sha256=sha256, passed=passed)
    result = _tradingd("check", "--config", str(_config(tmp_path, model=str(model_copy))))
    assert result.returncode == EX_CONFIG and says in result.stderr, result.stderr


@pytest.mark.parametrize("lax", ["sharpe", "max_drawdown"])
def test_check_when_the_model_passed_under_laxer_gates_than_the_config_exits_78(
    tmp_path: Path, model_copy: Path, lax: str
) -> None:
    _qualify(model_copy, lax=lax)
    result = _tradingd("check", "--config", str(_config(tmp_path, model=str(model_copy))))
    assert result.returncode == EX_CONFIG and "laxer gates" in result.stderr and lax in result.stderr, result.stderr


def test_standing_when_the_file_is_not_a_qualification_says_so(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    qualification.path_for(model).write_text("{not json")
    found = qualification.standing(model, "0" * 64)
    assert not found.ok and "not a qualification record" in found.reason


def test_live_accuracy_when_the_next_close_is_flat_counts_the_signal_wrong() -> None:
    """One definition everywhere: a flat next move is a miss, as in the backtest."""
    acc = SignalAccuracy(10)
    acc.signal(0, 1, 100.0)
    acc.next_close(0, 100.0)  # flat: wrong
    acc.signal(0, -1, 100.0)
    acc.next_close(0, 99.0)  # down after a sell: right
    assert acc.judged == 2 and acc.value() == 0.5
