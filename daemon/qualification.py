"""The deploy gate: a model trades only with a passing qualification for its exact sha256.

``tradingd backtest`` writes ``qualification.json`` beside the model: the verdict, the gates,
the metrics, the period and the sha256 of the data it ran on, bound to the model file's sha256.
``tradingd run`` and ``tradingd check`` refuse a model without a passing one (a bad
configuration, exit 78, naming the model), unless ``engine.allow_unqualified = true``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import orjson

FILE_NAME = "qualification.json"
FORMAT = 1


class Qualification(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    model: str  # the model file's name
    model_sha256: str
    passed: bool
    written_utc: str
    period: dict[str, str]  # {"from", "to"} as ISO dates of the bars the backtest ran on
    data: list[dict[str, str]]  # [{"path", "sha256"}]
    gates: dict[str, dict[str, Any]]
    metrics: dict[str, Any]
    command: str = ""


def path_for(model: Path) -> Path:
    """Where a model's qualification lives: beside the model file."""
    return model.with_name(FILE_NAME)


def write(model: Path, record: Qualification) -> Path:
    """Write atomically (temporary file, fsync, rename), so a reader sees the old or the new."""
    final = path_for(model)
    tmp = final.with_name(final.name + ".tmp")
    data = orjson.dumps(msgspec.to_builtins(record), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, final)
    return final


@dataclass(frozen=True, slots=True)
class Standing:
    """A model's qualification as the deploy gate reads it."""

    ok: bool
    reason: str  # why not, or what passed
    record: Qualification | None = None


def required_gates(q: Any) -> dict[str, tuple[str, float]]:
    """The deployment's gates (a ``[qualification]`` section) as the record names them."""
    return {
        "excess_return": (">=", q.min_excess_return),
        "max_drawdown": ("<=", q.max_drawdown),
        "losing_days_in_a_row": ("<=", q.max_losing_days_in_a_row),
        "sharpe": (">=", q.min_sharpe),
        "accuracy": (">=", q.min_accuracy),
        "trades": (">=", q.min_trades),
        "days": (">=", q.min_days),
    }


def _laxer(record: Qualification, required: dict[str, tuple[str, float]]) -> list[str]:
    """The gates the record passed under a threshold laxer than the deployment's (or lacks)."""
    out = []
    for name, (op, threshold) in required.items():
        gate = record.gates.get(name)
        got = gate.get("threshold") if gate else None
        if not isinstance(got, int | float) or (got < threshold if op == ">=" else got > threshold):
            out.append(f"{name} {op} {got} (this deployment requires {op} {threshold})")
    return out


def standing(model: Path, sha256: str, required: dict[str, tuple[str, float]] | None = None) -> Standing:
    path = path_for(model)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Standing(False, f"no {FILE_NAME} beside it: run `tradingd backtest` on it first")
    except OSError as exc:
        return Standing(False, f"cannot read {path}: {exc.strerror or exc}")
    try:
        record = msgspec.json.decode(raw, type=Qualification)
    except msgspec.DecodeError as exc:
        return Standing(False, f"{path} is not a qualification record: {exc}")
    if record.format != FORMAT:
        return Standing(False, f"{path} has format {record.format}; this release reads {FORMAT}")
    if record.model_sha256 != sha256:
        return Standing(
            False,
            f"{path} qualifies sha256 {record.model_sha256[:16]}…, not this model ({sha256[:16]}…): backtest it again",
        )
    if not record.passed:
        failed = sorted(name for name, gate in record.gates.items() if not gate.get("pass"))
        return Standing(False, f"its backtest of {record.written_utc} failed the gates {', '.join(failed)}", record)
    laxer = _laxer(record, required) if required is not None else []
    if laxer:
        return Standing(False, f"it passed under laxer gates than [qualification] asks: {'; '.join(laxer)}", record)
    return Standing(
        True, f"qualified {record.written_utc} on {record.period.get('from')}..{record.period.get('to')}", record
    )


def accuracy_of(record: Qualification | None) -> float | None:
    """The direction accuracy the model qualified with, if recorded."""
    if record is None:
        return None
    value = record.metrics.get("accuracy")
    return float(value) if isinstance(value, int | float) else None
