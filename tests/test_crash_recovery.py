"""Killed at any instant, the daemon restarts with no order lost and none sent twice.

A real day of minute bars is replayed to the daemon (its own process) while it is SIGKILLed at
random moments, 20 times, and restarted each time. The broker simulator and the feed are
separate processes that live through it all. Afterwards: the broker received no client order id
twice; every intent in the journal ended in exactly one way; every order the journal sent reached
the broker once (or is closed as never having reached it); positions agree with the broker's;
and no parked order or halt was forgotten across a restart.

Random kills cannot show that they hit the narrow window between a send and its record: that is
what the deterministic crash points do (``tests/test_crash_points.py``: after the sync, part way
through a batch's writes, between a write and its mark, mid-reconciliation, a torn record). This
test stays as the broad net over everything else a kill can interrupt.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.harness import admin_status, spawn_server
from broker.journal import read_journal
from broker.sim import read_orders
from daemon.admin import request

pytestmark = pytest.mark.slow

KILLS = 20


def _wait_ready(sock: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"daemon exited with {proc.returncode}"
        status = admin_status(sock)
        if status is not None and status["feed_connected"] and status["reconciled"]:
            return status
        time.sleep(0.05)
    raise AssertionError("daemon not ready in time")


def _halted_in_journal(journal: Path) -> set[str]:
    halted: set[str] = set()
    for r in read_journal(journal):
        if r["kind"] == "halt" and r.get("symbol"):
            halted.add(r["symbol"])
        elif r["kind"] == "lift" and r.get("symbol"):
            halted.discard(r["symbol"])
    return halted


def _waiting_review_in_journal(journal: Path) -> set[str]:
    waiting: set[str] = set()
    for r in read_journal(journal):
        if r["kind"] == "parked":
            waiting.add(r["id"])
        elif r["kind"] == "review":
            waiting.discard(r["id"])
    return waiting


def test_sigkill_at_random_moments_loses_no_order_and_sends_none_twice(tmp_path: Path, minute_csv: Path) -> None:
    day = tmp_path / "day.csv"
    with minute_csv.open() as src, day.open("w", newline="") as dst:
        rows = csv.reader(src)
        out = csv.writer(dst)
        out.writerow(next(rows))
        out.writerows(r for r in rows if r[1].startswith("2013-10-07"))

    logs = (tmp_path / "logs.txt").open("ab")
    broker_log = tmp_path / "broker.jsonl"
    broker, broker_port = spawn_server(
        ["broker-sim", "--port", "0", "--log", str(broker_log), "--partial-fills", "2"], logs
    )
    # 0.1 s per minute while connected: the day outlasts the 20 lives, and each life trades.
    feed, feed_port = spawn_server(["replay", str(day), "--port", "0", "--speed", "600"], logs)
    journal, sock = tmp_path / "journal.msgpack", tmp_path / "admin.sock"
    config = tmp_path / "tradingd.toml"
    config.write_text(
        f"""
[feed]
port = {feed_port}
reconnect_initial_ms = 20
reconnect_max_ms = 200
[universe]
symbols = ["AIG", "BAC", "IBM", "SPY"]
[broker]
port = {broker_port}
reconnect_initial_ms = 20
reconnect_max_ms = 200
[signal]
confidence_threshold = 0.0
notional_per_signal = 10000.0
[risk]
clock = "feed"
duplicate_window_ms = 0
review_threshold = 15000.0
review_ttl_s = 6.0
[risk.halt]
move_pct = 0.7
market_share = 2.0
[metrics]
enabled = false
[admin]
socket = "{sock}"
operators = [{os.getuid()}]
[journal]
path = "{journal}"
fsync = "batch"
[log]
level = "warning"
[engine]
allow_unqualified = true
"""
    )
    rng = random.Random(20131007)
    restarts: list[dict[str, Any]] = []
    approvals: list[dict[str, Any]] = []
    try:
        for life in range(KILLS + 1):
            daemon = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=logs,
            )
            halted_before = _halted_in_journal(journal) if journal.exists() else set()
            waiting_before = _waiting_review_in_journal(journal) if journal.exists() else set()
            status = _wait_ready(sock, daemon)
            listed = request(str(sock), {"cmd": "review_list"})["result"]
            restarts.append(
                {
                    "halted_before": halted_before,
                    "halted_after": set(status["halted"]),
                    "waiting_before": waiting_before,
                    "listed": {p["id"] for p in listed},
                }
            )
            if life == KILLS:
                time.sleep(1.0)  # let the last life trade and settle
                final = admin_status(sock)
                daemon.send_signal(signal.SIGTERM)
                assert daemon.wait(timeout=30) == 0
                break
            # An operator approves what waits for review once prices have arrived again (an
            # approval without a fresh reference price is denied: fail closed).
            time.sleep(0.4)
            for parked in request(str(sock), {"cmd": "review_list"})["result"]:
                approvals.append(request(str(sock), {"cmd": "review_approve", "id": parked["id"]}))
            time.sleep(rng.uniform(0.0, 2.6))
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(timeout=30)
    finally:
        for proc in (feed, broker):
            proc.terminate()
            proc.wait(timeout=10)
        logs.close()

    assert final is not None
    records = list(read_journal(journal))
    received = read_orders(broker_log)

    # The broker never saw a client order id twice.
    ids = Counter(o["cl_ord_id"] for o in received)
    print(
        "DEBUG",
        Counter(r.get("reason") for r in records if r["kind"] == "denied"),
        Counter(r["kind"] for r in records),
        len(received),
        final["positions"],
        [r["halted_after"] for r in restarts][-1],
        sum(len(r["listed"]) for r in restarts),
    )
    assert ids and max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]

    # Every intent ended in exactly one way, and every journaled send reached the broker once
    # or was closed as never having reached it.
    intents = [r["id"] for r in records if r["kind"] == "intent"]
    assert len(intents) == len(set(intents)) and len(intents) >= 20
    outcome: dict[str, list[str]] = {i: [] for i in intents}
    for r in records:
        if r["kind"] in ("send", "denied", "abandoned") or (r["kind"] == "review" and r["action"] != "approved"):
            outcome[r["id"]].append(r["kind"] if r["kind"] != "review" else r["action"])
    waiting = _waiting_review_in_journal(journal)
    for order_id, ends in outcome.items():
        if order_id in waiting:
            assert ends == [], (order_id, ends)
        elif ends == ["send", "abandoned"]:
            assert order_id not in ids, f"{order_id} closed as never sent, yet the broker has it"
        else:
            assert len(ends) == 1, (order_id, ends)
            assert (ends[0] == "send") == (order_id in ids), (order_id, ends)
    assert set(ids) <= set(intents), "the broker has orders the journal never recorded"

    # Positions agree with the broker's (the simulator fills every order in full).
    broker_positions: Counter[str] = Counter()
    for o in received:
        broker_positions[o["symbol"]] += o["qty"] if o["side"] == "buy" else -o["qty"]
    assert final["positions"] == {k: v for k, v in sorted(broker_positions.items()) if v}

    # Nothing parked or halted was forgotten across a restart (expiry is journaled, so an order
    # that left the queue did so on the record).
    for r in restarts:
        assert r["halted_before"] <= r["halted_after"], r
        assert r["waiting_before"] <= r["listed"] | _left_review(records, r["waiting_before"]), r
    assert sum(1 for r in records if r["kind"] == "parked") >= 1
    assert approvals and all(a["ok"] for a in approvals)
    assert sum(1 for r in records if r["kind"] == "start") == KILLS + 1


def _left_review(records: list[dict[str, Any]], ids: set[str]) -> set[str]:
    return {r["id"] for r in records if r["kind"] == "review" and r["id"] in ids}
