"""The FIX gateway: framing, the session layer against a scripted acceptor on 127.0.0.1 (bad
checksums, wrong CompIDs, unknown and unsupported message types, resend requests, test
requests, silence, sequence numbers across restarts), and the whole daemon against the real
QuickFIX acceptors (`executor`, FIX 4.4; `ordermatch`, FIX 4.2), each run in a private network
namespace by tests/fix_scenarios.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import simplefix

from broker import protocol as wire
from broker.fix import FixFrameError, FixFramer, FixGatewayClient, parse, text
from broker.reconnect import Backoff
from daemon.config import BrokerConfig, FixConfig
from tests.helpers import running_rig, wait_for
from tests.test_daemon_loopback import WINDOW, _send_minutes

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peers" / "quickfix-peer.sh"


def fix(
    msg_type: str, seq: int, *fields: tuple[int, object], sender: str = "EXECUTOR", poss_dup: bool = False
) -> bytes:
    m = simplefix.FixMessage()
    m.append_pair(8, "FIX.4.4", header=True)
    m.append_pair(35, msg_type, header=True)
    m.append_pair(49, sender, header=True)
    m.append_pair(56, "TRADINGD", header=True)
    m.append_pair(34, seq, header=True)
    if poss_dup:
        m.append_pair(43, "Y", header=True)
    m.append_utc_timestamp(52, precision=3, header=True)
    for tag, value in fields:
        m.append_pair(tag, value)
    return bytes(m.encode())


def corrupt_checksum(raw: bytes) -> bytes:
    good = int(raw[-4:-1])
    return raw[:-4] + f"{(good + 1) % 256:03d}".encode() + b"\x01"


# -- framing ----------------------------------------------------------------------------------


def test_framer_cuts_messages_by_body_length_across_any_chunking() -> None:
    one, two = fix("0", 2), fix("1", 3, (112, "T-1"))
    stream = one + two
    for cut in range(1, len(stream)):
        framer = FixFramer()
        frames = framer.feed(stream[:cut]) + framer.feed(stream[cut:])
        assert [f.raw for f in frames] == [one, two] and all(f.checksum_ok for f in frames)
    bad = FixFramer().feed(corrupt_checksum(one))
    assert len(bad) == 1 and not bad[0].checksum_ok
    assert text(parse(two), 112) == "T-1"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "expected BeginString"),
        (b"8=FIX.4.4\x0135=0\x01", "BodyLength (9) is not the second field"),
        (b"8=FIX.4.4\x019=abc\x01", "not a number"),
        (b"8=FIX.4.4\x019=3\x0135=0\x0110=000\x01", "does not end at CheckSum"),
        (b"8=FIX.4.4\x019=99999999\x01", "exceeds"),
    ],
)
def test_framer_refuses_what_is_not_fix_naming_why(data: bytes, problem: str) -> None:
    with pytest.raises(FixFrameError, match=re.escape(problem)):
        FixFramer().feed(data)


# -- a scripted acceptor ------------------------------------------------------------------------


class ScriptedAcceptor:
    """A FIX acceptor on 127.0.0.1 that answers Logon and otherwise sends what the test says."""

    def __init__(self, answer_logon: bool = True) -> None:
        self.received: list[simplefix.FixMessage] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.answer_logon = answer_logon
        self.logons = 0
        self.next_seq = 1
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            framer = FixFramer()
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    for frame in framer.feed(data):
                        m = parse(frame.raw)
                        self.received.append(m)
                        if text(m, 35) == "A":
                            self.logons += 1
                            if self.answer_logon:
                                self.send(fix("A", self.next_seq, (98, 0), (108, 1)))

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def send(self, raw: bytes) -> None:
        self.next_seq += 1
        self.writers[-1].write(raw)

    def of_type(self, msg_type: str) -> list[simplefix.FixMessage]:
        return [m for m in self.received if text(m, 35) == msg_type]

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Seen:
    def __init__(self) -> None:
        self.reports: list[wire.ExecReport] = []
        self.events: list[tuple[str, str]] = []


@contextlib.asynccontextmanager
async def session(
    tmp: Path, acceptor_seq: int = 1, **options: Any
) -> AsyncIterator[tuple[ScriptedAcceptor, FixGatewayClient, Seen]]:
    acceptor, seen = ScriptedAcceptor(), Seen()
    acceptor.next_seq = acceptor_seq
    port = await acceptor.start()
    client = FixGatewayClient(
        "127.0.0.1",
        port,
        protocol="fix44",
        sender_comp_id="TRADINGD",
        target_comp_id="EXECUTOR",
        store=tmp / "fix.seq",
        on_report=seen.reports.append,
        on_event=lambda k, d: seen.events.append((k, d)),
        backoff=Backoff(0.02, 0.05),
        heartbeat_s=options.pop("heartbeat_s", 30),
        **options,
    )
    task = asyncio.create_task(client.run())
    try:
        await wait_for(lambda: client.connected, what="logon")
        yield acceptor, client, seen
    finally:
        client.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, 2)
        await acceptor.close()


async def test_a_bad_checksum_is_dropped_and_the_gap_it_leaves_is_asked_for_again(tmp_path: Path) -> None:
    async with session(tmp_path) as (acceptor, client, seen):
        report = fix("8", 2, (37, "O1"), (17, "E1"), (150, "0"), (39, "0"), (11, "X-1"), (55, "AAA"), (54, "1"))
        acceptor.send(corrupt_checksum(report))
        await wait_for(lambda: client.stats.bad_checksum == 1, what="the bad checksum counted")
        assert seen.reports == [] and client.store.next_in == 2  # not processed, number not consumed
        acceptor.send(fix("0", 3))
        await wait_for(lambda: bool(acceptor.of_type("2")), what="ResendRequest")
        (resend,) = acceptor.of_type("2")
        assert (text(resend, 7), text(resend, 16)) == ("2", "0")
        acceptor.send(fix("4", 2, (123, "Y"), (36, 4), poss_dup=True))
        await wait_for(lambda: client.store.next_in == 4, what="the gap filled")
        assert client.connected and ("malformed", "bad checksum") in [(k, d[:12]) for k, d in seen.events]


async def test_a_wrong_comp_id_is_rejected_and_logged_out(tmp_path: Path) -> None:
    async with session(tmp_path) as (acceptor, _, _):
        acceptor.send(fix("0", 2, sender="INTRUDER"))
        await wait_for(lambda: bool(acceptor.of_type("5")), what="Logout")
        (reject,) = acceptor.of_type("3")
        assert text(reject, 373) == "9" and "CompID" in text(reject, 58)
        assert text(reject, 45) == "2"


async def test_unknown_and_unsupported_message_types_are_answered_and_the_session_stays_up(tmp_path: Path) -> None:
    async with session(tmp_path) as (acceptor, client, _):
        acceptor.send(fix("ZZ", 2))
        acceptor.send(fix("B", 3, (148, "headline")))  # News: a real FIX message we do not handle
        await wait_for(lambda: bool(acceptor.of_type("3")) and bool(acceptor.of_type("j")), what="the answers")
        (reject,) = acceptor.of_type("3")
        assert (text(reject, 373), text(reject, 372), text(reject, 45)) == ("11", "ZZ", "2")
        (business,) = acceptor.of_type("j")
        assert (text(business, 380), text(business, 372), text(business, 45)) == ("3", "B", "3")
        assert client.connected and client.store.next_in == 4


async def test_a_resend_request_is_answered_with_a_gap_fill_never_with_orders(tmp_path: Path) -> None:
    async with session(tmp_path) as (acceptor, client, _):
        assert client.send(wire.NewOrder("N-1", "AAA", wire.Side.BUY, 10, 12.5, 0))
        assert client.send(wire.NewOrder("N-2", "AAA", wire.Side.SELL, 10, 12.7, 0))
        await wait_for(lambda: len(acceptor.of_type("D")) == 2, what="two orders")
        acceptor.send(fix("2", 2, (7, 1), (16, 0)))
        await wait_for(lambda: bool(acceptor.of_type("4")), what="the gap fill")
        (gap,) = acceptor.of_type("4")
        assert (text(gap, 34), text(gap, 123), text(gap, 43), text(gap, 36)) == ("1", "Y", "Y", "4")
        assert len(acceptor.of_type("D")) == 2  # nothing resent


async def test_a_test_request_gets_its_heartbeat_and_silence_gets_a_test_request_then_a_drop(tmp_path: Path) -> None:
    async with session(tmp_path, heartbeat_s=1) as (acceptor, _, seen):
        acceptor.send(fix("1", 2, (112, "PING-7")))
        await wait_for(lambda: any(text(m, 112) == "PING-7" for m in acceptor.of_type("0")), what="heartbeat")
        # Now the acceptor says nothing: a TestRequest after 1.2 s, the connection dropped after 2.4 s.
        await wait_for(lambda: bool(acceptor.of_type("1")), timeout=5, what="TestRequest")
        await wait_for(lambda: "disconnected" in [k for k, _ in seen.events], timeout=5, what="the drop")
        await wait_for(lambda: acceptor.logons == 2, timeout=5, what="the relogon")


async def test_a_session_reject_of_an_order_ends_it_rejected_with_the_peers_reason(tmp_path: Path) -> None:
    async with session(tmp_path) as (acceptor, client, seen):
        assert client.send(wire.NewOrder("R-1", "AAA", wire.Side.BUY, 10, 12.5, 0))
        await wait_for(lambda: bool(acceptor.of_type("D")), what="the order")
        order_seq = int(text(acceptor.of_type("D")[0], 34))
        acceptor.send(fix("3", 2, (45, order_seq), (371, 59), (372, "D"), (373, 5), (58, "TimeInForce not allowed")))
        await wait_for(lambda: bool(seen.reports), what="the rejection")
        (report,) = seen.reports
        assert (report.cl_ord_id, report.status, report.text) == (
            "R-1",
            wire.ExecStatus.REJECTED,
            "TimeInForce not allowed",
        )


async def test_a_number_too_low_without_possdup_logs_out_and_a_resent_duplicate_is_ignored(tmp_path: Path) -> None:
    async with session(tmp_path) as (acceptor, client, seen):
        fill = fix("8", 2, (37, "O1"), (17, "E9"), (150, "F"), (39, "2"), (11, "X-1"), (55, "AAA"), (54, "1"),
                   (32, 5), (31, 1.5), (14, 5), (151, 0))  # fmt: skip
        acceptor.send(fill)
        await wait_for(lambda: len(seen.reports) == 1, what="the fill")
        acceptor.send(fix("8", 2, (37, "O1"), (17, "E9"), (150, "F"), (39, "2"), (11, "X-1"), (55, "AAA"),
                          (54, "1"), (32, 5), (31, 1.5), (14, 5), (151, 0), poss_dup=True))  # fmt: skip
        await asyncio.sleep(0.1)
        assert len(seen.reports) == 1 and client.stats.duplicates_ignored == 1
        acceptor.send(fix("0", 2))  # the same number again, not marked as a resend
        await wait_for(lambda: bool(acceptor.of_type("5")), what="Logout")
        assert "MsgSeqNum too low" in text(acceptor.of_type("5")[0], 58)


async def test_sequence_numbers_carry_on_across_client_restarts(tmp_path: Path) -> None:
    async with session(tmp_path) as (acceptor, client, _):
        for i in range(3):
            client.send(wire.NewOrder(f"P-{i}", "AAA", wire.Side.BUY, 1, 1.0, 0))
        await wait_for(lambda: len(acceptor.of_type("D")) == 3, what="orders")
        acceptor.send(fix("0", 2))
        await wait_for(lambda: client.store.next_in == 3, what="heartbeat in")
    assert (tmp_path / "fix.seq").read_text().split() == ["0000000006", "0000000003"]  # Logon, 3 orders, Logout
    async with session(tmp_path, acceptor_seq=3) as (acceptor, _, _):
        (logon,) = acceptor.of_type("A")
        assert text(logon, 34) == "6"


async def test_the_daemon_survives_garbage_from_its_fix_peer_and_logs_on_again(tmp_path: Path) -> None:
    acceptor = ScriptedAcceptor()
    port = await acceptor.start()
    broker = BrokerConfig(protocol="fix44", port=port, reconnect_initial_ms=20, reconnect_max_ms=50, fix=FixConfig())
    try:
        async with running_rig(tmp_path, broker_port=port, broker=broker) as rig:
            acceptor.send(b"this is not FIX at all\x01")
            await wait_for(lambda: acceptor.logons == 2, what="a new logon after the garbage")
            await wait_for(lambda: rig.daemon.runtime.desk.reconciled, what="reconciled again")
            assert rig.daemon.stats.broker_disconnects >= 1
            await _send_minutes(rig, ("AAA", "BBB"), range(WINDOW + 1))
            await wait_for(lambda: rig.daemon.stats.batches >= 2, what="the daemon still trading")
    finally:
        await acceptor.close()


# -- the real QuickFIX acceptors ----------------------------------------------------------------


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def quickfix() -> None:
    if not PEER.is_file():
        pytest.skip(f"{PEER} is absent: no QuickFIX peer to test against")
    if not _namespaces_work():
        pytest.skip("`unshare -n` is not permitted here: the QuickFIX examples bind every interface")
    subprocess.run(["bash", str(PEER), "prepare"], check=True, capture_output=True, timeout=600)


def scenario(name: str, work: Path) -> dict[str, Any]:
    result = subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            f"ip link set lo up && exec {sys.executable} -m tests.fix_scenarios {name} {work}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    facts: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return facts


@pytest.mark.usefixtures("quickfix")
def test_executor_acknowledges_and_fills_the_daemons_orders_over_fix44(tmp_path: Path) -> None:
    facts = scenario("executor_fills", tmp_path)
    assert facts["sent"] > 0 and facts["filled"] == facts["sent"] == facts["fills"]
    assert facts["positions"] and facts["working"] == 0 and facts["reconciled"]
    assert facts["logons"] == 1 and facts["rejects_received"] == 0


@pytest.mark.usefixtures("quickfix")
def test_ordermatch_partly_fills_a_resting_order_then_cancels_it_over_fix42(tmp_path: Path) -> None:
    facts = scenario("ordermatch_partial_then_cancel", tmp_path)
    assert facts["buy_after_cross"] == "partially_filled" and facts["buy_final"] == "canceled"
    assert facts["buy_filled"] == facts["sell_filled"] == 40 and facts["sell_final"] == "filled"
    assert facts["positions"] == {"TDX": 0}
    assert ["B-1", "canceled", 0, 0.0] in facts["reports"]


@pytest.mark.usefixtures("quickfix")
def test_an_order_the_peer_refuses_ends_rejected_with_its_reason(tmp_path: Path) -> None:
    facts = scenario("ordermatch_rejects_gtc", tmp_path)
    assert facts["state"] == "rejected" and facts["reason"] == "Unsupported TIF, use Day"
    assert facts["logged_on_after"]


@pytest.mark.usefixtures("quickfix")
def test_peer_and_daemon_restarts_recover_sequence_numbers_and_send_no_order_twice(tmp_path: Path) -> None:
    facts = scenario("restarts", tmp_path)
    assert facts["sent_before_kill"] > 0 and facts["denied_while_down"] > 0
    assert facts["sent_after_peer_restart"] > facts["sent_before_kill"] and facts["sent_by_second_daemon"] > 0
    # Our numbers carry on across the peer's restart and our own (never back to 1); the peer,
    # which restarts its numbering at each logon, asked for ours and got a gap fill each time.
    seqs = facts["logon_seqs"]
    assert len(seqs) == 3 and seqs[0] == 1 and seqs == sorted(set(seqs))
    assert seqs[2] >= facts["next_out_before_daemon_restart"]
    assert facts["gap_fills_after_restart"] >= 1 and facts["gap_fills_second_daemon"] >= 1
    orders = facts["orders_at_peer"]
    assert len(orders) == len(set(orders)) and sorted(orders) == sorted(facts["sends_journaled"])


@pytest.mark.usefixtures("quickfix")
def test_demo_trades_with_a_fix_acceptor_and_counts_its_acknowledgements_and_fills(tmp_path: Path) -> None:
    facts = scenario("demo_against_executor", tmp_path)
    assert facts["returncode"] == 0, facts
    orders = facts["summary"]["orders"]
    assert orders["sent"] > 0 and orders["acknowledged_by_broker"] == orders["filled"] == orders["sent"]
    assert facts["peer_received_orders"] == orders["sent"] and orders["balanced"]
    assert facts["summary"]["broker"].startswith("fix44 TRADINGD->EXECUTOR")


async def test_open_orders_are_reconciled_by_order_status_request_or_left_to_the_journal(tmp_path: Path) -> None:
    statuses: list[wire.Status] = []
    async with session(tmp_path, status_timeout_s=5.0) as (acceptor, client, _):
        client.on_status = statuses.append
        client.send(wire.NewOrder("W-1", "AAA", wire.Side.BUY, 10, 12.5, 0))
        client.send(wire.StatusRequest(["W-1"], 0))
        await wait_for(lambda: bool(acceptor.of_type("H")), what="OrderStatusRequest")
        (request,) = acceptor.of_type("H")
        assert (text(request, 11), text(request, 55), text(request, 54)) == ("W-1", "AAA", "1")
        acceptor.send(fix("8", 2, (37, "O1"), (17, "S1"), (150, "I"), (39, "1"), (11, "W-1"), (55, "AAA"), (54, "1"),
                          (38, 10), (44, 12.5), (14, 4), (6, 12.5), (151, 6)))  # fmt: skip
        await wait_for(lambda: bool(statuses), what="the status")
        (status,) = statuses
        assert status.positions is None and status.unknown == []
        assert [(o.cl_ord_id, o.status, o.cum_qty, o.avg_px) for o in status.orders] == [
            ("W-1", wire.ExecStatus.PARTIALLY_FILLED, 4, 12.5)
        ]
        # A peer that does not support the request: the journal's state stands, at once.
        client.send(wire.StatusRequest(["W-1"], 0))
        await wait_for(lambda: len(acceptor.of_type("H")) == 2, what="second request")
        acceptor.send(fix("j", 3, (45, 9), (372, "H"), (380, 3), (58, "Unsupported Message Type")))
        await wait_for(lambda: len(statuses) == 2, what="the journal's word")
        assert statuses[1].orders == [] and statuses[1].positions is None


async def test_a_business_reject_of_an_order_rejects_it_and_a_sequence_reset_moves_the_numbers(tmp_path: Path) -> None:
    async with session(tmp_path) as (acceptor, client, seen):
        client.send(wire.NewOrder("J-1", "AAA", wire.Side.SELL, 3, 9.5, 0))
        await wait_for(lambda: bool(acceptor.of_type("D")), what="the order")
        acceptor.send(fix("j", 2, (45, 2), (372, "D"), (379, "J-1"), (380, 2), (58, "Unknown security")))
        await wait_for(lambda: bool(seen.reports), what="the rejection")
        assert (seen.reports[0].cl_ord_id, seen.reports[0].status, seen.reports[0].text) == (
            "J-1",
            wire.ExecStatus.REJECTED,
            "Unknown security",
        )
        acceptor.send(fix("4", 99, (36, 50)))  # reset mode: MsgSeqNum is ignored
        await wait_for(lambda: client.store.next_in == 50, what="the reset")
        acceptor.send(fix("4", 50, (36, 10)))  # a reset backwards is refused
        await wait_for(lambda: bool(acceptor.of_type("3")), what="the refusal")
        assert text(acceptor.of_type("3")[0], 373) == "5" and client.store.next_in == 50


async def test_after_a_restart_a_status_request_names_the_journals_order_in_full(tmp_path: Path) -> None:
    journaled = wire.NewOrder("OLD-1", "BBB", wire.Side.SELL, 7, 21.5, 0)
    known = {journaled.cl_ord_id: journaled}
    async with session(tmp_path, known_order=known.get) as (acceptor, client, _):
        client.send(wire.StatusRequest(["OLD-1"], 0))
        await wait_for(lambda: bool(acceptor.of_type("H")), what="OrderStatusRequest")
        (request,) = acceptor.of_type("H")
        assert (text(request, 11), text(request, 55), text(request, 54)) == ("OLD-1", "BBB", "2")


# -- resend requests, cancels of unknown orders, fields that cannot be read, send's answer ---------


async def test_gap_when_more_messages_arrive_before_its_answer_sends_one_resend_request(tmp_path: Path) -> None:
    async with session(tmp_path) as (acceptor, client, _):
        for seq in (4, 5, 6):  # 2 and 3 were lost: each of these is beyond the gap
            acceptor.send(fix("0", seq))
        await wait_for(lambda: client.stats.received == 4, what="the three heartbeats")  # and the Logon
        # An order after them is a barrier: whatever the client wrote before it has arrived.
        assert client.send(wire.NewOrder("G-1", "AAA", wire.Side.BUY, 1, 1.0, 0))
        await wait_for(lambda: bool(acceptor.of_type("D")), what="the barrier order")
        (resend,) = acceptor.of_type("2")
        assert (text(resend, 7), text(resend, 16)) == ("2", "0")
        acceptor.send(fix("4", 2, (123, "Y"), (36, 7), poss_dup=True))  # the answer: 2-6 filled
        await wait_for(lambda: client.store.next_in == 7, what="the gap filled")
        acceptor.send(fix("0", 7))
        acceptor.send(fix("0", 9))  # a new gap once the first was answered is asked for again
        await wait_for(lambda: len(acceptor.of_type("2")) == 2, what="the second ResendRequest")
        assert text(acceptor.of_type("2")[1], 7) == "8" and client.stats.resend_requests_held == 2


async def test_gap_when_its_answer_stalls_for_a_heartbeat_interval_is_asked_for_again(tmp_path: Path) -> None:
    async with session(tmp_path, heartbeat_s=1) as (acceptor, client, _):
        acceptor.send(fix("0", 3))
        await wait_for(lambda: len(acceptor.of_type("2")) == 1, what="the ResendRequest")
        await asyncio.sleep(1.1)  # no answer comes
        acceptor.send(fix("0", 4))
        await wait_for(lambda: len(acceptor.of_type("2")) == 2, what="the request again")
        assert [text(m, 7) for m in acceptor.of_type("2")] == ["2", "2"] and client.connected


async def test_cancel_when_the_order_is_unknown_is_refused_and_counted_never_sent_with_a_guessed_side(
    tmp_path: Path,
) -> None:
    async with session(tmp_path) as (acceptor, client, seen):
        assert client.send(wire.Cancel("C-9", "GONE-1", "AAA", 0)) is False
        assert client.stats.cancels_refused == 1 and ("cancel_refused", "GONE-1: unknown order") in seen.events
        # A known order's cancel carries the order's own Side and OrderQty.
        assert client.send(wire.NewOrder("K-1", "AAA", wire.Side.SELL, 7, 12.5, 0))
        assert client.send(wire.Cancel("C-1", "K-1", "AAA", 0))
        await wait_for(lambda: bool(acceptor.of_type("F")), what="the known order's cancel")
        (cancel,) = acceptor.of_type("F")
        assert (text(cancel, 41), text(cancel, 11), text(cancel, 54), text(cancel, 38)) == ("K-1", "C-1", "2", "7")


def _fill(seq: int, **override: object) -> bytes:
    """A fill of 10 of order X-1, with fields replaced (by tag, ``t32=...``) or left out (None)."""
    fields: dict[int, object] = {37: "O1", 17: f"E{seq}", 150: "F", 39: "2", 11: "X-1", 55: "AAA", 54: "1"}
    fields |= {32: 10, 31: 1.5, 14: 10, 151: 0}
    for key, value in override.items():
        fields[int(key[1:])] = value
    return fix("8", seq, *((tag, value) for tag, value in fields.items() if value is not None))


@pytest.mark.parametrize(
    ("override", "tag", "reason"),
    [
        ({"t32": "10.5"}, 32, "6"),  # a fraction of a share is not truncated to 10
        ({"t32": "1e3"}, 32, "6"),
        ({"t14": "-5"}, 14, "6"),
        ({"t151": "\u0663"}, 151, "6"),  # an Arabic-Indic three: int() would read it
        ({"t32": "99999999999"}, 32, "5"),  # more shares than any order could hold
        ({"t31": "nan"}, 31, "6"),
        ({"t31": "1e2"}, 31, "6"),
        ({"t54": None}, 54, "5"),  # no Side, and the order is not known here to say which
    ],
)
async def test_execution_report_when_a_field_cannot_be_read_is_rejected_and_counted_never_applied(
    tmp_path: Path, override: dict[str, object], tag: int, reason: str
) -> None:
    async with session(tmp_path) as (acceptor, client, seen):
        acceptor.send(_fill(2, **override))
        await wait_for(lambda: bool(acceptor.of_type("3")), what="the session Reject")
        (reject,) = acceptor.of_type("3")
        refers_to = (text(reject, 45), text(reject, 371), text(reject, 372))  # MsgSeqNum, tag, MsgType
        assert refers_to == ("2", str(tag), "8") and text(reject, 373) == reason
        assert seen.reports == [] and client.stats.malformed_fields == 1
        assert any(kind == "malformed" and f"tag {tag}" in detail for kind, detail in seen.events)
        # The session goes on: the number was consumed, and the same report resent whole applies.
        assert client.connected and client.store.next_in == 3
        acceptor.send(_fill(3, t17="E2"))
        await wait_for(lambda: len(seen.reports) == 1, what="the good report")
        assert (seen.reports[0].last_qty, seen.reports[0].cum_qty) == (10, 10)


async def test_execution_report_when_quantities_are_whole_in_float_form_reads_them_exactly(tmp_path: Path) -> None:
    async with session(tmp_path) as (acceptor, _, seen):
        acceptor.send(_fill(2, t32="25.00", t14="25", t151="0.0", t31="12.125"))
        await wait_for(lambda: bool(seen.reports), what="the report")
        (report,) = seen.reports
        assert (report.last_qty, report.cum_qty, report.leaves_qty, report.last_px) == (25, 25, 0, 12.125)
        assert acceptor.of_type("3") == []


async def test_send_when_the_session_is_logging_out_returns_false_and_writes_nothing(tmp_path: Path) -> None:
    async with session(tmp_path) as (acceptor, client, _):
        client.stop()
        assert client.send(wire.NewOrder("L-1", "AAA", wire.Side.BUY, 1, 1.0, 0)) is False
        assert client.send(wire.StatusRequest(["L-1"], 0)) is False
        await wait_for(lambda: bool(acceptor.of_type("5")), what="the Logout")
        await asyncio.sleep(0.1)
        assert acceptor.of_type("D") == [] and acceptor.of_type("H") == [] and len(acceptor.of_type("5")) == 1


async def test_logon_when_the_peer_never_answers_it_drops_the_connection_and_tries_again(tmp_path: Path) -> None:
    acceptor, seen = ScriptedAcceptor(answer_logon=False), Seen()
    port = await acceptor.start()
    try:
        client = FixGatewayClient(
            "127.0.0.1",
            port,
            protocol="fix44",
            sender_comp_id="TRADINGD",
            target_comp_id="EXECUTOR",
            store=tmp_path / "fix.seq",
            on_report=seen.reports.append,
            on_event=lambda k, d: seen.events.append((k, d)),
            backoff=Backoff(0.02, 0.05),
            logon_timeout_s=0.2,
        )
        task = asyncio.create_task(client.run())
        await wait_for(lambda: acceptor.logons >= 2, timeout=5, what="a second Logon on a new connection")
        kinds = [k for k, _ in seen.events]
        assert "logon_timeout" in kinds and "disconnected" in kinds and not client.connected
        assert len(acceptor.writers) >= 2
        client.stop()
        await asyncio.wait_for(task, 2)
    finally:
        await acceptor.close()


async def test_status_request_when_no_order_is_open_is_answered_only_after_send_returns(tmp_path: Path) -> None:
    """The desk records that it asked when send() returns; an answer inside send() came unasked."""
    statuses: list[wire.Status] = []
    async with session(tmp_path) as (_, client, _):
        client.on_status = statuses.append
        assert client.send(wire.StatusRequest([], 0))
        assert statuses == []
        await wait_for(lambda: bool(statuses), what="the answer")
        (status,) = statuses
        assert status.orders == [] and status.unknown == [] and status.positions is None


def _raw(msg_type: str, seq: bytes, *fields: tuple[int, bytes]) -> bytes:
    m = simplefix.FixMessage()
    m.append_pair(8, "FIX.4.4", header=True)
    m.append_pair(35, msg_type, header=True)
    m.append_pair(49, "EXECUTOR", header=True)
    m.append_pair(56, "TRADINGD", header=True)
    m.append_pair(34, seq, header=True)
    m.append_utc_timestamp(52, precision=3, header=True)
    for tag, value in fields:
        m.append_pair(tag, value)
    return bytes(m.encode())


@pytest.mark.parametrize(
    "garbled",
    [
        lambda seq: fix("2", seq, (7, "abc"), (16, 0)),  # ResendRequest with a BeginSeqNo that is not a number
        lambda seq: _raw("0", "²".encode()),  # a MsgSeqNum that str.isdigit accepts and int refuses
        lambda seq: _raw("4", str(seq).encode(), (36, "²".encode())),  # the same in SequenceReset's NewSeqNo
    ],
    ids=["resend begin", "msg seq num", "new seq no"],
)
async def test_a_garbled_sequence_field_is_rejected_and_never_raises_into_the_loop(
    tmp_path: Path, garbled: Callable[[int], bytes]
) -> None:
    errors: list[object] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context.get("exception")))
    async with session(tmp_path) as (acceptor, client, _):
        rejects = len(acceptor.of_type("3"))
        acceptor.send(garbled(acceptor.next_seq))
        await wait_for(lambda: len(acceptor.of_type("3")) > rejects, what="a session Reject")
        assert errors == [] and client.connected


async def test_a_session_reject_of_another_message_never_rejects_an_order_from_an_earlier_numbering(
    tmp_path: Path,
) -> None:
    async with session(tmp_path, reset_on_logon=True) as (acceptor, client, seen):
        assert client.send(wire.NewOrder("N-1", "AAA", wire.Side.BUY, 10, 12.5, 0))
        await wait_for(lambda: bool(acceptor.of_type("D")), what="order")
        order_seq = int(text(acceptor.of_type("D")[0], 34))
        acceptor.send(
            fix("8", acceptor.next_seq, (37, "O1"), (17, "E1"), (150, "0"), (39, "0"), (11, "N-1"), (55, "AAA"),
                (54, "1"), (14, 0), (151, 10))
        )  # fmt: skip
        await wait_for(lambda: len(seen.reports) == 1, what="ack")
        acceptor.writers[-1].close()  # the connection drops; the numbering restarts at the new logon
        acceptor.next_seq = 1
        await wait_for(lambda: acceptor.logons == 2 and client.connected, what="logon again")
        while client.store.next_out <= order_seq:
            client._send("0", [])  # heartbeats: the old order's number now names one of them
        acceptor.send(fix("3", acceptor.next_seq, (45, order_seq), (372, "0"), (373, 1), (58, "not that heartbeat")))
        await asyncio.sleep(0.3)
        assert [r.status for r in seen.reports] == ["new"]
