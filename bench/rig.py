"""A daemon as its own process, for benchmarks and process-level tests: its configuration (fast
reconnects, metrics off, an admin socket and a journal in the work folder) and its start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO

from broker.crashpoints import ENV as CRASH_ENV


def daemon_config(
    work: Path,
    feed_port: int,
    broker_port: int,
    symbols: list[str],
    *,
    signal: str = "confidence_threshold = 0.0\nnotional_per_signal = 10000.0",
    risk: str = 'clock = "feed"\nduplicate_window_ms = 0',
    journal: str = 'fsync = "batch"',
    extra: str = "",
    level: str = "warning",
) -> Path:
    """Write ``work/tradingd.toml``; each keyword is the body of its section, ``extra`` whole
    sections appended."""
    quoted = ", ".join(f'"{s}"' for s in symbols)
    path = work / "tradingd.toml"
    path.write_text(
        f"""
[feed]
port = {feed_port}
reconnect_initial_ms = 20
reconnect_max_ms = 200
[universe]
symbols = [{quoted}]
[broker]
port = {broker_port}
reconnect_initial_ms = 20
reconnect_max_ms = 200
[signal]
{signal}
[risk]
{risk}
[metrics]
enabled = false
[admin]
socket = "{work / "admin.sock"}"
operators = [{os.getuid()}]
[journal]
path = "{work / "journal.msgpack"}"
{journal}
[log]
level = "{level}"
[engine]
allow_unqualified = true  # the shipped model is not qualified; a rig measures the daemon
{extra}
"""
    )
    return path


def spawn_daemon(config: Path, stderr: IO[bytes], crash_at: str | None = None) -> subprocess.Popen[bytes]:
    """``tradingd run`` on ``config``; ``crash_at`` arms a crash point (``point@n``)."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env=env,
    )
