"""The admin socket, over the real Unix socket: every command, and clear errors for a refused
uid, a malformed request and an unknown order id."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from broker.journal import read_journal
from daemon.admin import request
from daemon.config import AdminConfig, RiskConfig, SignalConfig
from tests.helpers import Rig, running_rig, wait_for
from tests.test_daemon_loopback import WINDOW, _send_minutes

SYMBOLS = ("AAA", "BBB", "CCC")


async def _ask(rig: Rig, **message: Any) -> dict[str, Any]:
    path = str(rig.daemon.config.admin.socket)
    return await asyncio.to_thread(request, path, message)


async def _parked_rig_minutes(rig: Rig) -> None:
    await _send_minutes(rig, SYMBOLS, range(WINDOW + 3))
    await wait_for(lambda: rig.daemon.stats.minute_ends == WINDOW + 3 and rig.daemon.runtime.idle_event.is_set())


async def test_approve_when_the_parked_signal_is_older_than_max_age_is_denied_stale_despite_fresh_bars(
    tmp_path: Path,
) -> None:
    """Staleness is the signal's own age: later bars of the symbol do not make an old signal new."""
    risk = RiskConfig(clock="feed", review_threshold=1.0, max_signal_age_s=90.0)
    async with running_rig(tmp_path, SYMBOLS, signal=SignalConfig(confidence_threshold=0.0), risk=risk) as rig:
        await _parked_rig_minutes(rig)  # parked at the first full window, then three more minutes
        oldest = (await _ask(rig, cmd="review_list"))["result"][0]
        assert oldest["age_s"] >= 0
        approved = await _ask(rig, cmd="review_approve", id=oldest["id"])
        assert approved == {"ok": True, "result": {"id": oldest["id"], "state": "denied"}}
        assert not rig.broker.received
    denials = [r for r in read_journal(tmp_path / "journal.msgpack") if r["kind"] == "denied"]
    assert any(r["id"] == oldest["id"] and r["reason"] == "stale_signal" for r in denials)


async def test_review_list_approve_and_reject_over_the_socket(tmp_path: Path) -> None:
    risk = RiskConfig(clock="feed", review_threshold=1.0, max_signal_age_s=600.0)
    async with running_rig(tmp_path, SYMBOLS, signal=SignalConfig(confidence_threshold=0.0), risk=risk) as rig:
        assert stat.S_IMODE(os.stat(rig.daemon.config.admin.socket).st_mode) == 0o660
        await _parked_rig_minutes(rig)
        listed = await _ask(rig, cmd="review_list")
        assert listed["ok"] and len(listed["result"]) >= 2
        assert rig.daemon.stats.orders_sent == 0 and not rig.broker.received
        first, second = listed["result"][0]["id"], listed["result"][1]["id"]

        approved = await _ask(rig, cmd="review_approve", id=first)
        assert approved == {"ok": True, "result": {"id": first, "state": "sent"}}
        await wait_for(lambda: [o.cl_ord_id for o in rig.broker.received] == [first], what="approved order at broker")

        rejected = await _ask(rig, cmd="review_reject", id=second, reason="too big today")
        assert rejected["ok"]
        assert rig.daemon.runtime.book.orders[second].state == "denied"
        remaining = {p["id"] for p in (await _ask(rig, cmd="review_list"))["result"]}
        assert first not in remaining and second not in remaining

        missing = await _ask(rig, cmd="review_approve", id="no-such-order")
        assert missing == {"ok": False, "error": "no parked order 'no-such-order'"}
    records = list(read_journal(tmp_path / "journal.msgpack"))
    reviews = [(r["id"], r["action"], r.get("uid")) for r in records if r["kind"] == "review"]
    assert (first, "approved", os.getuid()) in reviews and (second, "rejected", os.getuid()) in reviews


async def test_halt_resume_and_kill_over_the_socket(tmp_path: Path) -> None:
    async with running_rig(tmp_path, SYMBOLS) as rig:
        desk = rig.daemon.runtime.desk
        assert (await _ask(rig, cmd="halt", symbol="BBB"))["result"] == {"changed": True}
        assert desk.halts.halted_symbols() == ["BBB"]
        status = (await _ask(rig, cmd="status"))["result"]
        assert status["halted"] == ["BBB"] and status["market"] == "active" and status["reconciled"]
        assert (await _ask(rig, cmd="resume", symbol="BBB"))["result"] == {"changed": True}
        assert desk.halts.halted_symbols() == []
        assert (await _ask(rig, cmd="halt", symbol="CCC", reducing=True))["result"] == {"changed": True}
        assert (await _ask(rig, cmd="status"))["result"]["reducing"] == ["CCC"]
        assert (await _ask(rig, cmd="resume", symbol="CCC"))["result"] == {"changed": True}
        assert (await _ask(rig, cmd="status"))["result"]["reducing"] == []

        killed = await _ask(rig, cmd="kill")
        assert killed["ok"] and desk.kill and desk.halts.market == "halted"
        status = (await _ask(rig, cmd="status"))["result"]
        assert status["kill"] is True and status["market"] == "halted"
        assert (await _ask(rig, cmd="resume", all=True))["result"] == {"changed": True}
        assert not desk.kill and desk.halts.market == "active"

        unknown = await _ask(rig, cmd="halt", symbol="ZZZ")
        assert unknown == {"ok": False, "error": "unknown symbol 'ZZZ'"}
    kinds = [
        (r["kind"], r.get("command"))
        for r in read_journal(tmp_path / "journal.msgpack")
        if r["kind"] in ("operator", "kill")
    ]
    assert ("operator", "kill") in kinds and ("kill", None) in kinds


async def test_malformed_requests_get_errors_and_the_daemon_keeps_serving(tmp_path: Path) -> None:
    async with running_rig(tmp_path, SYMBOLS) as rig:
        path = str(rig.daemon.config.admin.socket)

        def raw(payload: bytes) -> dict[str, Any]:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(path)
                sock.sendall(payload)
                return json.loads(sock.makefile("rb").readline())

        assert "not JSON" in (await asyncio.to_thread(raw, b"{nope\n"))["error"]
        assert 'string "cmd"' in (await asyncio.to_thread(raw, b"[1, 2]\n"))["error"]
        assert "unknown command 'dance'" in (await asyncio.to_thread(raw, b'{"cmd": "dance"}\n'))["error"]
        assert (
            "'id' must be a non-empty string" in (await asyncio.to_thread(raw, b'{"cmd": "review_approve"}\n'))["error"]
        )
        assert "symbol" in (await asyncio.to_thread(raw, b'{"cmd": "halt", "symbol": 7}\n'))["error"]
        assert (await _ask(rig, cmd="status"))["ok"]


async def test_a_uid_outside_the_operators_is_refused_and_journaled(tmp_path: Path) -> None:
    stranger_only = AdminConfig(socket=str(tmp_path / "admin.sock"), operators=(os.getuid() + 4242,))
    async with running_rig(tmp_path, SYMBOLS, admin=stranger_only) as rig:
        reply = await _ask(rig, cmd="kill")
        assert reply == {"ok": False, "error": f"uid {os.getuid()} is not an operator of this daemon"}
        assert not rig.daemon.runtime.desk.kill
    refused = [r for r in read_journal(tmp_path / "journal.msgpack") if r["kind"] == "operator"]
    assert refused and refused[0]["refused"] is True and refused[0]["uid"] == os.getuid()


async def test_cli_commands_talk_to_the_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "admin.sock")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon", *args, "--socket", sock], capture_output=True, text=True, timeout=60
        )

    async with running_rig(tmp_path, SYMBOLS):
        result = await asyncio.to_thread(cli, "halt", "AAA")
        assert result.returncode == 0, result.stderr
        status = await asyncio.to_thread(cli, "status")
        assert json.loads(status.stdout)["halted"] == ["AAA"]
        bad = await asyncio.to_thread(cli, "review", "approve", "nope")
        assert bad.returncode == 1 and "no parked order 'nope'" in bad.stderr
    gone = await asyncio.to_thread(cli, "status")
    assert gone.returncode == 1 and "cannot reach" in gone.stderr
