"""FIX 4.4 / 4.2 order gateway: an initiator session over asyncio, with the same interface as the
native ``GatewayClient`` (``send``, ``run``, ``stop``, ``connected``; callbacks for execution
reports, connection events and the reconciliation status).

Session layer: Logon (with the heartbeat interval), Heartbeat and TestRequest both ways,
sequence numbers persisted across restarts (``FixSeqStore``), ResendRequest answered with one
SequenceReset-GapFill (an order is never resent blindly: what the broker missed is reconciled
through OrderStatusRequest), SequenceReset from the peer, Logout, session-level Reject and
BusinessMessageReject, and gap detection on what we receive (one open-ended ResendRequest per
gap, none more while it is being answered; a resent message carries PossDupFlag and an ExecID
seen before is not applied twice). Messages with a bad
checksum or body length are dropped unprocessed (the peer's resend covers them); a wrong
CompID is rejected and the session logged out; an unknown message type is answered with a
session Reject, an unsupported one with a BusinessMessageReject.

Application layer: NewOrderSingle, OrderCancelRequest, OrderStatusRequest out; ExecutionReport
and OrderCancelReject in, mapped onto the order state machine of ``broker.orders``. Nothing is
guessed: a cancel of an order this side does not know (no Side, no OrderQty) is refused, and a
report whose quantity is not a whole number, or whose price or side cannot be read, is answered
with a session Reject and counted, never truncated or defaulted.

Codec: ``simplefix`` builds and parses messages (and fills BodyLength and CheckSum); framing
and checksum verification are ours, from BodyLength.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import simplefix
import structlog

from broker import protocol as wire
from broker.reconnect import Backoff, ClosingProtocol, keep_connected

log = structlog.get_logger("tradingd.fix")
K = TypeVar("K")
V = TypeVar("V")

SOH = b"\x01"
BEGIN_STRINGS = {"fix44": "FIX.4.4", "fix42": "FIX.4.2"}
TIF = {"day": "0", "gtc": "1", "ioc": "3", "fok": "4"}
MAX_FRAME = 64 * 1024
# Orders, order MsgSeqNums and ExecIDs remembered per session, oldest forgotten first (the
# desk's book, which the journal rebuilds, answers for orders older than that).
RECENT = 10_000
# FIX quantities are of the float type, so "100" and "100.00" are one whole quantity; a fraction,
# an exponent, a sign or more shares than any order here could hold is a broken field.
QTY = re.compile(r"([0-9]{1,18})(?:\.0*)?", re.ASCII)
MAX_QTY = 1_000_000_000
PX = re.compile(r"[0-9]{1,15}(?:\.[0-9]{0,15})?", re.ASCII)

# Tags
BEGIN_STRING, BODY_LENGTH, CHECKSUM, MSG_TYPE, MSG_SEQ_NUM = 8, 9, 10, 35, 34
SENDER, TARGET, SENDING_TIME, POSS_DUP, ORIG_SENDING_TIME = 49, 56, 52, 43, 122
TEXT, HEARTBT_INT, TEST_REQ_ID, BEGIN_SEQ_NO, END_SEQ_NO = 58, 108, 112, 7, 16
NEW_SEQ_NO, GAP_FILL, REF_SEQ_NUM, REF_MSG_TYPE, SESSION_REJECT_REASON = 36, 123, 45, 372, 373
REF_TAG_ID = 371
RESET_SEQ_NUM, BUSINESS_REJECT_REF_ID, BUSINESS_REJECT_REASON = 141, 379, 380
CL_ORD_ID, ORIG_CL_ORD_ID, ORDER_ID, EXEC_ID, EXEC_TYPE, ORD_STATUS = 11, 41, 37, 17, 150, 39
SYMBOL, SIDE, ORDER_QTY, ORD_TYPE, PRICE, TIME_IN_FORCE, TRANSACT_TIME = 55, 54, 38, 40, 44, 59, 60
HANDL_INST, LAST_QTY, LAST_PX, CUM_QTY, LEAVES_QTY, AVG_PX, EXEC_TRANS_TYPE = 21, 32, 31, 14, 151, 6, 20

# Message types
HEARTBEAT, TEST_REQUEST, RESEND_REQUEST, REJECT, SEQUENCE_RESET, LOGOUT, LOGON = "0", "1", "2", "3", "4", "5", "A"
EXECUTION_REPORT, ORDER_CANCEL_REJECT, NEW_ORDER_SINGLE, ORDER_CANCEL_REQUEST = "8", "9", "D", "F"
ORDER_STATUS_REQUEST, BUSINESS_MESSAGE_REJECT = "H", "j"
ADMIN = {HEARTBEAT, TEST_REQUEST, RESEND_REQUEST, REJECT, SEQUENCE_RESET, LOGOUT, LOGON}
KNOWN_APP = {EXECUTION_REPORT, ORDER_CANCEL_REJECT, BUSINESS_MESSAGE_REJECT}
# Every standard FIX 4.x message type: one of these we do not handle is "unsupported"
# (BusinessMessageReject); anything else is "invalid" (session Reject, reason 11).
STANDARD_TYPES = set("0123456789ABCDEFGHJKLMNPQRSTVWXYZ") | {
    "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r", "s", "t", "u", "v", "w",
    "x", "y", "z", "AA", "AB", "AC", "AD", "AE", "AF", "AG", "AH", "AI", "AJ", "AK", "AL", "AM", "AN", "AO", "AP", "AQ",
    "AR", "AS", "AT", "AU", "AV", "AW", "AX", "AY", "AZ", "BA", "BB", "BC", "BD", "BE", "BF", "BG", "BH",
}  # fmt: skip

ORD_STATUS_MAP = {
    "0": wire.ExecStatus.NEW,
    "1": wire.ExecStatus.PARTIALLY_FILLED,
    "2": wire.ExecStatus.FILLED,
    "4": wire.ExecStatus.CANCELED,
    "8": wire.ExecStatus.REJECTED,
    "C": wire.ExecStatus.CANCELED,  # expired
}
SIDES = {wire.Side.BUY: "1", wire.Side.SELL: "2"}
SIDE_OF = {"1": wire.Side.BUY, "2": wire.Side.SELL}


_SEQ_NO = re.compile(r"[0-9]{1,18}")


def seq_no(value: str) -> int | None:
    """A sequence number field as an int, or None unless it is ASCII digits (``str.isdigit`` also
    takes "²", which ``int`` then refuses)."""
    return int(value) if _SEQ_NO.fullmatch(value) else None


class FixFrameError(ValueError):
    """Bytes that are not a FIX message: the connection cannot be trusted to stay in step."""


class FixFieldError(ValueError):
    """A field of an otherwise well-formed message whose value cannot be used as it stands."""

    def __init__(self, tag: int, value: str, problem: str, reason: int = 6) -> None:
        super().__init__(f"tag {tag} = {value!r}: {problem}")
        self.tag, self.value, self.problem = tag, value, problem
        self.reason = reason  # SessionRejectReason: 5 value out of range, 6 incorrect data format


@dataclass(slots=True)
class Frame:
    """One complete message as received: its raw bytes and whether its checksum held."""

    raw: bytes
    checksum_ok: bool


class FixFramer:
    """Cuts a byte stream into FIX messages by BeginString and BodyLength; checks CheckSum."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        while True:
            buf = self._buf
            if len(buf) < 2:
                break
            if not buf.startswith(b"8="):
                raise FixFrameError(f"expected BeginString (8=), got {bytes(buf[:16])!r}")
            first = buf.find(SOH)
            if first < 0 or first + 3 > len(buf):
                break
            end_len = buf.find(SOH, first + 1)
            if end_len < 0:
                break
            if not buf[first + 1 :].startswith(b"9="):
                raise FixFrameError("BodyLength (9) is not the second field")
            try:
                body_len = int(buf[first + 3 : end_len])
            except ValueError as exc:
                raise FixFrameError(f"BodyLength is not a number: {bytes(buf[first + 3 : end_len])!r}") from exc
            body_end = end_len + 1 + body_len
            total = body_end + 7  # 10=NNN<SOH>
            if total > self.max_frame:
                raise FixFrameError(f"message of {total} bytes exceeds {self.max_frame}")
            if len(buf) < total:
                break
            trailer = bytes(buf[body_end:total])
            if not (trailer.startswith(b"10=") and trailer.endswith(SOH)):
                raise FixFrameError(f"BodyLength {body_len} does not end at CheckSum: {trailer!r}")
            raw = bytes(buf[:total])
            del buf[:total]
            frames.append(Frame(raw, trailer[3:6] == f"{sum(raw[:body_end]) % 256:03d}".encode()))
        return frames


def parse(raw: bytes) -> simplefix.FixMessage:
    parser = simplefix.FixParser()
    parser.append_buffer(raw)
    message = parser.get_message()
    if message is None:
        raise FixFrameError(f"simplefix could not parse {raw[:40]!r}")
    return message


def text(message: simplefix.FixMessage, tag: int, default: str = "") -> str:
    value = message.get(tag)
    return value.decode(errors="replace") if value is not None else default


class FixSeqStore:
    """The session's next outgoing and next expected incoming sequence numbers, on disk.

    Written before each message goes out and after each one is accepted: one fixed-width
    ``pwrite`` at offset 0 (a few microseconds; a 22-byte write inside one page is not torn by a
    killed process), so a process killed at any point restarts with numbers the peer agrees with.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.next_out, self.next_in = 1, 1
        if path.exists():
            parts = path.read_text().split()
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                self.next_out, self.next_in = int(parts[0]), int(parts[1])
            else:
                log.error("fix_seq_store_unreadable", path=str(path), content=path.read_text()[:40])
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        self.save()

    def save(self) -> None:
        os.pwrite(self._fd, f"{self.next_out:010d} {self.next_in:010d}\n".encode(), 0)

    def reset(self) -> None:
        self.next_out, self.next_in = 1, 1
        self.save()

    def close(self) -> None:
        os.close(self._fd)


@dataclass(slots=True)
class FixStats:
    sent: int = 0
    received: int = 0
    bad_checksum: int = 0
    rejects_sent: int = 0
    rejects_received: int = 0
    business_rejects_received: int = 0
    gap_fills_sent: int = 0
    resend_requests_sent: int = 0
    duplicates_ignored: int = 0
    logons: int = 0
    resend_requests_held: int = 0  # gaps seen while a ResendRequest was already being answered
    cancels_refused: int = 0  # cancels of orders this side does not know, never sent
    malformed_fields: int = 0  # reports refused for a field that cannot be read (Reject sent)


@dataclass(slots=True)
class _GapRequest:
    """The ResendRequest being answered: it asked for everything from ``begin`` on (EndSeqNo 0),
    and it is complete once ``next_in`` passes ``end``, the highest number seen beyond the gap."""

    begin: int
    end: int
    progress_at: float  # when it was sent, or when the last message filled part of the gap


class _FixProtocol(ClosingProtocol):
    def __init__(self, client: FixGatewayClient) -> None:
        super().__init__()
        self._client = client
        self._framer = FixFramer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._client._attach(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._framer.feed(data)
        except FixFrameError as exc:
            self._client._garbled(str(exc))
            return
        for frame in frames:
            self._client._on_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._detach()
        super().connection_lost(exc)


class FixGatewayClient:
    """A FIX initiator kept logged on with backoff. ``send`` never blocks."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        protocol: str,
        sender_comp_id: str,
        target_comp_id: str,
        store: Path,
        on_report: Callable[[wire.ExecReport], None],
        on_event: Callable[[str, str], None],
        on_status: Callable[[wire.Status], None] = lambda _: None,
        backoff: Backoff,
        heartbeat_s: int = 30,
        time_in_force: str = "day",
        status_timeout_s: float = 2.0,
        logon_timeout_s: float = 10.0,
        reset_on_logon: bool = False,
        accept_peer_reset: bool = False,
        mono_ns: Callable[[], int] = time.monotonic_ns,
        wall_ns: Callable[[], int] = time.time_ns,
        known_order: Callable[[str], wire.NewOrder | None] = lambda _: None,
    ) -> None:
        self.host, self.port = host, port
        self.begin_string = BEGIN_STRINGS[protocol]
        self.sender, self.target = sender_comp_id, target_comp_id
        self.on_report, self.on_event, self.on_status = on_report, on_event, on_status
        self.backoff = backoff
        self.heartbeat_s = heartbeat_s
        self.tif = TIF[time_in_force]
        self.status_timeout_s = status_timeout_s
        # A peer that takes the connection but never answers the Logon is dropped and retried,
        # as a connect that is never answered is (Backoff.connect_timeout_s).
        self.logon_timeout_s = logon_timeout_s
        self.reset_on_logon = reset_on_logon
        self.accept_peer_reset = accept_peer_reset
        self._mono_ns, self._wall_ns = mono_ns, wall_ns
        # Orders sent by an earlier process (the journal's), for status requests after a restart.
        self._known_order = known_order
        self._order_seqs: OrderedDict[int, str] = OrderedDict()  # MsgSeqNum of each NewOrderSingle -> ClOrdID
        self.store = FixSeqStore(store)
        self.stats = FixStats()
        self._transport: asyncio.Transport | None = None
        self._logged_on = False
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_sent = self._last_received = 0.0
        self._test_request_pending: str | None = None
        self._exec_ids: OrderedDict[str, None] = OrderedDict()
        self._orders: OrderedDict[str, wire.NewOrder] = OrderedDict()  # what was sent, for cancels and status
        self._status_wanted: set[str] = set()
        self._status_orders: list[wire.OrderStatus] = []
        self._status_unknown: list[str] = []
        self._status_task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._gap_request: _GapRequest | None = None
        self.connected_event = asyncio.Event()

    # -- the GatewayClient interface ------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._logged_on

    async def run(self) -> None:
        try:
            await self._keep_logged_on()
        finally:
            self.store.close()

    async def _keep_logged_on(self) -> None:
        await keep_connected(
            lambda: _FixProtocol(self),
            self.host,
            self.port,
            self.backoff,
            self._stopping,
            self._tcp_event,
            reset_backoff_on_connect=False,
        )

    def stop(self) -> None:
        if self._logged_on and not self._stopping.is_set():
            self._send(LOGOUT, [(TEXT, "tradingd stopping")])
        self._stopping.set()

    def cork(self) -> None:
        """Nothing to hold: each message is written as it is sent."""

    def uncork(self) -> None:
        pass

    def send(self, message: wire.NewOrder | wire.Cancel | wire.StatusRequest) -> bool:
        """Write one message; True only when it was written: False when the session is not
        logged on, is logging out (``stop``), or its connection is closing, and for a cancel of an
        order this side does not know (refused, counted and logged rather than sent with a guess)."""
        if not self._logged_on or self._stopping.is_set():
            return False
        match message:
            case wire.NewOrder():
                seq = self._send(
                    NEW_ORDER_SINGLE,
                    [
                        (CL_ORD_ID, message.cl_ord_id),
                        (HANDL_INST, "1"),
                        (SYMBOL, message.symbol),
                        (SIDE, SIDES[message.side]),
                        (TRANSACT_TIME, _utc(message.ts)),
                        (ORDER_QTY, message.qty),
                        (ORD_TYPE, "2"),
                        (PRICE, _price(message.price)),
                        (TIME_IN_FORCE, self.tif),
                    ],
                )
                if seq is None:
                    return False
                _remember(self._orders, message.cl_ord_id, message)
                _remember(self._order_seqs, seq, message.cl_ord_id)
                return True
            case wire.Cancel():
                original = self._order(message.orig_cl_ord_id)
                if original is None:
                    # OrderCancelRequest needs the order's Side and OrderQty; a guessed Side
                    # could cancel nothing, or be taken as another order's.
                    self.stats.cancels_refused += 1
                    log.error(
                        "fix_cancel_refused",
                        id=message.orig_cl_ord_id,
                        cancel_id=message.cl_ord_id,
                        detail="unknown order: its Side and OrderQty are not known here",
                    )
                    self.on_event("cancel_refused", f"{message.orig_cl_ord_id}: unknown order")
                    return False
                fields: list[tuple[int, object]] = [
                    (ORIG_CL_ORD_ID, message.orig_cl_ord_id),
                    (CL_ORD_ID, message.cl_ord_id),
                    (SYMBOL, message.symbol),
                    (SIDE, SIDES[original.side]),
                    (TRANSACT_TIME, _utc(message.ts)),
                    (ORDER_QTY, original.qty),
                ]
                return self._send(ORDER_CANCEL_REQUEST, fields) is not None
            case wire.StatusRequest():
                return self._request_status(message.cl_ord_ids)

    def _now(self) -> float:
        return self._mono_ns() / 1e9

    # -- connection -----------------------------------------------------------------------

    def _tcp_event(self, kind: str, detail: str) -> None:
        # "connected" is ours to say, after Logon; the TCP layer's connects are logged only.
        if kind == "connected":
            log.info("fix_tcp_connected", peer=detail)
            return
        self.on_event(kind, detail)

    def _attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._last_received = self._now()
        if self.reset_on_logon:
            self.store.reset()
            self._order_seqs.clear()  # numbers from 1 again: the old ones name other messages now
        fields: list[tuple[int, object]] = [(98, "0"), (HEARTBT_INT, self.heartbeat_s)]
        if self.reset_on_logon:
            fields.append((RESET_SEQ_NUM, "Y"))
        self._send(LOGON, fields)
        self._tasks.append(asyncio.get_running_loop().create_task(self._logon_deadline()))

    async def _logon_deadline(self) -> None:
        await asyncio.sleep(self.logon_timeout_s)
        if not self._logged_on:
            self.on_event("logon_timeout", f"{self.host}:{self.port}: no Logon within {self.logon_timeout_s:g} s")
            self._drop(f"no Logon answer within {self.logon_timeout_s:g} s")

    def _detach(self) -> None:
        was = self._logged_on
        self._transport = None
        self._logged_on = False
        self._gap_request = None  # the next logon finds any gap again
        self.connected_event.clear()
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if was:
            log.warning("fix_logged_out", next_out=self.store.next_out, next_in=self.store.next_in)

    def _drop(self, why: str) -> None:
        log.error("fix_disconnecting", reason=why)
        if self._transport is not None:
            self._transport.abort()

    # -- sending --------------------------------------------------------------------------

    def _send(
        self,
        msg_type: str,
        fields: list[tuple[int, object]],
        *,
        seq: int | None = None,
        poss_dup: bool = False,
    ) -> int | None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return None
        m = simplefix.FixMessage()
        m.append_pair(BEGIN_STRING, self.begin_string, header=True)
        m.append_pair(MSG_TYPE, msg_type, header=True)
        m.append_pair(SENDER, self.sender, header=True)
        m.append_pair(TARGET, self.target, header=True)
        if seq is None:
            seq = self.store.next_out
            self.store.next_out += 1
            self.store.save()
        m.append_pair(MSG_SEQ_NUM, seq, header=True)
        if poss_dup:
            m.append_pair(POSS_DUP, "Y", header=True)
        m.append_utc_timestamp(SENDING_TIME, precision=3, header=True)
        if poss_dup:
            m.append_utc_timestamp(ORIG_SENDING_TIME, precision=3, header=True)
        for tag, value in fields:
            m.append_pair(tag, value)
        raw = m.encode()
        transport.write(raw)
        log.debug("fix_out", message=raw.replace(SOH, b"|").decode(errors="replace"))
        self._last_sent = self._now()
        self.stats.sent += 1
        return seq

    def _reject(self, ref_seq: int, ref_type: str, reason: int, why: str) -> None:
        self.stats.rejects_sent += 1
        fields: list[tuple[int, object]] = [(REF_SEQ_NUM, ref_seq)]
        if ref_type:
            fields.append((REF_MSG_TYPE, ref_type))
        fields += [(SESSION_REJECT_REASON, reason), (TEXT, why)]
        self._send(REJECT, fields)
        log.warning("fix_reject_sent", ref_seq=ref_seq, ref_type=ref_type, reason=reason, text=why)

    # -- receiving ------------------------------------------------------------------------

    def _garbled(self, why: str) -> None:
        # Not FIX at all: resynchronising inside the stream is guesswork, so drop the connection;
        # the next logon's sequence numbers bring back what was lost.
        self.stats.bad_checksum += 1
        self.on_event("malformed", why)
        self._drop(f"garbled stream: {why}")

    def _on_frame(self, frame: Frame) -> None:
        self._last_received = self._now()
        self._test_request_pending = None
        if not frame.checksum_ok:
            # FIX: a garbled message is ignored, its sequence number not consumed; the gap it
            # leaves is detected on the next message and resent.
            self.stats.bad_checksum += 1
            self.on_event("malformed", f"bad checksum: {frame.raw[:60]!r}")
            log.warning("fix_bad_checksum", message=frame.raw.replace(SOH, b"|").decode(errors="replace")[:200])
            return
        try:
            m = parse(frame.raw)
        except FixFrameError as exc:
            self.stats.bad_checksum += 1
            self.on_event("malformed", str(exc))
            return
        self.stats.received += 1
        log.debug("fix_in", message=frame.raw.replace(SOH, b"|").decode(errors="replace"))
        msg_type = text(m, MSG_TYPE)
        seq_number = seq_no(text(m, MSG_SEQ_NUM))
        if seq_number is None:
            self._reject(0, msg_type, 1, "MsgSeqNum (34) missing or not a number")
            return
        seq = seq_number
        if text(m, BEGIN_STRING) != self.begin_string:
            self._drop(f"BeginString {text(m, BEGIN_STRING)!r}, expected {self.begin_string}")
            return
        if text(m, SENDER) != self.target or text(m, TARGET) != self.sender:
            self._reject(seq, msg_type, 9, f"CompID problem: {text(m, SENDER)}->{text(m, TARGET)}")
            self._send(LOGOUT, [(TEXT, "CompID problem")])
            self._drop("wrong CompID")
            return
        if msg_type == SEQUENCE_RESET and text(m, GAP_FILL) != "Y":
            self._sequence_reset(m)  # reset mode ignores MsgSeqNum
            return
        if msg_type == LOGON and not self._logged_on:
            self._on_logon(m, seq)
            return
        expected = self.store.next_in
        if seq > expected:
            self._gap(expected, seq)
            if msg_type == LOGOUT:
                self._dispatch(m, msg_type, seq)
            return
        if seq < expected:
            if text(m, POSS_DUP) == "Y":
                self.stats.duplicates_ignored += 1
                return
            self._send(LOGOUT, [(TEXT, f"MsgSeqNum too low, expecting {expected} but received {seq}")])
            self._drop(f"MsgSeqNum {seq} lower than expected {expected} without PossDupFlag")
            return
        if msg_type == SEQUENCE_RESET:  # gap fill
            self._sequence_reset(m)
            return
        self.store.next_in = seq + 1
        self.store.save()
        self._gap_progress()
        self._dispatch(m, msg_type, seq)

    def _gap(self, expected: int, got: int) -> None:
        # One open-ended request covers the whole gap and whatever follows it, so the messages
        # that arrive before its answer (each one beyond the gap too) ask for nothing more. It is
        # asked again only once answered (a later gap), or when its answer has stalled for a
        # heartbeat interval (a resent message lost, a peer that dropped the request).
        now = self._now()
        resend = self._gap_request
        if resend is not None and now - resend.progress_at < self.heartbeat_s:
            resend.end = max(resend.end, got)
            self.stats.resend_requests_held += 1
            return
        end = got if resend is None else max(resend.end, got)
        stalled = resend is not None
        if self._send(RESEND_REQUEST, [(BEGIN_SEQ_NO, expected), (END_SEQ_NO, 0)]) is None:
            return
        self._gap_request = _GapRequest(expected, end, now)
        self.stats.resend_requests_sent += 1
        log.warning("fix_gap", expected=expected, received=got, action="ResendRequest", again_after_stall=stalled)

    def _gap_progress(self) -> None:
        resend = self._gap_request
        if resend is None:
            return
        if self.store.next_in > resend.end:
            self._gap_request = None
            log.info("fix_resend_complete", begin=resend.begin, end=resend.end, next_in=self.store.next_in)
        else:
            resend.progress_at = self._now()

    def _sequence_reset(self, m: simplefix.FixMessage) -> None:
        new = seq_no(text(m, NEW_SEQ_NO))
        this = seq_no(text(m, MSG_SEQ_NUM)) or 0
        if new is None:
            self._reject(this, SEQUENCE_RESET, 1, "NewSeqNo (36) missing or not a number")
            return
        if new < self.store.next_in:
            self._reject(this, SEQUENCE_RESET, 5, "NewSeqNo lower than expected")
            return
        log.info("fix_sequence_reset", gap_fill=text(m, GAP_FILL) == "Y", from_=self.store.next_in, to=new)
        self.store.next_in = new
        self.store.save()
        self._gap_progress()

    def _on_logon(self, m: simplefix.FixMessage, seq: int) -> None:
        if text(m, RESET_SEQ_NUM) == "Y" or (self.accept_peer_reset and seq == 1 and self.store.next_in != 1):
            if text(m, RESET_SEQ_NUM) != "Y":
                log.warning(
                    "fix_peer_reset", detail="the peer restarted its numbering at logon", was=self.store.next_in
                )
            self.store.next_in = 1
        expected = self.store.next_in
        self.stats.logons += 1
        self._logged_on = True
        self.connected_event.set()
        self.backoff.reset()
        if seq > expected:
            self.store.next_in = expected
            self._gap(expected, seq)
        elif seq < expected:
            self._logged_on = False
            self.connected_event.clear()
            self._send(LOGOUT, [(TEXT, f"MsgSeqNum too low, expecting {expected} but received {seq}")])
            self._drop(
                f"Logon MsgSeqNum {seq} lower than expected {expected} (if the broker restarts its numbering "
                "at logon, set broker.fix.accept_peer_reset or reset_on_logon)"
            )
            return
        else:
            self.store.next_in = seq + 1
        self.store.save()
        self._tasks.append(asyncio.get_running_loop().create_task(self._heartbeats()))
        log.info(
            "fix_logged_on",
            begin_string=self.begin_string,
            sender=self.sender,
            target=self.target,
            next_out=self.store.next_out,
            next_in=self.store.next_in,
        )
        self.on_event("connected", f"{self.host}:{self.port} {self.begin_string} {self.sender}->{self.target}")

    def _dispatch(self, m: simplefix.FixMessage, msg_type: str, seq: int) -> None:
        match msg_type:
            case "0":
                pass
            case "1":
                self._send(HEARTBEAT, [(TEST_REQ_ID, text(m, TEST_REQ_ID))])
            case "2":
                self._resend(m)
            case "3":
                self._session_reject(m)
            case "5":
                log.warning("fix_logout_received", text=text(m, TEXT))
                if self._logged_on:
                    self._logged_on = False
                    self._send(LOGOUT, [])
                if self._transport is not None:
                    self._transport.close()
            case "A":
                pass  # a second Logon in session: nothing to do
            case "8":
                self._execution_report(m)
            case "9":
                self._cancel_reject(m)
            case "j":
                self._business_reject(m)
            case other if other in STANDARD_TYPES:
                self._send(
                    BUSINESS_MESSAGE_REJECT,
                    [(REF_SEQ_NUM, seq), (REF_MSG_TYPE, other), (BUSINESS_REJECT_REASON, 3), (TEXT, "unsupported")],
                )
                log.warning("fix_unsupported_message", msg_type=other, seq=seq)
            case other:
                self._reject(seq, other, 11, f"invalid MsgType {other!r}")

    def _resend(self, m: simplefix.FixMessage) -> None:
        begin, end = seq_no(text(m, BEGIN_SEQ_NO) or "1"), seq_no(text(m, END_SEQ_NO) or "0")
        if begin is None or end is None:
            self._reject(seq_no(text(m, MSG_SEQ_NUM)) or 0, RESEND_REQUEST, 5, "BeginSeqNo/EndSeqNo not a number")
            return
        new_seq = self.store.next_out if end in (0, 999999) or end >= self.store.next_out else end + 1
        # Orders are never replayed: one gap fill covers the range, and open orders are
        # reconciled with OrderStatusRequest instead.
        self.stats.gap_fills_sent += 1
        log.warning("fix_resend_request", begin=begin, end=end, answered="SequenceReset-GapFill", new_seq=new_seq)
        self._send(SEQUENCE_RESET, [(GAP_FILL, "Y"), (NEW_SEQ_NO, new_seq)], seq=begin, poss_dup=True)

    async def _heartbeats(self) -> None:
        interval = float(self.heartbeat_s)
        while self._logged_on:
            await asyncio.sleep(min(1.0, interval / 4))
            now = self._now()
            if now - self._last_sent >= interval:
                self._send(HEARTBEAT, [])
            silent = now - self._last_received
            if silent >= interval * 1.2 and self._test_request_pending is None:
                self._test_request_pending = f"TEST-{next(self._ids)}"
                self._send(TEST_REQUEST, [(TEST_REQ_ID, self._test_request_pending)])
            elif silent >= interval * 2.4:
                self._drop(f"no message for {silent:.0f} s after a TestRequest")
                return

    # -- application ----------------------------------------------------------------------

    def _execution_report(self, m: simplefix.FixMessage) -> None:
        try:
            self._apply_execution_report(m)
        except FixFieldError as exc:
            self._malformed(m, exc)

    def _malformed(self, m: simplefix.FixMessage, exc: FixFieldError) -> None:
        """A message whose field cannot be used: rejected (its number is consumed), counted,
        logged, and left unapplied; the order's state comes back through reconciliation."""
        self.stats.malformed_fields += 1
        msg_type, seq = text(m, MSG_TYPE), seq_no(text(m, MSG_SEQ_NUM)) or 0
        log.error("fix_field_refused", msg_type=msg_type, seq=seq, tag=exc.tag, value=exc.value[:40], why=exc.problem)
        self.on_event("malformed", f"MsgSeqNum {seq} ({msg_type}): {exc}")
        self.stats.rejects_sent += 1
        fields: list[tuple[int, object]] = [(REF_SEQ_NUM, seq), (REF_TAG_ID, exc.tag), (REF_MSG_TYPE, msg_type)]
        fields += [(SESSION_REJECT_REASON, exc.reason), (TEXT, f"tag {exc.tag}: {exc.problem}")]
        self._send(REJECT, fields)

    def _apply_execution_report(self, m: simplefix.FixMessage) -> None:
        exec_id = text(m, EXEC_ID)
        # A resent report (PossDupFlag) whose ExecID this session has seen is not applied twice.
        # ExecIDs are unique within the peer's session only (a restarted peer starts again).
        if exec_id and text(m, POSS_DUP) == "Y" and exec_id in self._exec_ids:
            self.stats.duplicates_ignored += 1
            return
        exec_type = text(m, EXEC_TYPE)
        ord_status = text(m, ORD_STATUS)
        cl_ord_id = text(m, CL_ORD_ID)
        status = ORD_STATUS_MAP.get(ord_status)
        if exec_type == "I" or text(m, EXEC_TRANS_TYPE) == "3":  # an order-status answer
            self._status_answer(m, cl_ord_id, status)
            return
        if exec_type in ("4", "C") and text(m, ORIG_CL_ORD_ID):
            cl_ord_id = text(m, ORIG_CL_ORD_ID)  # our cancel's report names the original order
        if status is None:
            log.warning("fix_exec_report_ignored", id=cl_ord_id, ord_status=ord_status, exec_type=exec_type)
            return
        report = wire.ExecReport(
            cl_ord_id=cl_ord_id,
            exec_id=exec_id,
            status=status,
            symbol=text(m, SYMBOL),
            side=self._side(m, cl_ord_id),
            last_qty=_qty(m, LAST_QTY),
            last_px=_px(m, LAST_PX),
            cum_qty=_qty(m, CUM_QTY),
            leaves_qty=_qty(m, LEAVES_QTY),
            ts=self._wall_ns(),
            text=text(m, TEXT),
        )
        # Remembered only once applied: a refused report, resent with the field fixed, counts.
        if exec_id:
            _remember(self._exec_ids, exec_id, None)
        self.on_report(report)

    def _side(self, m: simplefix.FixMessage, cl_ord_id: str) -> wire.Side:
        """The report's Side, else the order's as sent; never a guess."""
        side = SIDE_OF.get(text(m, SIDE))
        if side is not None:
            return side
        original = self._order(cl_ord_id)
        if original is None:
            raise FixFieldError(SIDE, text(m, SIDE), "missing or not buy/sell, and the order is unknown here", 5)
        return original.side

    def _session_reject(self, m: simplefix.FixMessage) -> None:
        self.stats.rejects_received += 1
        ref_seq = text(m, REF_SEQ_NUM)
        reason = text(m, TEXT) or f"session reject, reason {text(m, SESSION_REJECT_REASON)}"
        log.error(
            "fix_reject_received",
            ref_seq=ref_seq,
            ref_type=text(m, REF_MSG_TYPE),
            reason=text(m, SESSION_REJECT_REASON),
            text=text(m, TEXT),
        )
        ref = seq_no(ref_seq)
        # Only a reject of a NewOrderSingle of this session ends an order (the table is emptied
        # whenever the numbering restarts); a reject of anything else is only logged.
        about_order = text(m, REF_MSG_TYPE) in ("", NEW_ORDER_SINGLE)
        cl_ord_id = self._order_seqs.get(ref) if ref is not None and about_order else None
        order = self._order(cl_ord_id) if cl_ord_id else None
        if order is not None:
            # The peer refused the order itself (a field it does not accept): the order is over.
            self.on_report(
                wire.ExecReport(
                    order.cl_ord_id, f"reject-{ref_seq}", wire.ExecStatus.REJECTED, order.symbol, order.side, 0, 0.0,
                    0, 0, self._wall_ns(), reason,
                )
            )  # fmt: skip
        else:
            self.on_event("rejected", reason)

    def _cancel_reject(self, m: simplefix.FixMessage) -> None:
        log.warning("fix_cancel_rejected", id=text(m, ORIG_CL_ORD_ID), cancel_id=text(m, CL_ORD_ID), text=text(m, TEXT))
        self.on_event("cancel_rejected", f"{text(m, ORIG_CL_ORD_ID)}: {text(m, TEXT)}")

    def _business_reject(self, m: simplefix.FixMessage) -> None:
        self.stats.business_rejects_received += 1
        ref_type, ref_id = text(m, REF_MSG_TYPE), text(m, BUSINESS_REJECT_REF_ID)
        log.error("fix_business_reject", ref_type=ref_type, ref_id=ref_id, reason=text(m, BUSINESS_REJECT_REASON))
        if ref_type == ORDER_STATUS_REQUEST:
            # The peer cannot answer status requests: reconcile from the journal alone.
            self._finish_status(f"peer does not support OrderStatusRequest: {text(m, TEXT)}")
            return
        order = self._order(ref_id)
        if ref_type == NEW_ORDER_SINGLE and order is not None:
            self.on_report(
                wire.ExecReport(
                    ref_id, f"bmr-{ref_id}", wire.ExecStatus.REJECTED, order.symbol, order.side, 0, 0.0, 0, 0,
                    self._wall_ns(), text(m, TEXT) or "business message reject",
                )
            )  # fmt: skip

    def _order(self, cl_ord_id: str) -> wire.NewOrder | None:
        """An order as sent: this session's memory, else the journal's (through the desk)."""
        return self._orders.get(cl_ord_id) or self._known_order(cl_ord_id)

    # -- reconciliation -------------------------------------------------------------------

    def _request_status(self, cl_ord_ids: list[str]) -> bool:
        self._status_wanted = set(cl_ord_ids)
        self._status_orders, self._status_unknown = [], []
        if not cl_ord_ids:
            # Answered at once, but after send() returns, as an answer off the wire would be:
            # the caller records that it asked before it hears the answer.
            asyncio.get_running_loop().call_soon(self._finish_status, "no open orders")
            return True
        for cl_ord_id in cl_ord_ids:
            known = self._order(cl_ord_id)
            fields: list[tuple[int, object]] = [(CL_ORD_ID, cl_ord_id)]
            if known is not None:
                fields += [(SYMBOL, known.symbol), (SIDE, SIDES[known.side])]
            if self._send(ORDER_STATUS_REQUEST, fields) is None:
                # The connection is going: the next logon asks again, from the start.
                self._status_wanted = set()
                return False
        if self._status_task is not None:
            self._status_task.cancel()
        self._status_task = asyncio.get_running_loop().create_task(self._status_deadline())
        return True

    async def _status_deadline(self) -> None:
        await asyncio.sleep(self.status_timeout_s)
        self._finish_status(f"{len(self._status_wanted)} orders unanswered after {self.status_timeout_s} s")

    def _status_answer(self, m: simplefix.FixMessage, cl_ord_id: str, status: wire.ExecStatus | None) -> None:
        if cl_ord_id not in self._status_wanted:
            return
        if status is wire.ExecStatus.REJECTED and "unknown" in text(m, TEXT).lower():
            self._status_unknown.append(cl_ord_id)
        elif status is not None:
            # A field that cannot be read leaves this order unanswered (raised before it is
            # counted as answered): the journal's state stands for it.
            original = self._order(cl_ord_id)
            self._status_orders.append(
                wire.OrderStatus(
                    cl_ord_id=cl_ord_id,
                    symbol=text(m, SYMBOL),
                    side=self._side(m, cl_ord_id),
                    qty=_qty(m, ORDER_QTY) if text(m, ORDER_QTY) or original is None else original.qty,
                    price=_px(m, PRICE) if text(m, PRICE) or original is None else original.price,
                    status=status,
                    cum_qty=_qty(m, CUM_QTY),
                    avg_px=_px(m, AVG_PX),
                )
            )
        self._status_wanted.discard(cl_ord_id)
        if not self._status_wanted:
            self._finish_status("all open orders answered")

    def _finish_status(self, why: str) -> None:
        task, self._status_task = self._status_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        log.info("fix_reconcile", detail=why, answered=len(self._status_orders), unknown=len(self._status_unknown))
        # FIX has no position report here: positions stay as the journal has them (None).
        self.on_status(wire.Status(self._status_orders, self._status_unknown, None, self._wall_ns()))
        self._status_orders, self._status_unknown, self._status_wanted = [], [], set()


def _remember(table: OrderedDict[K, V], key: K, value: V) -> None:
    table[key] = value
    if len(table) > RECENT:
        table.popitem(last=False)


def _qty(m: simplefix.FixMessage, tag: int) -> int:
    """A quantity field as a whole number of shares (0 when absent), read exactly."""
    raw = text(m, tag)
    if not raw:
        return 0
    match = QTY.fullmatch(raw)
    if match is None:
        raise FixFieldError(tag, raw, "not a whole quantity")
    qty = int(match[1])
    if qty > MAX_QTY:
        raise FixFieldError(tag, raw, f"more than {MAX_QTY} shares", 5)
    return qty


def _px(m: simplefix.FixMessage, tag: int) -> float:
    """A price field in plain decimal notation (0.0 when absent)."""
    raw = text(m, tag)
    if not raw:
        return 0.0
    if PX.fullmatch(raw) is None:
        raise FixFieldError(tag, raw, "not a price in decimal notation")
    return float(raw)


def _utc(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y%m%d-%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1_000_000:03d}"


def _price(price: float) -> str:
    return f"{price:.6f}".rstrip("0").rstrip(".")
