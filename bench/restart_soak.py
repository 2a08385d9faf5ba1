"""Run for months, compressed: a 100-symbol minute every second, a snapshot every second, and a
SIGKILL every few minutes, each followed by an immediate restart.

The broker simulator and the replay feed are their own processes and live through it all. Per
restart it measures, from the journal and the broker's log: seconds from the SIGKILL to the first
order the broker receives from the new process (wall clock), and feed minutes from the first bar
the new process accepted to the bar of its first order (0 = it traded on its first minute). Over
the run: client order ids the broker received twice, positions against the broker's, the
journal's disk use (sealed segments, snapshots, active segment; retention 20 segments), and the
daemon's RSS and open descriptors sampled every 5 s.

    python -m bench.restart_soak [--minutes 30] [--kill-every 180] [--symbols 100]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench.crash_matrix import broker_positions
from bench.harness import admin_status, spawn_server
from bench.rig import daemon_config, spawn_daemon
from broker.journal import read_journal, sealed_segments, snapshots
from broker.records import per_order
from broker.sim import read_orders

NS_PER_MIN = 60_000_000_000


def _config(work: Path, feed_port: int, broker_port: int, symbols: list[str]) -> Path:
    return daemon_config(
        work,
        feed_port,
        broker_port,
        symbols,
        risk='clock = "feed"\nduplicate_window_ms = 0\nthrottle_orders = 10000\n[risk.halt]\nmarket_share = 1.0',
        journal='fsync = "batch"\nsnapshot_interval_s = 1.0\nmax_segments = 20',
    )


def _daemon(config: Path, logs: Any) -> subprocess.Popen[bytes]:
    return spawn_daemon(config, logs)


def _proc_sample(pid: int) -> tuple[float, int] | None:
    try:
        rss_kib = next(
            int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def _first_order_after(kill_ns: int, broker_log: Path, base: Path, timeout: float = 60.0) -> dict[str, float | None]:
    """Wait for the restarted daemon's first order at the broker; then, from the journal (before
    retention can drop it), the feed minutes between its first accepted bar and that order's bar."""
    deadline = time.monotonic() + timeout
    first: dict[str, object] | None = None
    while first is None and time.monotonic() < deadline:
        first = next((o for o in read_orders(broker_log) if int(o["ts_recv"]) > kill_ns), None)  # type: ignore[call-overload]
        time.sleep(0.02)
    if first is None:
        return {"kill_to_first_order_s": None, "feed_minutes_before_first_order": None}
    records = list(per_order(read_journal(base)))
    starts = [k for k, r in enumerate(records) if r["kind"] == "start"]
    after = records[starts[-1] :] if starts else records
    bars = next((r for r in after if r["kind"] == "bars"), None)
    intent = next((r for r in after if r["kind"] == "intent" and r["id"] == first["cl_ord_id"]), None)
    minutes = None
    if bars is not None and intent is not None:
        first_bar = int(np.frombuffer(bars["bar_ts"], dtype="<i8").min())
        minutes = (int(intent["ts_event"]) - first_bar) / NS_PER_MIN
    return {
        "kill_to_first_order_s": (int(first["ts_recv"]) - kill_ns) / 1e9,  # type: ignore[call-overload]
        "feed_minutes_before_first_order": minutes,
    }


def _disk(base: Path) -> int:
    files = [p for _, p in sealed_segments(base)] + [p for _, p in snapshots(base)] + [base]
    return sum(p.stat().st_size for p in files if p.exists())


def run(minutes: float, kill_every: float, n_symbols: int, work: Path) -> dict[str, Any]:
    from daemon.feed.synth import SynthParams, generate, write_csv  # noqa: PLC0415

    feed_minutes = int(minutes * 60) + 120
    csv = work / "bars.csv"
    write_csv(generate(SynthParams(symbols=n_symbols, minutes=feed_minutes, seed=3)), csv)
    logs = (work / "processes.log").open("ab")
    broker_log = work / "broker.jsonl"
    broker, broker_port = spawn_server(["broker-sim", "--port", "0", "--log", str(broker_log)], logs)
    feed, feed_port = spawn_server(["replay", str(csv), "--port", "0", "--speed", "60"], logs)
    symbols = [f"S{i:04d}" for i in range(n_symbols)]
    config = _config(work, feed_port, broker_port, symbols)
    base, sock = work / "journal.msgpack", work / "admin.sock"
    kills: list[int] = []  # wall ns of each SIGKILL
    per_kill: list[dict[str, float | None]] = []
    samples: list[tuple[float, float, int, int]] = []  # t, rss MiB, fds, journal bytes
    started = time.monotonic()
    daemon = _daemon(config, logs)
    next_kill = started + kill_every
    final: dict[str, Any] | None = None
    try:
        while time.monotonic() - started < minutes * 60:
            time.sleep(5.0)
            sample = _proc_sample(daemon.pid)
            if sample is not None:
                samples.append((time.monotonic() - started, sample[0], sample[1], _disk(base)))
            if time.monotonic() >= next_kill:
                kill_ns = time.time_ns()
                kills.append(kill_ns)
                daemon.send_signal(signal.SIGKILL)
                daemon.wait(timeout=30)
                daemon = _daemon(config, logs)
                per_kill.append(_first_order_after(kill_ns, broker_log, base))
                next_kill += kill_every
        deadline = time.monotonic() + 60
        while final is None and time.monotonic() < deadline:
            final = admin_status(sock)
            time.sleep(0.2)
        time.sleep(2.0)
        final = admin_status(sock)
        daemon.send_signal(signal.SIGTERM)
        final_exit = daemon.wait(timeout=60)
    finally:
        for proc in (feed, broker):
            proc.terminate()
            proc.wait(timeout=10)
        logs.close()

    received = read_orders(broker_log)
    ids = Counter(str(o["cl_ord_id"]) for o in received)
    truth = broker_positions(broker_log)
    ours = (final or {}).get("positions", {})
    rss = [s[1] for s in samples]
    fds = [s[2] for s in samples]
    return {
        "minutes": minutes,
        "kill_every_s": kill_every,
        "symbols": n_symbols,
        "kills": len(kills),
        "orders": len(received),
        "duplicates": sum(1 for n in ids.values() if n > 1),
        "position_mismatches": sum(1 for s in set(truth) | set(ours) if truth.get(s, 0) != ours.get(s, 0)),
        "final_exit": final_exit,
        "per_kill": per_kill,
        "journal_bytes_max": max((s[3] for s in samples), default=0),
        "journal_bytes_end": _disk(base),
        "segments_end": len(sealed_segments(base)),
        "snapshots_end": len(snapshots(base)),
        "rss_mib": {"min": min(rss, default=0), "max": max(rss, default=0)},
        "fds": {"min": min(fds, default=0), "max": max(fds, default=0)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--kill-every", type=float, default=180.0)
    parser.add_argument("--symbols", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.minutes, args.kill_every, args.symbols, Path(tmp))
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    ok = result["duplicates"] == 0 and result["position_mismatches"] == 0 and result["final_exit"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
