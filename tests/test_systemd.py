"""systemd integration: the notify protocol against a datagram socket standing in for systemd's
NOTIFY_SOCKET (READY=1 only after warm-up, reconcile and feed connect; watchdog pings from the
event loop stop while it is blocked), and the unit file checked by systemd-analyze."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from broker.sim import BrokerSimulator, SimConfig
from daemon.sdnotify import Notifier
from tests.helpers import running_rig, wait_for

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "tradingd.service"
# The exposure score (0-10) `systemd-analyze security --offline=true` must not exceed (README
# states it); its --threshold takes the same score times ten.
SECURITY_THRESHOLD = 2.0


class FakeSystemd:
    """A NOTIFY_SOCKET: records every datagram with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def first(self, key: str, value: str | None = None) -> float | None:
        for t, m in self.messages:
            if key in m and (value is None or m[key] == value):
                return t
        return None

    def statuses(self) -> list[str]:
        return [m["STATUS"] for _, m in self.messages if "STATUS" in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_ready_comes_only_after_warm_up_reconcile_and_feed_connect(tmp_path: Path) -> None:
    systemd = FakeSystemd(tmp_path / "notify.sock")
    broker = BrokerSimulator(SimConfig(), tmp_path / "broker.jsonl")
    broker_port = await broker.start()
    feed_port = _free_port()  # nothing listens there yet
    config = tmp_path / "tradingd.toml"
    config.write_text(
        f"[feed]\nport = {feed_port}\nreconnect_initial_ms = 20\nreconnect_max_ms = 50\n"
        f"[broker]\nport = {broker_port}\n[metrics]\nenabled = false\n"
        f"[journal]\npath = '{tmp_path / 'journal'}'\n[admin]\nsocket = '{tmp_path / 'admin.sock'}'\n"
    )
    env = {**os.environ, "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "400000", "TRADINGD_CPUS": "0"}
    log = (tmp_path / "daemon.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "run", "--config", str(config), env=env, stdout=log, stderr=log
    )
    feed: asyncio.Server | None = None
    try:
        await wait_for(lambda: systemd.first("STATUS", "connecting feed") is not None, timeout=60, what="feed stage")
        await asyncio.sleep(1.0)
        assert systemd.first("READY") is None, "READY=1 before the feed was connected"
        assert systemd.first("WATCHDOG") is not None, "no watchdog ping while waiting for the feed"
        connected_at: list[float] = []

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connected_at.append(time.monotonic())
            await reader.read()
            writer.close()

        listening_at = time.monotonic()
        feed = await asyncio.start_server(accept, "127.0.0.1", feed_port)
        await wait_for(lambda: systemd.first("READY") is not None, timeout=20, what="READY=1")
        ready_at = systemd.first("READY")
        assert ready_at is not None and ready_at >= listening_at
        await wait_for(lambda: bool(connected_at), what="the feed connection")
        statuses = systemd.statuses()
        order = ["loading engines", "warming engines", "replaying journal", "reconciling with the broker"]
        assert [s for s in statuses if s in order] == order
        assert statuses.index("warming engines") < statuses.index("connecting feed")
        assert any(s.startswith("running") for s in statuses)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await wait_for(lambda: systemd.first("STOPPING") is not None, timeout=5, what="STOPPING=1")
        # CPU pinning from the environment file, and the config digest, are in the first log line.
        first = json.loads((tmp_path / "daemon.log").read_text().splitlines()[0])
        assert first["event"] == "config" and first["cpus"] == [0] and len(first["sha256"]) == 64
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        if feed is not None:
            feed.close()
        await broker.close()
        systemd.close()


async def test_watchdog_pings_come_from_the_loop_and_stop_while_it_is_blocked(tmp_path: Path) -> None:
    systemd = FakeSystemd(tmp_path / "notify.sock")
    notifier = Notifier({"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_s == pytest.approx(0.05)
    try:
        async with running_rig(tmp_path, notifier=notifier) as rig:
            await asyncio.wait_for(rig.daemon.ready.wait(), 10)
            await asyncio.sleep(0.4)
            time.sleep(0.6)  # noqa: ASYNC251 - blocking the loop is the point
            blocked_from, blocked_to = time.monotonic() - 0.6, time.monotonic()
            await asyncio.sleep(0.4)
        pings = [t for t, m in systemd.messages if m.get("WATCHDOG") == "1"]
        before = [t for t in pings if t < blocked_from]
        during = [t for t in pings if blocked_from + 0.01 < t < blocked_to]
        after = [t for t in pings if t > blocked_to + 0.01]
        assert len(before) >= 4, pings
        assert during == [], "a ping was sent while the event loop was blocked"
        assert len(after) >= 3
        assert systemd.first("READY") is not None and systemd.first("STOPPING") is not None
    finally:
        notifier.close()
        systemd.close()


def test_cpu_lists_parse_like_cpusets_and_bad_ones_name_the_variable() -> None:
    from daemon.cli import parse_cpus  # noqa: PLC0415
    from daemon.errors import ConfigError  # noqa: PLC0415

    assert parse_cpus("2-3,6") == {2, 3, 6} and parse_cpus(" 0 ") == {0}
    with pytest.raises(ConfigError, match="TRADINGD_CPUS"):
        parse_cpus("two")


def test_outside_systemd_the_notifier_does_nothing() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_s is None and n.send(READY="1") is False
    other = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
    assert other.enabled and other.watchdog_s is None  # the watchdog is another process's
    other.close()


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return path


def test_the_unit_passes_systemd_analyze_verify_with_no_warning(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    # verify resolves ExecStart: point it at this checkout's interpreter instead of /opt/tradingd.
    unit = tmp_path / "tradingd.service"
    unit.write_text(UNIT.read_text().replace("/opt/tradingd/.venv/bin/tradingd", sys.executable))
    result = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [line for line in result.stderr.splitlines() if "tradingd.service" in line]
    assert result.returncode == 0 and problems == [], result.stderr


def test_the_unit_meets_its_security_exposure_threshold(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    result = subprocess.run(
        [analyze, "security", "--offline=true", f"--threshold={round(SECURITY_THRESHOLD * 10)}", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    overall = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert overall, result.stdout + result.stderr
    score = float(overall[0].split("level for tradingd.service:")[1].split()[0])
    assert score <= SECURITY_THRESHOLD, overall[0]
    assert result.returncode == 0, result.stdout[-2000:]
