"""The operator's admin socket: a Unix socket (mode 0660) speaking one JSON object per line.

Request ``{"cmd": "...", ...}``, reply ``{"ok": true, "result": ...}`` or ``{"ok": false,
"error": "..."}``. The caller's uid comes from the kernel (SO_PEERCRED); uids outside
``admin.operators`` are refused. Every action, refused ones too, is journaled with the uid. A
malformed request gets an error reply, never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import structlog

from broker.errors import IllegalTransitionError, JournalError
from daemon.config import AdminConfig
from engines.base import describe
from risk.errors import RiskError
from risk.failover import FailoverReason
from risk.states import IllegalStateTransitionError

if TYPE_CHECKING:
    from daemon.desk import OrderDesk
    from daemon.runtime import Runtime


def _rows(samples: Any) -> dict[str, Any]:
    """Batch sizes: how many batches, the median and largest."""
    if not len(samples):
        return {"count": 0, "p50": None, "max": None}
    return {"count": len(samples), "p50": int(np.percentile(samples, 50)), "max": int(samples.max())}


log = structlog.get_logger("tradingd.admin")

MAX_REQUEST_BYTES = 65536
# Errors about the daemon's own state, not the request: they stop the daemon (fail-stop).
FATAL = (JournalError, IllegalTransitionError, IllegalStateTransitionError)
COMMANDS = ("status", "review_list", "review_approve", "review_reject", "halt", "resume", "kill", "failover")


class RequestError(Exception):
    pass


def peer_uid(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class AdminServer:
    def __init__(self, desk: OrderDesk, runtime: Runtime, config: AdminConfig) -> None:
        self.desk = desk
        self.runtime = runtime
        self.path = Path(config.socket)
        self.operators = frozenset(config.operators)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise RequestError(f"{self.path} exists and is not a socket")
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST_BYTES)
        os.chmod(self.path, 0o660)
        log.info("admin_listening", socket=str(self.path), operators=sorted(self.operators))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            uid = peer_uid(writer)
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(_reply(False, f"request over {MAX_REQUEST_BYTES} bytes"))
                    break
                if not line:
                    break
                writer.write(self.handle(line, uid))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def handle(self, line: bytes, uid: int) -> bytes:
        """One request line -> one reply line. Never raises."""
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return _reply(False, f"malformed request: not JSON ({exc})")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return _reply(False, 'malformed request: expected an object with a string "cmd"')
        cmd = request["cmd"]
        args = {k: v for k, v in request.items() if k != "cmd"}
        if uid not in self.operators:
            self.desk.operator(uid, cmd, refused=True)
            log.warning("admin_refused", uid=uid, cmd=cmd)
            return _reply(False, f"uid {uid} is not an operator of this daemon")
        try:
            result = self._dispatch(cmd, args, uid)
        except (RequestError, RiskError) as exc:
            return _reply(False, str(exc))
        except FATAL:
            raise  # not the request's fault: the daemon fail-stops (its loop exception handler)
        except Exception as exc:  # an operator's request must never take the daemon down
            log.exception("admin_error", cmd=cmd)
            return _reply(False, f"internal error: {type(exc).__name__}: {exc}")
        if cmd not in ("status", "review_list"):
            self.desk.operator(uid, cmd, **args)
            log.warning("admin_action", uid=uid, cmd=cmd, args=args)
        return _reply(True, result)

    def _dispatch(self, cmd: str, args: dict[str, Any], uid: int) -> Any:
        desk = self.desk
        match cmd:
            case "status":
                return self._status()
            case "review_list":
                return desk.review_list()
            case "review_approve":
                return {"id": _string(args, "id"), "state": desk.approve(_string(args, "id"), uid)}
            case "review_reject":
                reason = args.get("reason") or "rejected by operator"
                desk.reject(_string(args, "id"), uid, str(reason))
                return {"id": args["id"], "state": "denied"}
            case "halt":
                return {"changed": desk.halt(_symbol(args), uid, reducing=args.get("reducing") is True)}
            case "resume":
                return {"changed": desk.resume(_symbol(args), uid)}
            case "kill":
                return {"cancels_sent": desk.kill_switch(uid)}
            case "failover":
                to = _string(args, "to")
                if to not in ("primary", "standby"):
                    raise RequestError(f"failover to {to!r}: must be 'primary' or 'standby'")
                try:
                    event = self.runtime.engines.switch(to, FailoverReason.OPERATOR, f"operator uid {uid}")
                except LookupError as exc:
                    raise RequestError(str(exc)) from exc
                if event is not None:
                    desk.record_failover(event, uid=uid)
                return {"active": self.runtime.engines.active.name, "changed": event is not None}
            case _:
                raise RequestError(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")

    def _status(self) -> dict[str, Any]:
        s = self.runtime.stats
        return {
            **self.desk.status(),
            "engine": self.runtime.engines.status(),
            "bars": {
                "received": s.bars_received,
                "accepted": s.bars_accepted,
                "rejected": sum(s.bars_rejected.values()),
                "superseded": self.runtime.batcher.superseded,
                "minutes": s.minute_ends,
            },
            "idle": self.runtime.idle_event.is_set(),
            "batches": s.batches,
            "latency_us": {
                "tick_to_order": s.tick_to_order.summary_us(),
                "infer": s.infer.summary_us(),
                "batch_wait": s.batch_wait.summary_us(),
            },
            # Per order: tick-to-order (from the socket read), overhead (less its batch's engine
            # time) and the stages, as percentiles over the orders; batches by size and bucket.
            "orders_latency": s.stages.summary_us(),
            "batch_rows": _rows(s.batch_size.samples()),
            "batch_buckets": {str(b): n for b, n in sorted(s.batch_buckets.items())},
            "engine_backend": describe(self.runtime.engines.active),
            "model_qualified": s.model_qualified,
            "journal_fsync": self.runtime.journal.fsync,
            "orders": {
                "intents": s.intents,
                "sent": s.orders_sent,
                "denied": sum(s.orders_denied.values()),
                "filled": s.orders_filled,
                "parked": s.reviews_parked,
            },
            "feed_connected": self.runtime.feed_connected,
        }


def _string(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise RequestError(f"malformed request: {key!r} must be a non-empty string")
    return value


def _symbol(args: dict[str, Any]) -> str | None:
    if args.get("all") is True:
        return None
    return _string(args, "symbol")


def _reply(ok: bool, payload: Any) -> bytes:
    body = {"ok": True, "result": payload} if ok else {"ok": False, "error": payload}
    return orjson.dumps(body) + b"\n"


def request(socket_path: str, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """The CLI side: send one request, return the decoded reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(orjson.dumps(message) + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = orjson.loads(data)
    return reply
