"""Deterministic crash points: the daemon exits at a named point of the order path, then restarts.

Each run: a broker simulator and a replay feed (their own processes) and the daemon with
``TRADINGD_CRASH_AT=point@n``. The daemon exits at the point (code 86); the broker simulator is
restarted too (it remembers every client order id from its log, across its own lives); the
daemon is restarted without the crash point and trades to the end of the replay. Then:

- no client order id reached the broker twice;
- the daemon's positions equal the broker's (from the broker's own execution log);
- every intent in the journal ended in exactly one way (sent once, denied, abandoned, or closed
  as never having reached the broker), and every order the broker has was journaled.

The journal snapshots every second (then begins a new segment), so every run also restarts from a
snapshot plus the segments after it; ``snapshot_torn``, ``snapshot_written`` and
``segment_sealed`` crash inside that.

``mid_reconcile`` needs orders working at a reconciliation: the broker first lets every order
rest, then restarts and fills them all (the market moved while nobody listened), so the daemon
reconnects and dies part way through applying what it learns.

    python -m bench.crash_matrix [--runs N] [--points p1,p2] [--out bench/crash-matrix.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import admin_status, spawn_server
from bench.rig import daemon_config, spawn_daemon
from broker.crashpoints import EXIT_CODE
from broker.journal import read_journal
from broker.records import per_order
from broker.sim import read_orders

# point -> the n-th time it is reached (plus the run number)
POINTS: dict[str, int] = {
    "batch_synced": 3,
    "batch_partly_sent": 2,
    "sent_not_marked": 4,
    "journal_torn": 80,
    "mid_reconcile": 1,
    "snapshot_torn": 2,
    "snapshot_written": 2,
    "segment_sealed": 2,
}
FIXED_NTH = frozenset({"mid_reconcile", "snapshot_torn", "snapshot_written", "segment_sealed"})
SYMBOLS = 8
MINUTES = 120


@dataclass
class RunResult:
    point: str
    run: int
    crashed: int | None  # the first life's exit code (86 at the point)
    orders: int  # orders the broker received
    duplicates: int  # client order ids the broker received more than once
    position_mismatches: int  # symbols where the daemon and the broker disagree
    unended_intents: int  # intents that did not end exactly one way
    orphans: int  # orders at the broker the journal never recorded
    final_exit: int | None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.crashed == EXIT_CODE
            and self.final_exit == 0
            and self.orders > 0
            and not (self.duplicates or self.position_mismatches or self.unended_intents or self.orphans)
        )


def _config(work: Path, feed_port: int, broker_port: int, symbols: list[str]) -> Path:
    return daemon_config(
        work,
        feed_port,
        broker_port,
        symbols,
        risk='clock = "feed"\nduplicate_window_ms = 0\n[risk.halt]\nmarket_share = 1.0',
        # Snapshots by time (between minutes) and by records, so the snapshot points are reached
        # however fast or slow the machine replays.
        journal='fsync = "batch"\nsnapshot_interval_s = 1.0\nsnapshot_records = 100',
    )


def _daemon(config: Path, logs: Any, crash_at: str | None = None) -> subprocess.Popen[bytes]:
    return spawn_daemon(config, logs, crash_at)


def _broker(log: Path, port: int, logs: Any, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    return spawn_server(["broker-sim", "--port", str(port), "--log", str(log), "--partial-fills", "2", *extra], logs)


def _settle(sock: Path, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> dict[str, Any]:
    """Wait until the daemon has traded to the end of the replay: idle, and no new minute for 1.5 s."""
    deadline = time.monotonic() + timeout
    last: tuple[int, int] | None = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        status = admin_status(sock)
        if status is not None and status["reconciled"] and status["feed_connected"]:
            mark = (status["bars"]["minutes"], status["orders"]["sent"])
            if mark != last:
                last, since = mark, time.monotonic()
            elif status["idle"] and time.monotonic() - since > 1.5:
                return status
        time.sleep(0.1)
    raise RuntimeError("daemon did not settle in time")


def broker_positions(log: Path) -> dict[str, int]:
    """The broker's positions from its execution log (every fill it made, in any life)."""
    positions: Counter[str] = Counter()
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("type") == "exec_report" and entry["last_qty"]:
            positions[entry["symbol"]] += entry["last_qty"] if entry["side"] == "buy" else -entry["last_qty"]
    return {s: q for s, q in sorted(positions.items()) if q}


def intent_outcomes(records: list[dict[str, Any]], at_broker: set[str]) -> tuple[int, int]:
    """(intents that did not end exactly one way, broker orders the journal never recorded)."""
    intents = [r["id"] for r in records if r["kind"] == "intent"]
    outcome: dict[str, list[str]] = {i: [] for i in intents}
    waiting: set[str] = set()
    for r in records:
        kind = r["kind"]
        if kind == "parked":
            waiting.add(r["id"])
        elif kind == "review":
            waiting.discard(r["id"])
            if r["action"] != "approved":
                outcome[r["id"]].append(r["action"])
        elif kind in ("send", "denied", "abandoned") and r["id"] in outcome:
            outcome[r["id"]].append(kind)
    bad = 0
    for order_id, ends in outcome.items():
        if order_id in waiting:
            bad += ends != []
        elif ends == ["send", "abandoned"]:
            bad += order_id in at_broker  # closed as never sent, yet the broker has it
        else:
            bad += len(ends) != 1 or (ends[0] == "send") != (order_id in at_broker)
    return bad, len(at_broker - set(intents))


def run_point(point: str, run: int, work: Path, csv: Path) -> RunResult:
    nth = POINTS[point]
    logs = (work / "processes.log").open("ab")
    broker_log = work / "broker.jsonl"
    resting = point == "mid_reconcile"
    broker, broker_port = _broker(broker_log, 0, logs, *(["--rest"] if resting else []))
    feed, feed_port = spawn_server(["replay", str(csv), "--port", "0", "--speed", "1200"], logs)
    symbols = [f"S{i:04d}" for i in range(SYMBOLS)]
    config = _config(work, feed_port, broker_port, symbols)
    sock = work / "admin.sock"
    crashed: int | None = None
    final_exit: int | None = None
    status: dict[str, Any] | None = None
    daemon: subprocess.Popen[bytes] | None = None
    try:
        # Each run crashes at a later occurrence of the point, but for the points reached only a
        # few times in a run (a reconciliation, a snapshot between minutes).
        daemon = _daemon(config, logs, f"{point}@{nth if point in FIXED_NTH else nth + run}")
        if resting:
            _settle(sock, daemon)  # every order rests, working, at the broker
            broker.terminate()
            broker.wait(timeout=10)
            broker, _ = _broker(broker_log, broker_port, logs, "--fill-resting")
        crashed = daemon.wait(timeout=120)
        broker.terminate()
        broker.wait(timeout=10)
        broker, _ = _broker(broker_log, broker_port, logs)  # the broker restarts too
        daemon = _daemon(config, logs)
        status = _settle(sock, daemon)
        daemon.send_signal(signal.SIGTERM)
        final_exit = daemon.wait(timeout=30)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()  # a run that failed leaves no daemon behind
            daemon.wait(timeout=10)
        for proc in (feed, broker):
            proc.terminate()
            proc.wait(timeout=10)
        logs.close()
    received = read_orders(broker_log)
    ids = Counter(str(o["cl_ord_id"]) for o in received)
    records = list(per_order(read_journal(work / "journal.msgpack")))
    unended, orphans = intent_outcomes(records, set(ids))
    truth = broker_positions(broker_log)
    ours = status["positions"] if status else {}
    mismatches = sum(1 for s in set(truth) | set(ours) if truth.get(s, 0) != ours.get(s, 0))
    return RunResult(
        point,
        run,
        crashed,
        len(received),
        sum(1 for n in ids.values() if n > 1),
        mismatches,
        unended,
        orphans,
        final_exit,
        {"positions": ours, "broker": truth, "starts": sum(1 for r in records if r["kind"] == "start")},
    )


def synth_csv(path: Path) -> Path:
    from daemon.feed.synth import SynthParams, generate, write_csv  # noqa: PLC0415

    write_csv(generate(SynthParams(symbols=SYMBOLS, minutes=MINUTES, seed=7)), path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--points", default=",".join(POINTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        csv = synth_csv(Path(tmp) / "bars.csv")
        for point in args.points.split(","):
            for run in range(args.runs):
                work = Path(tmp) / f"{point}-{run}"
                work.mkdir()
                result = run_point(point, run, work, csv)
                results.append(result)
                print(
                    f"{point:18} run {run}: exit {result.crashed}, orders {result.orders}, duplicates "
                    f"{result.duplicates}, position mismatches {result.position_mismatches}, unended intents "
                    f"{result.unended_intents}, orphans {result.orphans}, final exit {result.final_exit}",
                    flush=True,
                )
    print(
        "\n| point | runs | crashed at the point | orders at the broker | duplicates | position mismatches "
        "| unended intents |"
    )
    print("|---|---|---|---|---|---|---|")
    for point in args.points.split(","):
        rs = [r for r in results if r.point == point]
        print(
            f"| `{point}` | {len(rs)} | {sum(r.crashed == EXIT_CODE for r in rs)} | {sum(r.orders for r in rs)} "
            f"| {sum(r.duplicates for r in rs)} | {sum(r.position_mismatches for r in rs)} "
            f"| {sum(r.unended_intents for r in rs)} |"
        )
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
