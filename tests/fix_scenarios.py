"""FIX scenarios against the real QuickFIX acceptors, each run in its own private network
namespace (the QuickFIX examples bind every interface): tests/test_fix.py starts

    unshare -n sh -c 'ip link set lo up && exec python -m tests.fix_scenarios NAME WORKDIR'

and this module starts the peer (../shared/peers/quickfix-peer.sh) and the daemon inside it,
drives the scenario, and prints one JSON line of facts for the test to assert on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from broker import protocol as wire
from broker.fix import FixGatewayClient
from broker.journal import read_journal
from broker.orders import Order, OrderBook
from broker.reconnect import Backoff
from daemon.config import BrokerConfig, FixConfig, SignalConfig
from tests.helpers import Rig, running_rig, wait_for
from tests.test_daemon_loopback import WINDOW, _send_minutes

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peers" / "quickfix-peer.sh"
SYMBOLS = ("AAA", "BBB", "CCC")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_messages(work: Path, direction: str = "incoming") -> list[str]:
    """The messages this scenario's peers logged as ``incoming`` (from us) or ``outgoing``, in
    order, from QuickFIX's screen log (their stdout, kept in work/peer-*.log)."""
    out: list[str] = []
    for log in sorted(work.glob("peer-*.log")):
        lines = log.read_text(errors="replace").splitlines()
        for header, body in itertools.pairwise(lines):
            if header.endswith(f", {direction}>") and body.startswith("  (8=FIX"):
                out.append(body.strip()[1:-1])
    return out


def fields_of(raw: str) -> dict[str, str]:
    return dict(f.split("=", 1) for f in raw.split("\x01") if "=" in f)


@contextlib.asynccontextmanager
async def peer(
    program: str, port: int, work: Path, begin: str | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    args = [str(PEER), program, str(port)] + ([begin] if begin else [])
    log = (work / f"peer-{time.monotonic_ns()}-{program}-{port}.log").open("wb")
    proc = await asyncio.create_subprocess_exec("bash", *args, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:  # wait until it accepts
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        log.close()


def broker_config(port: int, protocol: str, target: str, **fix: Any) -> BrokerConfig:
    return BrokerConfig(
        protocol=protocol,  # type: ignore[arg-type]
        port=port,
        reconnect_initial_ms=50,
        reconnect_max_ms=200,
        fix=FixConfig(target_comp_id=target, heartbeat_s=5, **fix),
    )


def gateway(rig: Rig) -> FixGatewayClient:
    g = rig.daemon.gateway
    assert isinstance(g, FixGatewayClient)
    return g


def orders_of(work: Path) -> list[dict[str, Any]]:
    return [r for r in read_journal(work / "journal.msgpack") if r["kind"] in ("send", "report")]


async def executor_fills(work: Path) -> dict[str, Any]:
    """FIX 4.4 against `executor`: orders are acknowledged and filled, positions move."""
    port = free_port()
    async with (
        peer("executor", port, work),
        running_rig(
            work,
            SYMBOLS,
            broker_port=port,
            broker=broker_config(port, "fix44", "EXECUTOR"),
            signal=SignalConfig(confidence_threshold=0.0),
        ) as rig,
    ):
        await _send_minutes(rig, SYMBOLS, range(WINDOW + 4))
        s = rig.daemon.stats
        await wait_for(lambda: s.orders_sent > 0 and s.orders_filled == s.orders_sent, timeout=20, what="fills")
        book = rig.daemon.runtime.book
        g = gateway(rig)
        return {
            "sent": s.orders_sent,
            "filled": s.orders_filled,
            "fills": s.fills,
            "positions": {k: v for k, v in book.positions.items() if v},
            "working": len(book.working),
            "logons": g.stats.logons,
            "rejects_received": g.stats.rejects_received,
            "business_rejects": g.stats.business_rejects_received,
            "reconciled": rig.daemon.runtime.desk.reconciled,
        }


class Desk:
    """The far side of the FIX client for scenarios that drive it by hand: the order book."""

    def __init__(self) -> None:
        self.book = OrderBook()
        self.reports: list[wire.ExecReport] = []
        self.events: list[tuple[str, str]] = []
        self.statuses: list[wire.Status] = []

    def on_report(self, report: wire.ExecReport) -> None:
        self.reports.append(report)
        self.book.apply(report)

    def order(self, client: FixGatewayClient, cl_ord_id: str, side: wire.Side, qty: int, price: float) -> Order:
        order = Order(cl_ord_id, "TDX", side, qty, price, 0, 0)
        self.book.add(order)
        assert client.send(wire.NewOrder(cl_ord_id, "TDX", side, qty, price, time.time_ns()))
        self.book.mark_sent(order, time.monotonic_ns())
        return order


def client(port: int, work: Path, desk: Desk, protocol: str, target: str, **options: Any) -> FixGatewayClient:
    return FixGatewayClient(
        "127.0.0.1",
        port,
        protocol=protocol,
        sender_comp_id="TRADINGD",
        target_comp_id=target,
        store=work / f"fix-{target}.seq",
        on_report=desk.on_report,
        on_event=lambda kind, detail: desk.events.append((kind, detail)),
        on_status=desk.statuses.append,
        backoff=Backoff(0.05, 0.2),
        heartbeat_s=5,
        **options,
    )


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    await wait_for(predicate, timeout=timeout, what=what)


async def ordermatch_partial_then_cancel(work: Path) -> dict[str, Any]:
    """FIX 4.2 against `ordermatch`: a resting buy is partly filled by a crossing sell, then cancelled."""
    port = free_port()
    desk = Desk()
    async with peer("ordermatch", port, work):
        c = client(port, work, desk, "fix42", "ORDERMATCH")
        task = asyncio.create_task(c.run())
        await until(lambda: c.connected, "logon")
        buy = desk.order(c, "B-1", wire.Side.BUY, 100, 10.25)
        await until(lambda: buy.state == "acked", "resting buy acknowledged")
        sell = desk.order(c, "S-1", wire.Side.SELL, 40, 10.25)
        await until(lambda: sell.state == "filled" and buy.filled_qty == 40, "the cross")
        state_after_cross = str(buy.state)
        assert c.send(wire.Cancel("C-1", "B-1", "TDX", time.time_ns()))
        await until(lambda: buy.state == "canceled", "cancel")
        c.stop()
        await asyncio.wait_for(task, 5)
    return {
        "buy_after_cross": state_after_cross,
        "buy_final": str(buy.state),
        "buy_filled": buy.filled_qty,
        "sell_final": str(sell.state),
        "sell_filled": sell.filled_qty,
        "positions": desk.book.positions,
        "reports": [(r.cl_ord_id, str(r.status), r.last_qty, r.last_px) for r in desk.reports],
    }


async def ordermatch_rejects_gtc(work: Path) -> dict[str, Any]:
    """An order the peer refuses (ordermatch takes Day orders only) ends rejected with its reason."""
    port = free_port()
    desk = Desk()
    async with peer("ordermatch", port, work):
        c = client(port, work, desk, "fix42", "ORDERMATCH", time_in_force="gtc")
        task = asyncio.create_task(c.run())
        await until(lambda: c.connected, "logon")
        order = desk.order(c, "G-1", wire.Side.BUY, 10, 10.0)
        await until(lambda: order.state == "rejected", "the peer's refusal")
        still_logged_on = c.connected
        c.stop()
        await asyncio.wait_for(task, 5)
    return {"state": str(order.state), "reason": order.reject_text, "logged_on_after": still_logged_on}


async def demo_against_executor(work: Path) -> dict[str, Any]:
    """`tradingd demo --broker fix44 --broker-port P` trades with the FIX acceptor already there."""
    port = free_port()
    async with peer("executor", port, work):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon", "demo", "--json", "--minutes", "30",
            "--broker", "fix44", "--broker-port", str(port), "--fix-sender", "TRADINGD", "--fix-target", "EXECUTOR",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        peer_orders = [m for m in peer_messages(work) if fields_of(m).get("35") == "D"]
    if proc.returncode != 0:
        return {"returncode": proc.returncode, "stderr": err.decode()[-2000:]}
    summary = json.loads(out)
    return {"returncode": 0, "summary": summary, "peer_received_orders": len(peer_orders)}


async def restarts(work: Path) -> dict[str, Any]:
    """The peer killed mid-session and restarted, then the daemon restarted: it reconnects, the
    sequence numbers recover (ours carry on; the peer, which restarts its own at each logon,
    is brought up to ours with a gap fill), and no order is sent twice."""
    port = free_port()
    broker = broker_config(port, "fix44", "EXECUTOR", accept_peer_reset=True)
    signal_cfg = SignalConfig(confidence_threshold=0.0)
    facts: dict[str, Any] = {}
    minutes = iter(range(10_000))
    seq = 0

    async def trade(rig: Rig, n: int) -> None:
        nonlocal seq
        stats, runtime = rig.daemon.stats, rig.daemon.runtime
        target = stats.minute_ends + n
        seq = await _send_minutes(rig, SYMBOLS, [next(minutes) for _ in range(n)], seq)  # type: ignore[arg-type]
        await wait_for(lambda: stats.minute_ends == target and runtime.idle_event.is_set(), timeout=20, what="minutes")

    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(peer("executor", port, work))
        rig = await stack.enter_async_context(
            running_rig(work, SYMBOLS, broker_port=port, broker=broker, signal=signal_cfg)
        )
        g, s = gateway(rig), rig.daemon.stats
        await trade(rig, WINDOW + 3)
        await wait_for(lambda: s.orders_filled == s.orders_sent > 0, timeout=20, what="fills before the kill")
        facts["sent_before_kill"] = s.orders_sent
        os.killpg(first.pid, signal.SIGKILL)
        await first.wait()
        await wait_for(lambda: not g.connected, timeout=10, what="the loss of the peer")
        # While the broker is away, new signals are denied, never queued for later.
        await trade(rig, 3)
        facts["denied_while_down"] = s.orders_denied.get("broker_disconnected", 0)
        async with peer("executor", port, work):
            await wait_for(lambda: g.connected and rig.daemon.runtime.desk.reconciled, timeout=20, what="relogon")
            await trade(rig, 4)
            await wait_for(lambda: s.orders_filled == s.orders_sent, timeout=20, what="fills after the restart")
            facts["sent_after_peer_restart"] = s.orders_sent
            facts["gap_fills_after_restart"] = g.stats.gap_fills_sent
            facts["logons_first_daemon"] = g.stats.logons
            facts["next_out_before_daemon_restart"] = g.store.next_out
            await rig.daemon.shutdown(deadline_s=2.0)
            async with running_rig(work, SYMBOLS, broker_port=port, broker=broker, signal=signal_cfg) as second:
                g2, s2 = gateway(second), second.daemon.stats
                await trade(second, WINDOW + 3)
                await wait_for(lambda: s2.orders_filled == s2.orders_sent > 0, timeout=20, what="second daemon")
                facts["sent_by_second_daemon"] = s2.orders_sent
                facts["gap_fills_second_daemon"] = g2.stats.gap_fills_sent
    ours = [fields_of(m) for m in peer_messages(work, "incoming")]
    facts["logon_seqs"] = [int(f["34"]) for f in ours if f.get("35") == "A"]
    facts["orders_at_peer"] = [f["11"] for f in ours if f.get("35") == "D"]
    facts["sends_journaled"] = [r["id"] for r in read_journal(work / "journal.msgpack") if r["kind"] == "send"]
    return facts


SCENARIOS: dict[str, Callable[[Path], Any]] = {
    "restarts": restarts,
    "executor_fills": executor_fills,
    "ordermatch_partial_then_cancel": ordermatch_partial_then_cancel,
    "ordermatch_rejects_gtc": ordermatch_rejects_gtc,
    "demo_against_executor": demo_against_executor,
}


def main() -> int:
    name, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    import uvloop  # noqa: PLC0415

    from daemon.logs import configure_logging  # noqa: PLC0415

    configure_logging("info", work / "daemon.log")
    facts = uvloop.run(SCENARIOS[name](work))
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
