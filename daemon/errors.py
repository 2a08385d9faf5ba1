"""Errors raised by the daemon package. Each carries the data that explains it."""

from __future__ import annotations

EX_CONFIG = 78  # sysexits.h EX_CONFIG: systemd's RestartPreventExitStatus keeps it down
EX_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: a fail-stop; systemd restarts it and the journal replay takes over
EX_UNAVAILABLE = 69  # sysexits.h EX_UNAVAILABLE: a backend this configuration needs cannot run here


class DaemonError(Exception):
    """Base class for daemon failures."""


class ConfigError(DaemonError):
    """The configuration is unusable. Names the file and the key."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        super().__init__(f"{file}: {key}: {problem}")
