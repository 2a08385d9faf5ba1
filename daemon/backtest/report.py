"""The backtest report: metrics.json, CSVs of the equity curve and the fills, PNG plots, and the
same document as Markdown and as one self-contained HTML file.

The document is built once as a list of blocks and rendered twice, so the Markdown and the HTML
cannot say different things. Output depends only on the inputs (no clock is read), and the plots
need matplotlib, from the ``report`` extra, imported only here.
"""

from __future__ import annotations

import base64
import csv
import html
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import orjson

from daemon.backtest.metrics import (
    CALL_CLASSES,
    MOVE_CLASSES,
    Calls,
    Gate,
    GateSpec,
    Metrics,
    Series,
    Trade,
    daily_pnl,
    direction_hits,
    drawdown,
    verdict,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS = ("equity", "drawdown", "daily_pnl", "rolling_accuracy", "confusion", "tick_to_order")


class ReportDependencyError(ImportError):
    """The plots need matplotlib, which only the ``report`` extra installs."""


# How each metric reads in the tables: (key, label, format).
_METRIC_ROWS: tuple[tuple[str, str, str], ...] = (
    ("total_return", "total return", "pct"),
    ("annual_return", "annual return", "pct"),
    ("benchmark_annual_return", "benchmark annual return", "pct"),
    ("excess_return", "excess return per year", "pct"),
    ("volatility", "volatility per year", "pct"),
    ("sharpe", "Sharpe", "ratio"),
    ("probabilistic_sharpe", "probabilistic Sharpe (vs 0)", "ratio"),
    ("sortino", "Sortino", "ratio"),
    ("calmar", "Calmar", "ratio"),
    ("max_drawdown", "max drawdown", "pct"),
    ("max_drawdown_bars", "longest drawdown (bars)", "int"),
    ("max_drawdown_seconds", "longest drawdown (time)", "duration"),
    ("days", "trading days", "int"),
    ("losing_days_in_a_row", "losing days in a row", "int"),
    ("hit_rate", "winning days (of days with a profit or loss)", "pct"),
    ("trades", "fills", "int"),
    ("turnover", "turnover (traded / mean equity)", "times"),
    ("turnover_per_year", "turnover per year", "times"),
    ("costs", "costs paid", "money"),
    ("final_equity", "final equity", "money"),
    ("accuracy", "direction accuracy", "pct"),
    ("accuracy_judged", "calls judged", "int"),
    ("balanced_accuracy", "balanced accuracy (3 classes)", "pct"),
    ("mcc", "Matthews correlation (3 classes)", "ratio"),
    ("ic", "IC (Pearson)", "ratio"),
    ("rank_ic", "rank IC (Spearman)", "ratio"),
)
_FORMAT = {key: kind for key, _, kind in _METRIC_ROWS}


def _fmt(value: object, kind: str) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a" if value is None else str(value)
    match kind:
        case "pct":
            return f"{value * 100:.2f} %"
        case "int":
            return f"{int(value):,}"
        case "money":
            return f"{value:,.2f}"
        case "times":
            return f"{value:.2f}x"
        case "duration":
            minutes, _ = divmod(int(value), 60)
            hours, minutes = divmod(minutes, 60)
            days, hours = divmod(hours, 24)
            return f"{days}d {hours:02d}h {minutes:02d}m"
        case _:
            return f"{value:.3f}"


# --- the document as blocks -----------------------------------------------------------------


@dataclass(frozen=True)
class _Heading:
    level: int
    text: str


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Quote:
    text: str


@dataclass(frozen=True)
class _Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class _Image:
    alt: str
    file: str


_Block = _Heading | _Text | _Quote | _Table | _Image


def _flatten(prefix: str, value: object) -> Iterator[tuple[str, str]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _flatten(f"{prefix} / {k}" if prefix else str(k), v)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value, 1):
            if isinstance(v, Mapping):  # a record, such as {"path", "sha256"}: one row
                yield f"{prefix} {i}", ", ".join(f"{k}: {x}" for k, x in v.items())
            else:
                yield from _flatten(f"{prefix} {i}", v)
    else:
        yield prefix, str(value)


def _title(meta: Mapping[str, object]) -> str:
    model = meta.get("model")
    if isinstance(model, Mapping):  # {"name", "path", "sha256", ...}
        model = model.get("name") or model.get("path")
    return f"Backtest report: {model or 'model'}"


def _latency_line(t2o_us: npt.NDArray[np.float64]) -> str:
    if not len(t2o_us):
        return "Tick to order: no orders were sent."
    p50, p99 = np.percentile(t2o_us, [50, 99])
    return (
        f"Tick to order: {len(t2o_us):,} orders, p50 {p50:,.1f} µs, p99 {p99:,.1f} µs, "
        f"max {float(np.max(t2o_us)):,.1f} µs."
    )


def _document(
    metrics: Metrics,
    gate_results: Mapping[str, Gate],
    baselines: Mapping[str, Metrics],
    meta: Mapping[str, object],
    t2o_us: npt.NDArray[np.float64],
) -> list[_Block]:
    passed = verdict(gate_results)
    failed = [name for name, g in gate_results.items() if not g["pass"]]
    a = metrics["annualisation"]
    balance = metrics["class_balance"]
    values: Mapping[str, object] = metrics
    columns: dict[str, Mapping[str, object]] = {"model": metrics, **baselines}
    return [
        _Heading(1, _title(meta)),
        _Heading(2, "Verdict: QUALIFIED" if passed else "Verdict: NOT QUALIFIED"),
        _Text(
            f"All {len(gate_results)} gates pass."
            if passed
            else f"Failed {len(failed)} of {len(gate_results)} gates: {', '.join(failed) or 'none defined'}."
        ),
        _Table(
            ("gate", "value", "threshold", "pass"),
            tuple(
                (
                    name,
                    _fmt(g["value"], _FORMAT.get(name, "ratio")),
                    f"{g['op']} {_fmt(g['threshold'], _FORMAT.get(name, 'ratio'))}",
                    "yes" if g["pass"] else "NO",
                )
                for name, g in gate_results.items()
            ),
        ),
        _Heading(2, "Metrics"),
        _Text(
            f"Annualisation: {a['name']} session, {a['minutes_per_day']} bars a day x {a['days_per_year']} "
            f"days = {a['periods_per_year']:,} bars a year. Ratios use per-bar simple returns and a "
            "risk-free rate of zero; the benchmark starts with the same capital."
        ),
        _Table(("metric", "value"), tuple((label, _fmt(values[key], kind)) for key, label, kind in _METRIC_ROWS)),
        _Text(_latency_line(t2o_us)),
        _Heading(2, "Accuracy"),
        _Quote(metrics["accuracy_definition"]),
        _Table(
            ("call \\ next move", *MOVE_CLASSES, "calls"),
            tuple(
                (call, *(f"{n:,}" for n in row), f"{balance['calls'][call]:,}")
                for call, row in zip(CALL_CLASSES, metrics["confusion"], strict=True)
            ),
        ),
        _Text(
            "Moves with a known next close: "
            + ", ".join(f"{move} {balance['moves'][move]:,}" for move in MOVE_CLASSES)
            + f". Calls in all: {metrics['calls']:,} (those without a next close are not in the table)."
        ),
        _Heading(2, "Baselines"),
        _Table(
            ("metric", *columns),
            tuple((label, *(_fmt(m.get(key), kind) for m in columns.values())) for key, label, kind in _METRIC_ROWS),
        ),
        _Heading(2, "Run"),
        _Table(("item", "value"), tuple(_flatten("", meta))),
        _Heading(2, "Plots"),
        *(_Image(name.replace("_", " "), f"{name}.png") for name in PLOTS),
    ]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown(blocks: Sequence[_Block]) -> str:
    out: list[str] = []
    for block in blocks:
        match block:
            case _Heading(level, text):
                out.append(f"{'#' * level} {text}")
            case _Text(text):
                out.append(text)
            case _Quote(text):
                out.append(f"> {text}")
            case _Table(header, rows):
                lines = [header, tuple("---" for _ in header), *rows]
                out.append("\n".join("| " + " | ".join(_md_cell(c) for c in line) + " |" for line in lines))
            case _Image(alt, file):
                out.append(f"![{alt}]({file})")
    return "\n\n".join(out) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}"
    "th{background:#f3f3f3}blockquote{border-left:4px solid #ccc;margin:1rem 0;padding:.25rem 1rem;color:#444}"
    "img{max-width:100%;display:block;margin:1rem 0}"
)


def _html(blocks: Sequence[_Block], title: str, images: Mapping[str, bytes]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for block in blocks:
        match block:
            case _Heading(level, text):
                out.append(f"<h{level}>{e(text)}</h{level}>")
            case _Text(text):
                out.append(f"<p>{e(text)}</p>")
            case _Quote(text):
                out.append(f"<blockquote>{e(text)}</blockquote>")
            case _Table(header, rows):
                head = "".join(f"<th>{e(c)}</th>" for c in header)
                body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            case _Image(alt, file):
                data = base64.b64encode(images[file]).decode("ascii")
                out.append(f'<img alt="{e(alt)}" src="data:image/png;base64,{data}">')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --- data files -----------------------------------------------------------------------------


def _utc(ts_ns: npt.NDArray[np.int64]) -> list[str]:
    return [f"{s}Z" for s in np.datetime_as_string(np.asarray(ts_ns, dtype="datetime64[ns]"), unit="s")]


def _write_equity_csv(path: Path, series: Series) -> None:
    # repr() round-trips a float exactly, so max(-drawdown) here equals metrics.json's max_drawdown.
    dd = drawdown(series.equity)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("ts", "time_utc", "equity", "benchmark", "drawdown"))
        for row in zip(series.ts_ns.tolist(), _utc(series.ts_ns), series.equity, series.benchmark, dd, strict=True):
            w.writerow((row[0], row[1], *(repr(float(v)) for v in row[2:])))


def _write_trades_csv(path: Path, trades: Sequence[Trade]) -> None:
    times = _utc(np.array([t.ts_ns for t in trades], dtype=np.int64))
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("ts", "time_utc", "order_id", "symbol", "side", "qty", "price", "cost"))
        for t, time_utc in zip(trades, times, strict=True):
            w.writerow((t.ts_ns, time_utc, t.order_id, t.symbol, t.side, t.qty, repr(t.price), repr(t.cost)))


# --- plots ----------------------------------------------------------------------------------


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as e:
        raise ReportDependencyError(
            "the backtest report's plots need matplotlib: pip install 'tradingd[report]'"
        ) from e
    return Figure


def _save(fig: Figure, path: Path) -> bytes:
    # No Software tag: the bytes then depend on the inputs alone.
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    return path.read_bytes()


def _empty(fig: Figure, message: str) -> None:
    ax = fig.subplots()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _plots(
    folder: Path,
    figure: type[Figure],
    series: Series,
    metrics: Metrics,
    hits: npt.NDArray[np.bool_],
    rolling: int,
    threshold: float,
    t2o_us: npt.NDArray[np.float64],
) -> dict[str, bytes]:
    when = np.asarray(series.ts_ns, dtype="datetime64[ns]")
    images: dict[str, bytes] = {}

    fig = figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(when, series.equity, label="model", linewidth=1)
    ax.plot(when, series.benchmark, label="benchmark (buy and hold)", linewidth=1, color="grey")
    ax.set(title="Equity", ylabel="portfolio value")
    ax.legend()
    images["equity.png"] = _save(fig, folder / "equity.png")

    fig = figure(figsize=(10, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.fill_between(when, drawdown(series.equity) * 100, 0, color="tab:red", alpha=0.4, linewidth=0)
    ax.set(title="Drawdown", ylabel="% below peak")
    images["drawdown.png"] = _save(fig, folder / "drawdown.png")

    days, pnl = daily_pnl(series.ts_ns, series.equity)
    fig = figure(figsize=(10, 3.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(days))
    ax.bar(x, pnl, color=["tab:red" if p < 0 else "tab:green" for p in pnl])
    step = max(1, len(days) // 15)
    ax.set_xticks(x[::step], days[::step], rotation=45, ha="right")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set(title="Daily P&L (losing days red)", ylabel="profit")
    images["daily_pnl.png"] = _save(fig, folder / "daily_pnl.png")

    fig = figure(figsize=(10, 3.5), layout="constrained")
    if len(hits):
        ax = fig.subplots()
        total = np.cumsum(hits, dtype=np.float64)
        window = np.minimum(np.arange(1, len(hits) + 1), rolling)
        lagged = np.concatenate((np.zeros(rolling), total))[: len(hits)]
        ax.plot(np.arange(1, len(hits) + 1), (total - lagged) / window * 100, linewidth=1)
        ax.axhline(threshold * 100, color="tab:red", linestyle="--", label=f"gate {threshold * 100:.0f} %")
        ax.set(title=f"Direction accuracy over the last {rolling:,} judged calls", xlabel="judged call", ylabel="%")
        ax.legend()
    else:
        _empty(fig, "no judged calls")
    images["rolling_accuracy.png"] = _save(fig, folder / "rolling_accuracy.png")

    fig = figure(figsize=(5, 4.5), layout="constrained")
    ax = fig.subplots()
    matrix = np.asarray(metrics["confusion"])
    ax.imshow(matrix, cmap="Blues")
    for (row, col), n in np.ndenumerate(matrix):
        dark = n > matrix.max() / 2
        ax.text(col, row, f"{n:,}", ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks(range(3), MOVE_CLASSES)
    ax.set_yticks(range(3), CALL_CLASSES)
    ax.set(title="Calls against next moves", xlabel="next move", ylabel="call")
    images["confusion.png"] = _save(fig, folder / "confusion.png")

    fig = figure(figsize=(10, 3.5), layout="constrained")
    if len(t2o_us):
        ax = fig.subplots()
        # A log axis has no zero: latencies under 0.1 us (a simulated clock) are drawn at 0.1 us.
        latencies = np.maximum(t2o_us, 0.1)
        low, high = float(latencies.min()), float(latencies.max())
        bins = np.geomspace(low, high, 60) if high > low else np.array([low / 1.1, high * 1.1])
        ax.hist(latencies, bins=bins.tolist())
        ax.set_xscale("log")
        for q, style in ((50, "--"), (99, ":")):
            ax.axvline(float(np.percentile(latencies, q)), color="black", linestyle=style, label=f"p{q}")
        ax.set(title="Tick to order", xlabel="µs", ylabel="orders")
        ax.legend()
    else:
        _empty(fig, "no orders")
    images["tick_to_order.png"] = _save(fig, folder / "tick_to_order.png")
    return images


# --- the report -----------------------------------------------------------------------------


def write_report(
    folder: Path,
    *,
    metrics: Metrics,
    gates: Mapping[str, Gate],
    baselines: Mapping[str, Metrics],
    series: Series,
    trades: Sequence[Trade],
    calls: Calls,
    t2o_us: npt.NDArray[np.float64],
    meta: Mapping[str, object],
    rolling: int = 500,
) -> list[Path]:
    """Write the report into ``folder`` (created if missing) and return the paths written."""
    if rolling < 1:
        raise ValueError(f"rolling must be at least one judged call, not {rolling}")
    figure = _figure_class()
    folder.mkdir(parents=True, exist_ok=True)
    t2o = np.asarray(t2o_us, dtype=np.float64)
    t2o = t2o[np.isfinite(t2o)]
    document = {
        "meta": dict(meta),
        "metrics": metrics,
        "gates": dict(gates),
        "verdict": verdict(gates),
        "baselines": dict(baselines),
    }
    paths = [folder / name for name in ("metrics.json", "equity.csv", "trades.csv")]
    paths[0].write_bytes(
        orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
    )
    _write_equity_csv(paths[1], series)
    _write_trades_csv(paths[2], trades)

    accuracy_gate = gates.get("accuracy")
    threshold = float(accuracy_gate["threshold"]) if accuracy_gate else GateSpec().min_accuracy
    hits = direction_hits(calls.signal, calls.next_return)
    images = _plots(folder, figure, series, metrics, hits, rolling, threshold, t2o)
    paths += [folder / name for name in images]

    blocks = _document(metrics, gates, baselines, meta, t2o)
    title = _title(meta)
    for name, text in (("report.md", _markdown(blocks)), ("report.html", _html(blocks, title, images))):
        (folder / name).write_text(text, encoding="utf-8", newline="\n")
        paths.append(folder / name)
    return paths
