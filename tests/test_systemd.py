"""systemd integration: the notify protocol against a datagram socket standing in for systemd's
NOTIFY_SOCKET (READY=1 only after warm-up, reconcile and feed connect; watchdog pings from the
event loop stop while it is blocked), the unit file checked by systemd-analyze, and the daemon's
system calls, traced through a whole session, checked against the unit's system-call filter."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.sim import BrokerSimulator, SimConfig
from daemon.admin import request
from daemon.feed.synth import SynthParams, generate, symbol_names, write_csv
from daemon.sdnotify import Notifier
from tests.helpers import running_rig, wait_for

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "tradingd.service"
ENV_FILE = ROOT / "systemd" / "tradingd.env"
DEPLOY_README = ROOT / "deploy" / "README.md"
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
        "[engine]\nallow_unqualified = true\n"
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


def _verify(analyze: str, unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", str(unit)], capture_output=True, text=True, timeout=60
    )


def test_pinning_drop_in_when_written_by_the_documented_command_is_accepted_by_systemd(tmp_path: Path) -> None:
    """deploy/README.md's command turns TRADINGD_CPUS into the unit's CPUAffinity= drop-in."""
    analyze = _systemd_analyze()
    (command,) = [line for line in DEPLOY_README.read_text().splitlines() if "CPUAffinity=%s" in line]
    unit = tmp_path / "tradingd.service"
    unit.write_text(UNIT.read_text().replace("/opt/tradingd/.venv/bin/tradingd", sys.executable))
    drop_ins = tmp_path / "tradingd.service.d"
    drop_ins.mkdir()
    write = command.replace("/etc/systemd/system/tradingd.service.d", str(drop_ins))
    # A CPU list systemd cannot parse shows that verify reads the drop-in at all.
    for cpus, accepted in (("2-3", True), ("0,2 4", True), ("", True), ("two", False)):
        subprocess.run(["bash", "-c", write], env={**os.environ, "TRADINGD_CPUS": cpus}, check=True, timeout=10)
        assert (drop_ins / "cpus.conf").read_text() == f"[Service]\nCPUAffinity={cpus}\n"
        result = _verify(analyze, unit)
        complaints = [line for line in result.stderr.splitlines() if "cpus.conf" in line]
        assert result.returncode == 0 and (complaints == []) is accepted, (cpus, result.stderr)


# -- the unit's system-call filter -------------------------------------------------------------

# "PID name(args) = result", or "PID name(args <unfinished ...>" when another thread interleaves.
SYSCALL_LINE = re.compile(r"^\d+\s+([a-z_][a-z0-9_]*)\(")
# Denied calls whose denial (EPERM) changes nothing, each with the exact form that is harmless.
HARMLESS_WHEN_DENIED = {
    # OpenBLAS (numpy) asks, at import, for its buffer to be placed on the local node (a
    # MPOL_PREFERRED policy with no nodes), which is the kernel's default, and ignores the answer.
    "mbind": re.compile(r"mbind\(0x[0-9a-f]+, \d+, MPOL_PREFERRED, NULL, 0, 0\)"),
}


def _strace() -> str:
    path = shutil.which("strace")
    if path is None:
        pytest.skip("strace is not installed (Debian package strace; .ci/run installs it)")
    probe = subprocess.run([path, "-f", "-o", os.devnull, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (is ptrace permitted?): {probe.stderr.strip()[-300:]}")
    return path


def _taskset() -> str:
    # Stands in for systemd's CPUAffinity=: the process starts already on its CPUs.
    path = shutil.which("taskset")
    if path is None:
        pytest.skip("taskset is not installed (Debian package util-linux)")
    return path


@functools.cache
def _syscalls(analyze: str, name: str) -> frozenset[str]:
    """A system call, or every call in a ``@group`` (groups nest), as this systemd knows them."""
    if not name.startswith("@"):
        return frozenset({name})
    listing = subprocess.run(
        [analyze, "syscall-filter", "--no-pager", name], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()[1:]
    members = (line.strip() for line in listing)
    return frozenset().union(*(_syscalls(analyze, m) for m in members if m and not m.startswith("#")))


def _unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1].strip() for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]


def unit_allowed_syscalls(analyze: str) -> frozenset[str]:
    """The system calls the unit's ``SystemCallFilter=`` lines let through, combined as systemd does.

    The first assignment sets the mode: a list allows its calls and @default, a ``~`` list allows
    every call but its own; each later one adds to or takes from that; an empty one resets it.
    """
    allowed: frozenset[str] | None = None
    for value in _unit_values("SystemCallFilter"):
        if not value:
            allowed = None
            continue
        deny = value.startswith("~")
        names = frozenset().union(*(_syscalls(analyze, n.split(":")[0]) for n in value.lstrip("~").split()))
        if allowed is None:
            allowed = _syscalls(analyze, "@known" if deny else "@default")
        allowed = allowed - names if deny else allowed | names
    assert allowed is not None, "the unit sets no SystemCallFilter="
    return allowed


def _unit_environment(**override: str) -> dict[str, str]:
    """The environment the unit gives the daemon: its Environment= lines, then the environment file."""
    assignments = [item.strip('"') for value in _unit_values("Environment") for item in value.split()]
    assignments += [line for line in ENV_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    env = {**os.environ}
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        env[key.strip()] = value.strip()
    return {**env, **override}


def _exec_start(config: Path) -> list[str]:
    """The unit's ExecStart=, run from this checkout."""
    (command,) = _unit_values("ExecStart")
    argv = command.replace("${TRADINGD_CONFIG}", str(config)).split()
    assert argv[0] == "/opt/tradingd/.venv/bin/tradingd", command
    return [sys.executable, "-m", "daemon", *argv[1:]]


@contextlib.contextmanager
def _serving(*args: str) -> Iterator[int]:
    """``tradingd <args>`` (the replay feed, the broker simulator): yields the port it listens on."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", *args], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        assert line.startswith("LISTENING "), f"tradingd {args[0]} said {line!r}"
        yield int(line.rsplit(":", 1)[1])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _status(admin: Path) -> dict[str, object] | None:
    try:
        reply = request(str(admin), {"cmd": "status"}, timeout=5)
    except OSError:
        return None
    result = reply.get("result")
    return result if isinstance(result, dict) else None


def test_run_when_the_unit_pinned_its_cpus_makes_no_system_call_the_unit_denies(tmp_path: Path) -> None:
    """A session traced from exec to exit (`strace -f`, every thread): start-up, notify and
    watchdog, a replayed feed traded against the broker simulator, a status request, a metrics
    scrape, SIGTERM. Each call must pass the unit's filter; with TRADINGD_CPUS set as the unit's
    CPUAffinity= pinned it, that includes no sched_setaffinity."""
    analyze, strace, taskset = _systemd_analyze(), _strace(), _taskset()
    allowed = unit_allowed_syscalls(analyze)
    minutes, symbols = 40, 8
    data = tmp_path / "bars.csv"
    write_csv(generate(SynthParams(symbols=symbols, minutes=minutes, seed=3)), data)
    admin, trace, metrics_port = tmp_path / "admin.sock", tmp_path / "strace.txt", _free_port()
    cpu = max(os.sched_getaffinity(0))
    systemd = FakeSystemd(tmp_path / "notify.sock")
    log = (tmp_path / "daemon.log").open("wb")
    with (
        _serving("broker-sim", "--port", "0", "--log", str(tmp_path / "broker.jsonl")) as broker_port,
        _serving("replay", str(data), "--port", "0", "--speed", "0") as feed_port,
    ):
        config = tmp_path / "tradingd.toml"
        config.write_text(
            f"[feed]\nport = {feed_port}\n[universe]\nsymbols = {json.dumps(symbol_names(symbols))}\n"
            f"[broker]\nport = {broker_port}\n[metrics]\nport = {metrics_port}\n"
            f"[journal]\npath = '{tmp_path / 'journal.msgpack'}'\n"
            f"[admin]\nsocket = '{admin}'\noperators = [{os.getuid()}]\n"
            "[risk]\nclock = 'feed'\n[signal]\nconfidence_threshold = 0.0\nnotional_per_signal = 40000.0\n"
            "[engine]\nallow_unqualified = true\n"
        )
        env = _unit_environment(
            TRADINGD_CONFIG=str(config),
            TRADINGD_CPUS=str(cpu),
            NOTIFY_SOCKET=str(systemd.path),
            WATCHDOG_USEC="1000000",
        )
        argv = [taskset, "-c", str(cpu), strace, "-f", "-qq", "-o", str(trace), *_exec_start(config)]
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=ROOT)
        try:
            _poll(lambda: systemd.first("READY") is not None or proc.poll() is not None, 120, "READY=1")
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]

            def traded() -> bool:
                status = _status(admin)
                bars = status.get("bars") if status else None
                return isinstance(bars, dict) and bars.get("minutes") == minutes

            _poll(traded, 120, f"{minutes} minutes traded")
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as scrape:
                assert b"tradingd_" in scrape.read()
            first = json.loads((tmp_path / "daemon.log").read_text().splitlines()[0])
            assert first["event"] == "config" and first["cpus"] == [cpu]
            os.kill(first["pid"], signal.SIGTERM)
            assert proc.wait(60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            systemd.close()
    assert (tmp_path / "broker.jsonl").read_text().count("\n") > 0, "no order reached the broker"
    calls: dict[str, str] = {}
    for line in trace.read_text(errors="replace").splitlines():
        match = SYSCALL_LINE.match(line)
        if match is None:
            continue
        name = match[1]
        harmless = HARMLESS_WHEN_DENIED.get(name)
        if harmless is None or harmless.search(line) is None:
            calls.setdefault(name, line)
    assert {"execve", "connect", "accept4", "exit_group"} <= calls.keys(), "the trace missed the session"
    denied = {name: line[:200] for name, line in calls.items() if name not in allowed}
    assert denied == {}, "system calls the unit denies:\n" + "\n".join(denied.values())


def test_run_when_the_unit_did_not_pin_its_cpus_exits_78_naming_the_drop_in(tmp_path: Path) -> None:
    """strace stands in for the unit's filter (SystemCallErrorNumber=EPERM) on sched_setaffinity."""
    strace, taskset = _strace(), _taskset()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: one to start on and another to ask for")
    config = tmp_path / "tradingd.toml"
    config.write_text(
        f"[metrics]\nenabled = false\n[journal]\npath = '{tmp_path / 'journal.msgpack'}'\n"
        "[engine]\nallow_unqualified = true\n"
    )
    deny = ["-e", "trace=sched_setaffinity", "-e", "inject=sched_setaffinity:error=EPERM"]
    result = subprocess.run(
        [taskset, "-c", str(cpus[0]), strace, "-f", "-qq", "-o", os.devnull, *deny, *_exec_start(config)],
        env=_unit_environment(TRADINGD_CPUS=str(cpus[-1])),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 78, result.stderr[-2000:]
    assert f"CPUAffinity={cpus[-1]}" in result.stderr and "tradingd.service.d/cpus.conf" in result.stderr
