"""What metrics and logging cost: the demo's tick-to-order with them on and off, in one run.

"on" = Prometheus metrics served and scraped from this process (``--scrape-hz``, default 1:
five times the production rate of one scrape per 5 s) and JSON logs at info level appended to
a file (one line per order, fill, connection change...). "off" = no metrics server and logs at
error level.
Runs alternate on/off so drift on a shared machine hits both alike; each run is a fresh
``tradingd demo`` process on the same seeded synthetic day.

    python -m bench.observability [--runs 6] [--minutes 390] [--symbols 32] [--scrape-hz 10]

Prints a markdown table and the overhead at p50 and p99 of all runs' samples pooled (target:
p99 under +5 %).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int, hz: float, stop: threading.Event, count: list[int]) -> None:
    while not stop.wait(1.0 / hz):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                reply.read()
            count[0] += 1
        except OSError:
            continue  # not up yet, or gone


def demo(on: bool, args: argparse.Namespace, log: Path, samples: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "daemon",
        "demo",
        "--json",
        "--minutes",
        str(args.minutes),
        "--symbols",
        str(args.symbols),
        "--samples-out",
        str(samples),
    ]
    stop, scrapes = threading.Event(), [0]
    if on:
        port = _free_port()
        cmd += ["--log-level", "info", "--log-file", str(log), "--metrics-port", str(port)]
        threading.Thread(target=_scrape, args=(port, args.scrape_hz, stop, scrapes), daemon=True).start()
    else:
        cmd += ["--log-level", "error", "--log-file", str(log), "--no-metrics"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    finally:
        stop.set()
    summary: dict[str, Any] = json.loads(out.stdout)
    summary["scrapes"] = scrapes[0]
    summary["samples"] = [float(x) for x in samples.read_text().split()]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6, help="runs of each, alternated")
    parser.add_argument("--minutes", type=int, default=390)
    parser.add_argument("--symbols", type=int, default=32)
    parser.add_argument("--scrape-hz", type=float, default=1.0)
    args = parser.parse_args()
    results: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for on in (i % 2 == 0, i % 2 != 0):
                log = Path(tmp) / f"{'on' if on else 'off'}-{i}.log"
                started = time.perf_counter()
                summary = demo(on, args, log, Path(tmp) / "samples.txt")
                lines = sum(1 for _ in log.open()) if log.exists() else 0
                t2o = summary["latency_us"]["tick_to_order"]
                results[on].append(
                    {**t2o, "samples": summary["samples"], "log_lines": lines, "wall_s": time.perf_counter() - started}
                )
                print(
                    f"run {i} {'on ' if on else 'off'}: orders {t2o['count']} p50 {t2o['p50']} us p99 {t2o['p99']} us "
                    f"log lines {lines} scrapes {summary['scrapes']}",
                    file=sys.stderr,
                    flush=True,
                )
    rows = []
    pooled = {}
    for on in (False, True):
        runs = results[on]
        samples = np.array([x for r in runs for x in r["samples"]])
        p50, p90, p99 = np.percentile(samples, [50, 90, 99])
        pooled[on] = (p50, p99)
        rows.append(
            f"| {'on' if on else 'off'} | {len(runs)} | {len(samples)} | {p50:.0f} | {p90:.0f} | {p99:.0f} | "
            f"{statistics.median(r['p99'] for r in runs):.0f} | {statistics.mean(r['log_lines'] for r in runs):.0f} |"
        )
    p50_over = 100 * (pooled[True][0] / pooled[False][0] - 1)
    p99_over = 100 * (pooled[True][1] / pooled[False][1] - 1)
    print(
        "| metrics + logs | runs | orders (pooled) | p50 µs | p90 µs | p99 µs | median of per-run p99 µs "
        "| log lines per run |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\noverhead of metrics + logging (pooled): p50 {p50_over:+.1f} %, p99 {p99_over:+.1f} % (target p99 < +5 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
