"""``tradingd backtest``: qualify a model before it trades.

Exit codes: 0 every gate passed, 1 a gate failed, 2 a usage error (argparse's), 78 a bad
configuration or model, 70 the daemon failed during the run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import orjson

from daemon import qualification
from daemon.errors import EX_CONFIG, EX_SOFTWARE

EX_FAILED = 1
EX_USAGE = 2
EX_CANTCREAT = 73


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a date like 2013-10-07: {text!r}") from exc


def _bps(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1000.0:
        raise argparse.ArgumentTypeError(f"{text}: basis points between 0 and 1000")
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "backtest",
        help="run a model through the daemon's own path over history; gates decide if it may trade",
    )
    p.add_argument("--data", type=Path, action="append", required=True, help="minute bars (CSV or DBN); repeatable")
    p.add_argument("--model", default="builtin", help="builtin (the shipped model) or a model.onnx with its manifest")
    p.add_argument("--config", type=Path, help="the deployment's configuration: its signal, risk and [qualification]")
    p.add_argument("--benchmark", help="a symbol bought and held (default: the equal-weighted universe)")
    p.add_argument("--cost-bps", type=_bps, default=1.0, help="costs per fill, basis points of its notional")
    p.add_argument("--slippage-bps", type=_bps, default=1.0, help="every fill this much worse than the bar's open")
    p.add_argument("--from", dest="start", type=_date, help="first day (UTC) of bars to run on")
    p.add_argument("--to", dest="end", type=_date, help="last day (UTC), inclusive")
    p.add_argument("--capital", type=float, help="starting capital (default: one signal's notional per symbol)")
    p.add_argument("--approve-reviews", action="store_true", help="approve orders parked for review (default: reject)")
    p.add_argument("--no-baselines", action="store_true", help="skip the momentum and always-buy runs")
    p.add_argument(
        "--keep-halts",
        action="store_true",
        help="never lift a halt (default: an operator lifts every halt at the next session, UTC day)",
    )
    p.add_argument("--report", type=Path, help="write the report folder here (metrics, CSVs, plots, report.md/html)")
    p.add_argument("--no-qualify", action="store_true", help="do not write qualification.json beside the model")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    p.set_defaults(func=cmd_backtest)


def cmd_backtest(args: argparse.Namespace) -> int:
    from daemon.backtest import metrics as bm  # noqa: PLC0415
    from daemon.backtest.run import BacktestError, Options, finite_or_none, run_backtest  # noqa: PLC0415
    from daemon.cli import _run_async  # noqa: PLC0415
    from daemon.config import Config, load_config  # noqa: PLC0415
    from daemon.logs import configure_logging  # noqa: PLC0415

    if args.start and args.end and args.start > args.end:
        print(f"tradingd backtest: --from {args.start} is after --to {args.end}", file=sys.stderr)
        return EX_USAGE
    configure_logging("error")  # the daemon's per-bar warnings would drown the progress line
    base = load_config(args.config) if args.config else Config()
    options = Options(
        data=tuple(args.data),
        model=args.model,
        benchmark=args.benchmark,
        cost_bps=args.cost_bps,
        slippage_bps=args.slippage_bps,
        start=args.start,
        end=args.end,
        capital=args.capital,
        approve_reviews=args.approve_reviews,
        baselines=not args.no_baselines,
        lift_halts=not args.keep_halts,
    )
    try:
        result = _run_async(run_backtest(options, base, str(args.config or "(defaults)")))
    except BacktestError as exc:
        print(f"tradingd backtest: {exc}", file=sys.stderr)
        return EX_SOFTWARE if exc.__cause__ is not None else EX_CONFIG
    written: list[Path] = []
    if args.report is not None:
        from daemon.backtest.report import write_report  # noqa: PLC0415

        model = result.model
        written = write_report(
            args.report,
            metrics=result.metrics,
            gates=result.gates,
            baselines=result.baselines,
            series=model.series,
            trades=model.trades,
            calls=model.calls,
            t2o_us=model.t2o_us,
            meta=result.meta,
        )
    qualified: Path | None = None
    if not args.no_qualify:
        meta = result.meta
        record = qualification.Qualification(
            format=qualification.FORMAT,
            model=Path(meta["model"]["path"]).name,
            model_sha256=meta["model"]["sha256"],
            passed=result.passed,
            written_utc=datetime.now(UTC).isoformat(timespec="seconds"),
            period=meta["period"],
            data=meta["data"],
            gates=finite_or_none(dict(result.gates)),
            metrics=finite_or_none(dict(result.metrics)),
            command=shlex.join(["tradingd", *sys.argv[1:]]),
        )
        try:
            qualified = qualification.write(Path(meta["model"]["path"]), record)
        except OSError as exc:
            # A verdict nobody can deploy by is not a result: say so and fail (EX_CANTCREAT).
            print(
                f"tradingd backtest: cannot write {qualification.FILE_NAME} beside the model ({exc});"
                " copy the model somewhere writable, or pass --no-qualify",
                file=sys.stderr,
            )
            return EX_CANTCREAT
    summary = {
        "verdict": "pass" if result.passed else "fail",
        "passed": result.passed,
        "gates": result.gates,
        "metrics": result.metrics,
        "baselines": result.baselines,
        "annualisation": result.metrics.get("annualisation"),
        "accuracy_definition": bm.ACCURACY_DEFINITION,
        "meta": result.meta,
        "report": [str(p) for p in written],
        "qualification": str(qualified) if qualified else None,
    }
    if args.json:
        sys.stdout.write(orjson.dumps(finite_or_none(summary), option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
    else:
        print(render(summary))
    return 0 if result.passed else EX_FAILED


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def render(summary: dict[str, Any]) -> str:
    meta = summary["meta"]
    lines = [
        f"model      {meta['model']['name']} {meta['model']['version']} sha256 {meta['model']['sha256'][:16]}",
        f"period     {meta['period']['from']} .. {meta['period']['to']},"
        f" {meta['symbols']} symbols, {meta['minutes']} minutes",
        f"verdict    {summary['verdict'].upper()}",
    ]
    for name, gate in summary["gates"].items():
        mark = "pass" if gate["pass"] else "FAIL"
        lines.append(f"  {name:<22} {_fmt(gate['value']):>10} {gate['op']} {_fmt(gate['threshold']):<8} {mark}")
    if summary["qualification"]:
        lines.append(f"written    {summary['qualification']}")
    if summary["report"]:
        lines.append(f"report     {Path(summary['report'][0]).parent}")
    return "\n".join(lines)
