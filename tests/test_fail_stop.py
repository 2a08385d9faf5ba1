"""Fail-stop, never fail-silent: what the daemon cannot reason about stops it loudly (kill switch,
journaled, exit 70) so systemd restarts it and the journal replay takes over; and a stop request
ends it promptly in every start-up state. Each test runs the real ``tradingd run`` process."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.crash_matrix import synth_csv
from bench.harness import admin_status, spawn_server
from bench.rig import daemon_config, spawn_daemon
from broker.journal import read_journal
from daemon.errors import EX_SOFTWARE

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(work: Path, feed_port: int, broker_port: int, extra: str = "") -> Path:
    symbols = [f"S{i:04d}" for i in range(4)]
    return daemon_config(
        work,
        feed_port,
        broker_port,
        symbols,
        signal="confidence_threshold = 0.0",
        journal="",
        extra=extra,
        level="info",
    )


def _run(config: Path, log: Path, crash_at: str | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as stderr:
        return spawn_daemon(config, stderr, crash_at)


def _hang(stall_s: float) -> str:
    """The third batch's inference takes a minute: an inference that never comes back."""
    return f"""
[process]
stall_s = {stall_s}
[engine.primary.inject]
kind = "latency"
after_batches = 2
latency_ms = 60000.0
"""


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A broker simulator and a replay feed of a synthetic universe, as their own processes."""
    csv = synth_csv(tmp_path / "bars.csv")
    logs = (tmp_path / "peers.log").open("ab")
    broker, broker_port = spawn_server(["broker-sim", "--port", "0", "--log", str(tmp_path / "broker.jsonl")], logs)
    feed, feed_port = spawn_server(["replay", str(csv), "--port", "0", "--speed", "1200"], logs)
    yield feed_port, broker_port
    for proc in (feed, broker):
        proc.terminate()
        proc.wait(timeout=10)
    logs.close()


def test_a_journal_write_error_trips_the_kill_switch_exits_70_and_the_restart_trades_again(
    tmp_path: Path, peers: tuple[int, int]
) -> None:
    feed_port, broker_port = peers
    config, log = _config(tmp_path, feed_port, broker_port), tmp_path / "daemon.log"
    daemon = _run(config, log, crash_at="journal_eio@60")
    assert daemon.wait(timeout=120) == EX_SOFTWARE
    text = log.read_text()
    assert '"event":"fail_stop"' in text and "injected I/O error" in text
    # After a failed write nothing more is written (a retry could tear a record mid-file), so the
    # automatic kill could not be journaled; the log says so.
    assert "fail_stop_trip_failed" in text
    records = list(read_journal(tmp_path / "journal.msgpack"))
    sent_before = sum(1 for r in records if r["kind"] == "send")

    restarted = _run(config, log)
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            assert restarted.poll() is None, f"restart exited with {restarted.returncode}"
            status = admin_status(tmp_path / "admin.sock")
            if status is not None and status["orders"]["sent"] > 0:
                break
            time.sleep(0.2)
        assert status is not None and not status["kill"] and status["orders"]["sent"] > 0
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(timeout=30) == 0
    records = list(read_journal(tmp_path / "journal.msgpack"))
    assert sum(1 for r in records if r["kind"] == "start") == 2
    assert sum(1 for r in records if r["kind"] == "send") > sent_before


def test_an_inference_that_never_returns_fail_stops_instead_of_looking_healthy(
    tmp_path: Path, peers: tuple[int, int]
) -> None:
    feed_port, broker_port = peers
    config, log = _config(tmp_path, feed_port, broker_port, _hang(stall_s=1.0)), tmp_path / "daemon.log"
    daemon = _run(config, log)
    started = time.monotonic()
    assert daemon.wait(timeout=90) == EX_SOFTWARE
    assert time.monotonic() - started < 60
    assert "in inference for" in log.read_text()
    kills = [r for r in read_journal(tmp_path / "journal.msgpack") if r["kind"] == "kill"]
    assert kills and kills[-1]["on"] and kills[-1]["automatic"] and "stalled" in kills[-1]["reason"]


class _Silent:
    """A TCP peer that accepts and never says a word (a broker that never answers a status request)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("state", ["broker unreachable", "broker silent", "feed unreachable"])
def test_sigterm_stops_the_daemon_within_5_s_in_every_start_up_state(tmp_path: Path, state: str) -> None:
    silent = _Silent()
    logs = (tmp_path / "peers.log").open("ab")
    broker = None
    try:
        if state == "broker unreachable":
            broker_port = _free_port()
        elif state == "broker silent":
            broker_port = silent.port
        else:
            broker, broker_port = spawn_server(["broker-sim", "--port", "0"], logs)
        config, log = _config(tmp_path, _free_port(), broker_port), tmp_path / "daemon.log"
        daemon = _run(config, log)
        waiting_for = {
            "broker unreachable": "connect_failed",
            "broker silent": "reconciling with the broker",
            "feed unreachable": "feed_connect_failed",
        }[state]
        deadline = time.monotonic() + 60
        while waiting_for not in log.read_text():
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        asked = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        assert time.monotonic() - asked < 5.0
    finally:
        silent.close()
        if broker is not None:
            broker.terminate()
            broker.wait(timeout=10)
        logs.close()


def test_sigterm_during_an_inference_that_never_returns_exits_70_within_the_deadline(
    tmp_path: Path, peers: tuple[int, int]
) -> None:
    feed_port, broker_port = peers
    config, log = _config(tmp_path, feed_port, broker_port, _hang(stall_s=300.0)), tmp_path / "daemon.log"
    daemon = _run(config, log)
    deadline = time.monotonic() + 60
    while '"event":"started"' not in log.read_text():
        assert daemon.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(3.0)  # the third batch is in its minute-long inference by now
    asked = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=60) == EX_SOFTWARE
    assert time.monotonic() - asked < 10.0
    assert "shutdown_deadline" in log.read_text()


def test_a_failed_fsync_on_the_journal_thread_fail_stops_the_daemon(tmp_path: Path, peers: tuple[int, int]) -> None:
    """The journal fsyncs a batch's bars (and halts) on its own thread while the loop goes on: a
    failure there reaches the event loop and stops the daemon as a failed write would."""
    feed_port, broker_port = peers
    config, log = _config(tmp_path, feed_port, broker_port), tmp_path / "daemon.log"
    daemon = _run(config, log, crash_at="journal_fsync_eio")
    assert daemon.wait(timeout=120) == EX_SOFTWARE
    text = log.read_text()
    assert '"event":"fail_stop"' in text and "injected I/O error at crash point journal_fsync_eio" in text
