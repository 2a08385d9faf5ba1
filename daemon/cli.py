"""The ``tradingd`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import structlog
import uvloop

from broker.crashpoints import CRASH, CrashPointError
from broker.errors import JournalError
from daemon.errors import EX_CONFIG, EX_SOFTWARE, EX_UNAVAILABLE, ConfigError
from daemon.logs import configure_logging
from engines.errors import BackendUnavailableError, EngineError, ManifestError, ModelMismatchError

# The export extra's default buckets, without importing torch to print --help.
DEFAULT_BUCKETS = (1, 8, 32, 64, 128, 256)

# --help is read as plain text in a terminal, so no reStructuredText here (unlike docstrings).
DESCRIPTION = (
    "tradingd: a low-latency inference trading daemon. Minute bars in over TCP, a signal model on "
    "TensorRT or ONNX Runtime, risk-gated orders out to the broker. Each command has its own --help."
)

if TYPE_CHECKING:
    from broker.sim import BrokerSimulator
    from daemon.feed.replay import ReplayServer

T = TypeVar("T")
log = structlog.get_logger("tradingd.cli")


def _run_async(coro: Coroutine[Any, Any, T], loop: str = "uvloop") -> T:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _announce(host: str, port: int) -> None:
    """The first stdout line of a server command, which the demo and tests read for the port."""
    sys.stdout.write(f"LISTENING {host}:{port}\n")
    sys.stdout.flush()


def _serve(server: ReplayServer | BrokerSimulator, host: str, port: int) -> None:
    """Run a server command: listen, announce the port, serve until SIGTERM or SIGINT."""

    async def main() -> None:
        bound = await server.start(host, port)
        _announce(host, bound)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.close()

    _run_async(main())


# -- commands ---------------------------------------------------------------------------------


def parse_cpus(text: str) -> set[int]:
    """``"2-3,6"`` -> {2, 3, 6} (the cpuset list format of TRADINGD_CPUS)."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError("(environment)", "TRADINGD_CPUS", f"not a CPU list like '2-3,6': {text!r}")
        cpus.update(range(int(lo), int(hi if sep else lo) + 1))
    if not cpus:
        raise ConfigError("(environment)", "TRADINGD_CPUS", "empty CPU list")
    return cpus


def pin_cpus(text: str) -> None:
    """Keep the process on the CPUs of ``TRADINGD_CPUS`` (blank: wherever it was started).

    Under systemd the unit pins the process before it starts (``CPUAffinity=``, in a drop-in
    written from the environment file: deploy/README.md), because its system-call filter denies
    ``sched_setaffinity``; so the daemon first checks whether it already runs there, and moves
    itself only where it does not (a shell, a benchmark). A move the sandbox refuses means the
    drop-in and the environment file disagree: a configuration error, which names the fix.
    """
    if not text.strip():
        return
    wanted = parse_cpus(text)
    current = os.sched_getaffinity(0)
    if current == wanted:
        return
    try:
        os.sched_setaffinity(0, wanted)
    except OSError as exc:
        raise ConfigError(
            "(environment)",
            "TRADINGD_CPUS",
            f"the process runs on CPUs {','.join(map(str, sorted(current)))} and cannot move to {text.strip()} "
            f"({exc.strerror or exc}); under systemd the unit must pin it: CPUAffinity={text.strip()} in "
            "/etc/systemd/system/tradingd.service.d/cpus.conf (deploy/README.md: CPU pinning)",
        ) from exc


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.app import Daemon  # noqa: PLC0415
    from daemon.config import config_digest, load_config  # noqa: PLC0415
    from daemon.sdnotify import Notifier  # noqa: PLC0415
    from daemon.version import build_info  # noqa: PLC0415

    config = load_config(Path(args.config))
    configure_logging(config.log.level)
    if CRASH.error is not None:
        raise CrashPointError(CRASH.error)
    if CRASH.armed:
        log.warning("crash_point_armed", point=CRASH.point, at=CRASH.at, detail="a test setting, never production")
    pin_cpus(os.environ.get("TRADINGD_CPUS", ""))
    log.info(
        "config",
        file=args.config,
        sha256=config_digest(config),
        cpus=sorted(os.sched_getaffinity(0)),
        loop=args.loop,
        pid=os.getpid(),
        **build_info().fields(),
    )

    async def main() -> int:
        notifier = Notifier()
        daemon = Daemon(config, config_file=args.config, notifier=notifier)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)
        # A stop may come in any start-up state (the broker unreachable, say): start-up races it.
        starting = asyncio.create_task(daemon.start(on_status=lambda s: log.info("status", status=s)))
        stopping = asyncio.create_task(daemon.wait_stopped())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a start-up error is raised here
                await stopping
            else:
                log.warning("stopped_during_start_up")
                daemon.start_interrupted = True
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
        finally:
            stopping.cancel()
            await daemon.shutdown()
            notifier.close()
        code = 0
        if daemon.fatal is not None:
            print(f"tradingd run: fail-stop: {daemon.fatal}", file=sys.stderr)
            code = EX_SOFTWARE
        if code or daemon.start_interrupted:
            # A fail-stop, or a stop during start-up, exits here: a hung inference, or an engine
            # load or warm-up still running in its thread, must not hold the exit hostage to the
            # interpreter's join of its worker threads.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code

    return _run_async(main(), loop=args.loop)


def cmd_check(args: argparse.Namespace) -> int:
    """Every check ``run`` makes short of opening sockets: the file, the environment's CPU list,
    the engines (loaded, as ``run`` loads them) and the paths; exits as ``run`` would on each."""
    from daemon.clock import SystemClock  # noqa: PLC0415
    from daemon.config import config_digest, load_config  # noqa: PLC0415
    from daemon.preflight import preflight  # noqa: PLC0415

    config = load_config(Path(args.config))
    configure_logging(config.log.level)
    cpus = os.environ.get("TRADINGD_CPUS", "")
    if cpus.strip():
        parse_cpus(cpus)
    lines = preflight(config, args.config, SystemClock.mono_ns)
    for line in lines:
        print(f"  {line}")
    print(f"{args.config}: ok, sha256 {config_digest(config)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import DemoError, DemoOptions, dumps, render_text, run_demo  # noqa: PLC0415

    configure_logging(args.log_level, args.log_file)
    options = DemoOptions(
        minutes=args.minutes,
        symbols=args.symbols,
        data=args.data,
        seed=args.seed,
        review_threshold=args.review_threshold,
        metrics=not args.no_metrics,
        metrics_port=args.metrics_port,
        samples_out=args.samples_out,
        broker=args.broker,
        broker_port=args.broker_port,
        fix_sender=args.fix_sender,
        fix_target=args.fix_target,
        feed=args.feed,
        model=args.model,
    )
    try:
        summary = _run_async(run_demo(options))
    except DemoError as exc:
        print(f"tradingd demo: {exc}", file=sys.stderr)
        return 1
    print(dumps(summary) if args.json else render_text(summary))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from daemon.feed.replay import ReplayError, open_replay  # noqa: PLC0415

    try:
        server = open_replay(Path(args.file), feed_format=args.format, speed=args.speed)
    except (OSError, ReplayError) as exc:
        print(f"tradingd replay: {exc}", file=sys.stderr)
        return 1
    _serve(server, args.host, args.port)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from daemon.feed.synth import SynthParams, generate, write_csv, write_dbn_file  # noqa: PLC0415

    universe = generate(SynthParams(symbols=args.symbols, minutes=args.minutes, seed=args.seed))
    out = Path(args.out)
    fmt = args.format or ("dbn" if out.name.endswith((".dbn", ".dbn.zst")) else "csv")
    if fmt == "dbn":
        rows = write_dbn_file(universe, out, compress="zstd" if out.name.endswith(".zst") else None)
    else:
        rows = write_csv(universe, out)
    print(f"wrote {rows} bars ({args.symbols} symbols x {args.minutes} minutes, seed {args.seed}) to {args.out}")
    return 0


def cmd_broker_sim(args: argparse.Namespace) -> int:
    from broker.sim import BrokerSimulator, SimConfig  # noqa: PLC0415

    config = SimConfig(
        latency_us=args.latency_us,
        partial_fills=args.partial_fills,
        reject_rate=args.reject_rate,
        seed=args.seed,
        duplicate_rate=args.duplicate_rate,
        reorder_rate=args.reorder_rate,
        garble_rate=args.garble_rate,
        rest=args.rest,
        fill_resting=args.fill_resting,
    )

    _serve(BrokerSimulator(config, Path(args.log) if args.log else None), args.host, args.port)
    return 0


def cmd_model_export(args: argparse.Namespace) -> int:
    from engines.chooser import DEFAULT_MODEL  # noqa: PLC0415
    from engines.model.export import export_onnx  # noqa: PLC0415
    from engines.model.qwen_signal import load_checkpoint  # noqa: PLC0415

    checkpoint = Path(args.checkpoint) if args.checkpoint else DEFAULT_MODEL.parent / "checkpoint"
    print(f"loading checkpoint {checkpoint}", file=sys.stderr)
    model, meta = load_checkpoint(checkpoint)
    print("exporting to ONNX (dynamo exporter, dynamic batch)", file=sys.stderr)
    path = export_onnx(model, meta, Path(args.out), buckets=tuple(args.buckets))
    print(f"wrote {path} and {path.with_name(path.stem + '.manifest.json').name}")
    return 0


def cmd_model_train(args: argparse.Namespace) -> int:
    from daemon.feed.synth import SynthParams, generate  # noqa: PLC0415

    if args.walk_forward:
        if not args.data:
            raise SystemExit("tradingd model train: --walk-forward needs --data")
        from daemon.backtest.walk import walk_forward  # noqa: PLC0415

        return walk_forward(args)
    if args.data:
        from daemon.backtest.walk import training_series  # noqa: PLC0415

        series, label = training_series(args.data, args.train_until, args.embargo_bars)
    else:
        universe = generate(SynthParams(symbols=args.symbols, minutes=args.minutes, seed=args.seed))
        series, label = list(universe.values()), "synthetic bars (tradingd synth)"
    path = train_and_export(args, series, label, Path(args.out))
    if args.data and args.train_until:
        data = " ".join(f"--data {d}" for d in args.data)
        print(f"next: tradingd backtest {data} --model {path} --from {args.train_until}")
    return 0


def train_and_export(args: argparse.Namespace, series: list[Any], label: str, out: Path) -> Path:
    """Train on per-symbol OHLCV arrays, save the checkpoint and export the ONNX with its manifest."""
    from engines.model.export import export_onnx  # noqa: PLC0415
    from engines.model.qwen_signal import save_checkpoint  # noqa: PLC0415
    from engines.model.train import train  # noqa: PLC0415

    print(f"training on {label} ({len(series)} symbols) for {args.steps} steps", file=sys.stderr)
    model, meta, report = train(
        series,
        steps=args.steps,
        seed=args.seed,
        window=args.window,
        name=args.name,
        hidden=args.hidden,
        layers=args.layers,
        version=args.version,
        progress=lambda step, loss: print(f"  step {step}/{args.steps} loss {loss:.4f}", file=sys.stderr),
        data=label,
    )
    save_checkpoint(model, meta, out / "checkpoint")
    path = export_onnx(model, meta, out, buckets=tuple(args.buckets))
    print(
        f"holdout accuracy {report.holdout_accuracy:.3f}, direction accuracy {report.holdout_direction_accuracy:.3f}"
        f" on {report.holdout_samples} windows; trained in {report.seconds:.1f} s"
    )
    print(f"wrote {out / 'checkpoint'} and {path}")
    return path


def cmd_model_finetune(args: argparse.Namespace) -> int:
    """LoRA-fine-tune a Qwen3 checkpoint on real bars, merge, export; 78 when the base or its shapes are bad."""
    from daemon.backtest.walk import training_series  # noqa: PLC0415
    from engines.model.export import export_onnx  # noqa: PLC0415
    from engines.model.finetune import FinetuneError, finetune, read_base_config  # noqa: PLC0415
    from engines.model.qwen_signal import META_FILE, SignalMeta, save_checkpoint  # noqa: PLC0415

    base, out = Path(args.base), Path(args.out)
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip()) if args.target_modules else None
    try:
        read_base_config(base)  # refuse a bad base before reading any bars
        window = args.window
        if window is None and (base / META_FILE).is_file():
            window = SignalMeta.from_json((base / META_FILE).read_text()).window
        series, label = training_series(args.data, args.train_until, args.embargo_bars, window or 16)
        print(
            f"fine-tuning {base} with LoRA r={args.lora_rank} alpha={args.lora_alpha} dropout={args.lora_dropout}"
            f" on {label} ({len(series)} symbols) for {args.steps} steps",
            file=sys.stderr,
        )
        model, meta, report = finetune(
            base,
            series,
            out,
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            target_modules=targets,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            window=args.window,
            threads=args.threads,
            data=label,
            progress=lambda step, train_loss, val_loss: print(
                f"  step {step}/{args.steps} train loss {train_loss:.4f} val loss {val_loss:.4f}", file=sys.stderr
            ),
        )
    except FinetuneError as exc:
        print(f"tradingd: model error: {exc}", file=sys.stderr)
        return EX_CONFIG
    training = dict(meta.training)
    training["train_until"] = args.train_until.isoformat() if args.train_until else None
    training["embargo_bars"] = meta.window if args.embargo_bars is None else args.embargo_bars
    meta = SignalMeta(meta.name, meta.version, meta.window, meta.features, training)
    save_checkpoint(model, meta, out / "checkpoint")
    print("exporting the merged model to ONNX (dynamo exporter, dynamic batch)", file=sys.stderr)
    path = export_onnx(model, meta, out, buckets=tuple(args.buckets))
    print(
        f"validation loss {report.first_val_loss:.4f} -> {report.last_val_loss:.4f};"
        f" holdout accuracy {report.holdout_accuracy:.3f}, direction accuracy {report.holdout_direction_accuracy:.3f}"
        f" on {report.holdout_samples} windows; {report.trainable_parameters} of {report.total_parameters}"
        f" parameters trained, in {report.seconds:.1f} s"
    )
    print(f"wrote {path}, {out / 'checkpoint'}, {report.adapter}" + (f", {report.loss_png}" if report.loss_png else ""))
    data = " ".join(f"--data {d}" for d in args.data)
    start = f" --from {args.train_until}" if args.train_until else ""
    print(f"next: tradingd backtest {data} --model {path}{start}")
    return 0


def _admin(args: argparse.Namespace, message: dict[str, object]) -> int:
    from daemon.admin import request  # noqa: PLC0415
    from daemon.config import AdminConfig, load_config  # noqa: PLC0415

    path = args.socket or (load_config(Path(args.config)).admin.socket if args.config else AdminConfig().socket)
    try:
        reply = request(path, message)
    except OSError as exc:
        print(f"tradingd: cannot reach the daemon's admin socket {path}: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"tradingd: {reply.get('error')}", file=sys.stderr)
        return 1
    print(orjson.dumps(reply.get("result"), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    return _admin(args, {"cmd": "status"})


def cmd_review(args: argparse.Namespace) -> int:
    match args.action:
        case "list":
            return _admin(args, {"cmd": "review_list"})
        case "approve":
            return _admin(args, {"cmd": "review_approve", "id": args.id})
        case _:
            return _admin(args, {"cmd": "review_reject", "id": args.id, "reason": args.reason})


def cmd_halt(args: argparse.Namespace) -> int:
    target: dict[str, object] = {"all": True} if args.all else {"symbol": args.symbol}
    if getattr(args, "reducing", False):
        target["reducing"] = True
    return _admin(args, {"cmd": args.command, **target})


def cmd_kill(args: argparse.Namespace) -> int:
    return _admin(args, {"cmd": "kill"})


def cmd_failover(args: argparse.Namespace) -> int:
    return _admin(args, {"cmd": "failover", "to": args.to})


def cmd_model_build_plan(args: argparse.Namespace) -> int:
    from engines.plan import build_plan  # noqa: PLC0415

    onnx = Path(args.onnx)
    out = Path(args.out) if args.out else onnx.with_suffix(".plan")
    build = build_plan(
        onnx,
        out,
        workspace_mib=args.workspace_mib,
        fp16=args.fp16,
        progress=lambda m: print(f"build-plan: {m}", file=sys.stderr, flush=True),
    )
    import msgspec  # noqa: PLC0415

    print(msgspec.json.format(msgspec.json.encode(build), indent=2).decode())
    return 0


# -- parser -----------------------------------------------------------------------------------


class _VersionAction(argparse.Action):
    """``--version``: worked out only when asked for (it reads package metadata and may ask git)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from daemon.version import build_info  # noqa: PLC0415

        print(build_info().render())
        parser.exit()


def _describe_subcommands(parser: argparse.ArgumentParser) -> None:
    # A subcommand's own --help opens with the line the command list shows for it.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                subparser = action.choices[choice.dest]
                if subparser.description is None and choice.help:
                    subparser.description = choice.help[0].upper() + choice.help[1:] + "."
                _describe_subcommands(subparser)


def _training_window_args(p: argparse.ArgumentParser) -> None:
    """``--train-until`` and ``--embargo-bars``, as ``model train`` and ``model finetune`` take them."""
    p.add_argument("--train-until", type=_iso_date, help="train on bars before this day (UTC); backtest from it")
    p.add_argument(
        "--embargo-bars",
        type=int,
        default=None,
        help="drop each symbol's last N bars before --train-until, so no label reaches past it (default: the window)",
    )


def _iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a date like 2013-10-09: {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tradingd", description=DESCRIPTION)
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the version, the git commit it was built from and the runtime libraries' versions, and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon")
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop (asyncio: a baseline)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "check",
        help="check a configuration, its engines and paths as run would, and exit (78 naming the key if it is bad)",
    )
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", help="feed, daemon and broker simulator on this machine, then a summary")
    p.add_argument("--minutes", type=int, default=30)
    p.add_argument("--symbols", type=int, default=32)
    p.add_argument("--data", type=Path, help="replay this file (CSV or DBN) instead of synthetic bars")
    p.add_argument("--feed", choices=["msgpack", "dbn"], help="feed format (default: dbn for a DBN file)")
    p.add_argument("--model", default="builtin", help="builtin (the shipped model) or a model.onnx with its manifest")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--review-threshold", type=float, default=1_000_000.0, help="park orders of this notional or more")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning")
    p.add_argument("--log-file", type=Path, help="append the daemon's JSON log lines here (default: stderr)")
    p.add_argument("--no-metrics", action="store_true", help="serve no Prometheus metrics")
    p.add_argument("--samples-out", type=Path, help="write every tick-to-order sample (µs) to this file")
    p.add_argument(
        "--broker",
        choices=["sim", "fix44", "fix42"],
        default="sim",
        help="sim: start the broker simulator; fix44/fix42: trade with a FIX acceptor already on --broker-port",
    )
    p.add_argument("--broker-port", type=int, help="the FIX acceptor's port on 127.0.0.1")
    p.add_argument("--fix-sender", default="TRADINGD", help="our SenderCompID")
    p.add_argument("--fix-target", default="EXECUTOR", help="the acceptor's CompID (our TargetCompID)")
    p.add_argument("--metrics-port", type=int, default=0, help="serve metrics on 127.0.0.1:P (default: a free port)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("replay", help="serve a file of minute bars (CSV or DBN) as a feed")
    p.add_argument("file", help="CSV, or DBN (.dbn or .dbn.zst, told apart by content)")
    p.add_argument("--format", choices=["msgpack", "dbn"], default="msgpack", help="the feed protocol to serve it in")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="0 picks a free port (printed on stdout)")
    p.add_argument("--speed", type=float, default=1.0, help="multiple of real time; 0 = as fast as possible")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("synth", help="write a synthetic universe of minute bars")
    p.add_argument("--symbols", type=int, required=True)
    p.add_argument("--minutes", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True, help="the file to write (.dbn or .dbn.zst: DBN unless --format says)")
    p.add_argument("--format", choices=["csv", "dbn"], help="csv, or dbn (OHLCV-1m; zstd when --out ends .zst)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("broker-sim", help="a broker simulator on the native gateway protocol")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="0 picks a free port (printed on stdout)")
    p.add_argument(
        "--log",
        help="append every order received and every execution as JSON lines; an existing log is "
        "remembered (orders, positions, every client order id ever received)",
    )
    p.add_argument("--latency-us", type=int, default=0)
    p.add_argument("--partial-fills", type=int, default=1)
    p.add_argument("--reject-rate", type=float, default=0.0)
    p.add_argument("--rest", action="store_true", help="acknowledge orders and fill none (they rest)")
    p.add_argument(
        "--fill-resting", action="store_true", help="at start, fill the orders an earlier life (--log) left resting"
    )
    p.add_argument("--duplicate-rate", type=float, default=0.0, help="hostile: repeat a report (same ExecID)")
    p.add_argument("--reorder-rate", type=float, default=0.0, help="hostile: swap two of an order's reports")
    p.add_argument("--garble-rate", type=float, default=0.0, help="hostile: a contradictory report first")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_broker_sim)

    admin = argparse.ArgumentParser(add_help=False)
    where = admin.add_mutually_exclusive_group()
    where.add_argument("--socket", help="the daemon's admin socket")
    where.add_argument("--config", help="read the admin socket's path from this configuration")

    p = sub.add_parser("status", parents=[admin], help="the running daemon's state")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("review", parents=[admin], help="orders waiting for manual review")
    p.add_argument("action", choices=["list", "approve", "reject"])
    p.add_argument("id", nargs="?", help="the parked order's id (approve, reject)")
    p.add_argument("--reason", default="rejected by operator")
    p.set_defaults(func=cmd_review)
    for name, text in (
        ("halt", "halt a symbol, or the market"),
        ("resume", "lift a halt (and, with --all, the kill switch)"),
    ):
        p = sub.add_parser(name, parents=[admin], help=text)
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("symbol", nargs="?")
        target.add_argument("--all", action="store_true", help="the whole market")
        if name == "halt":
            p.add_argument("--reducing", action="store_true", help="allow only orders that shrink a position")
        p.set_defaults(func=cmd_halt)
    p = sub.add_parser("kill", parents=[admin], help="halt everything and cancel every working order")
    p.set_defaults(func=cmd_kill)
    p = sub.add_parser("failover", parents=[admin], help="switch inference to the primary or the standby engine")
    p.add_argument("to", choices=["primary", "standby"])
    p.set_defaults(func=cmd_failover)

    from daemon.journal_tool import add_parser as add_journal_parser  # noqa: PLC0415

    add_journal_parser(sub)

    from daemon.backtest.cli import add_parser as add_backtest_parser  # noqa: PLC0415

    add_backtest_parser(sub)

    model = sub.add_parser("model", help="signal model tools (need the export extra)")
    msub = model.add_subparsers(dest="model_command", required=True)
    p = msub.add_parser("export", help="export a signal checkpoint to ONNX with its manifest")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the shipped model's)")
    p.add_argument("--out", required=True)
    p.add_argument("--buckets", type=int, nargs="+", default=list(DEFAULT_BUCKETS))
    p.set_defaults(func=cmd_model_export)
    p = msub.add_parser("train", help="train a small signal model on real or synthetic bars, then export it")
    p.add_argument("--out", required=True)
    p.add_argument("--data", type=Path, action="append", help="minute bars to train on (CSV or DBN; repeatable)")
    _training_window_args(p)
    p.add_argument(
        "--walk-forward",
        type=int,
        default=0,
        metavar="K",
        help="K folds: train on the days before each of the last K blocks of days, backtest on the block",
    )
    p.add_argument("--symbols", type=int, default=32)
    p.add_argument("--minutes", type=int, default=2000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--hidden", type=int, default=32, help="Qwen3 hidden size")
    p.add_argument("--layers", type=int, default=2, help="Qwen3 decoder layers")
    p.add_argument("--name", default="qwen-signal")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--buckets", type=int, nargs="+", default=list(DEFAULT_BUCKETS))
    p.set_defaults(func=cmd_model_train)
    p = msub.add_parser("finetune", help="LoRA-fine-tune a Qwen3 checkpoint on real bars, merge it, then export it")
    p.add_argument("--base", required=True, help="a signal checkpoint, or a Qwen3 save_pretrained directory")
    p.add_argument("--data", type=Path, action="append", required=True, help="minute bars (CSV or DBN; repeatable)")
    p.add_argument("--out", required=True)
    _training_window_args(p)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated Qwen3 projections to adapt"
        " (default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)",
    )
    p.add_argument("--window", type=int, default=None, help="bars per window (default: the base's, or 16)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads while training")
    p.add_argument("--buckets", type=int, nargs="+", default=list(DEFAULT_BUCKETS))
    p.set_defaults(func=cmd_model_finetune)
    p = msub.add_parser(
        "build-plan",
        help="build a version-compatible TensorRT plan (full TensorRT and a GPU) and record it in the manifest",
    )
    p.add_argument("onnx", help="the exported model.onnx, with its manifest beside it")
    p.add_argument("--out", help="the plan to write (default: beside the ONNX, .plan)")
    p.add_argument("--workspace-mib", type=int, default=1024)
    p.add_argument("--fp16", action="store_true", help="allow fp16 kernels (TensorRT 10 only)")
    p.set_defaults(func=cmd_model_build_plan)
    _describe_subcommands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is cmd_review and args.action != "list" and not args.id:
        parser.error(f"review {args.action} needs the parked order's id")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"tradingd: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except (ManifestError, ModelMismatchError) as exc:
        print(f"tradingd: model error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except BackendUnavailableError as exc:
        print(f"tradingd: engine unavailable: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except EngineError as exc:
        print(f"tradingd: engine error: {exc}", file=sys.stderr)
        return 1
    except JournalError as exc:
        print(f"tradingd: {exc}", file=sys.stderr)
        return EX_SOFTWARE
    except CrashPointError as exc:
        print(f"tradingd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except ImportError as exc:
        if exc.name in {"torch", "transformers", "onnx", "onnxscript", "safetensors"}:
            print(
                f"tradingd: {exc.name} is missing; install the export extra: pip install 'tradingd[export]'",
                file=sys.stderr,
            )
            return 1
        raise
