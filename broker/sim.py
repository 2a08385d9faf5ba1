"""A broker simulator on the native protocol: acknowledges and fills at the limit price.

It is the far side of the order gateway for the demo, the tests and the bench: partial fills,
rejects and latency are configurable, and every order it receives is written to its log as one
JSON line (with its receive time), so what reached the broker can be checked independently.

The log is also its memory: every execution it makes is logged too, and a simulator started on
an existing log rebuilds its orders, positions and every client order id it ever received, so
it refuses a repeated id across its own restarts as a real broker would. ``read_orders`` reads
the orders back.

It can be hostile, as a broker's gateway under fault can be: repeat an execution report
(``duplicate_rate``), deliver an order's reports out of order (``reorder_rate``), or send a
garbled report before the true one (``garble_rate``: an overfill, a ``cum_qty`` that goes
backwards, a negative quantity, another symbol). The truth it logs and its positions are never
garbled.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import msgpack
import msgspec
import orjson

from broker import protocol as wire
from broker.errors import FrameError
from broker.framing import ReadBacklog


@dataclass(frozen=True, slots=True)
class SimConfig:
    latency_us: int = 0
    partial_fills: int = 1  # fills per order: 1 fills at once, N splits it into N parts
    reject_rate: float = 0.0
    seed: int = 0
    max_frame_bytes: int = 65536
    rest: bool = False  # acknowledge and fill nothing: orders rest until cancelled
    fill_resting: bool = False  # at start, fill the orders an earlier life left resting (the market moved)
    duplicate_rate: float = 0.0  # a report sent twice, same ExecID
    reorder_rate: float = 0.0  # two of an order's reports swapped
    garble_rate: float = 0.0  # a contradictory report (fresh ExecID) before the true one


def read_orders(log_path: Path) -> list[dict[str, object]]:
    """Every order the simulator received, in order, from its log (repeats included)."""
    out: list[dict[str, object]] = []
    for line in log_path.read_text().splitlines():
        entry = orjson.loads(line)
        if entry.get("type") == "new_order":
            out.append(entry)
    return out


@dataclass(slots=True)
class _Working:
    order: wire.NewOrder
    cum_qty: int = 0
    status: wire.ExecStatus = wire.ExecStatus.NEW


# Messages handled per turn of the event loop: between turns the loop reads the socket again, so
# a read is stamped when it arrives, not after the simulator's work on the reads before it.
MESSAGES_PER_TURN = 32


class _SimProtocol(asyncio.Protocol):
    def __init__(self, sim: BrokerSimulator) -> None:
        self._sim = sim
        self._reads: ReadBacklog[int] = ReadBacklog(sim.config.max_frame_bytes)
        self._transport: asyncio.Transport | None = None
        self._packer = msgpack.Packer()
        self._scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._sim.connections += 1
        self._sim._live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.handle_what_was_read()  # what arrived before the connection went is received all the same
        self._transport = None
        self._sim._live.discard(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def handle_what_was_read(self) -> None:
        self._work(None)

    def data_received(self, data: bytes) -> None:
        # Received when the bytes were read: once per read, as the daemon stamps its feed (a
        # stamp per message would charge the simulator's own work on the read's earlier
        # messages to the later ones), and handled a slice per turn of the loop.
        self._reads.add(data, time.time_ns())
        if not self._scheduled:
            self._work(MESSAGES_PER_TURN)

    def _work(self, most: int | None) -> None:
        """Handle up to ``most`` messages (None: all that have been read); the rest next turn."""
        self._scheduled = False
        done = 0
        while most is None or done < most:
            try:
                more, obj = self._reads.next()
            except FrameError:
                self._sim.malformed += 1
                if self._transport is not None:
                    self._transport.abort()
                return
            if not more:
                return
            assert self._reads.current_at is not None
            self._sim._handle(self, wire.decode(obj), self._reads.current_at)
            done += 1
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._work, MESSAGES_PER_TURN)

    def send(self, report: wire.ExecReport | wire.Heartbeat | wire.Status) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._packer.pack(wire.encode(report)))


class BrokerSimulator:
    """Serve the native protocol on ``host:port`` (port 0 picks a free one)."""

    def __init__(self, config: SimConfig, log_path: Path | None = None) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._working: dict[str, _Working] = {}
        self._exec_seq = 0
        self._server: asyncio.Server | None = None
        self._live: set[_SimProtocol] = set()
        self.positions: dict[str, int] = {}
        self.received: list[wire.NewOrder] = []
        self.connections = 0
        self.malformed = 0
        self.cancels = 0
        self.cancel_ids: list[str] = []
        self.duplicate_orders = 0  # new orders whose id it had already received (in any life)
        self.hostile = 0  # reports repeated, reordered or garbled
        if log_path is not None and log_path.exists():
            self._remember(log_path)
        self._log: IO[bytes] | None = log_path.open("ab") if log_path else None
        if config.fill_resting:
            self._fill_resting()

    def _fill_resting(self) -> None:
        """Fill, at their limits, the orders an earlier life left working: what the daemon must
        learn by reconciliation, since nobody was connected to hear it."""
        for w in self._working.values():
            if w.status not in (wire.ExecStatus.NEW, wire.ExecStatus.PARTIALLY_FILLED):
                continue
            order, qty = w.order, w.order.qty - w.cum_qty
            w.cum_qty, w.status = order.qty, wire.ExecStatus.FILLED
            signed = qty if order.side is wire.Side.BUY else -qty
            self.positions[order.symbol] = self.positions.get(order.symbol, 0) + signed
            self._write_log(wire.encode(self._report(order, w.status, qty, w.cum_qty)))

    def _remember(self, log_path: Path) -> None:
        """Rebuild orders, executions and positions from an earlier life's log."""
        for line in log_path.read_text().splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a line torn by a kill: the rest of the log stands
            fields = {k: v for k, v in entry.items() if k not in ("type", "ts_recv")}
            match entry.get("type"):
                case "new_order":
                    order = msgspec.convert(fields, wire.NewOrder)
                    self._working.setdefault(order.cl_ord_id, _Working(order))
                case "exec_report":
                    report = msgspec.convert(fields, wire.ExecReport)
                    self._exec_seq = max(self._exec_seq, int(report.exec_id.lstrip("E") or 0))
                    w = self._working.get(report.cl_ord_id)
                    if w is None:
                        continue
                    w.status, w.cum_qty = report.status, report.cum_qty
                    signed = report.last_qty if report.side is wire.Side.BUY else -report.last_qty
                    self.positions[report.symbol] = self.positions.get(report.symbol, 0) + signed

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _SimProtocol(self), host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and drop every connection at once, as a broker that vanishes would."""
        if self._server is not None:
            self._server.close()
            for conn in list(self._live):
                conn.handle_what_was_read()  # read before it vanished: received, as it was read
                conn.abort()
            await self._server.wait_closed()
        if self._log is not None:
            log, self._log = self._log, None  # a report still due after this is not logged
            log.close()

    def _handle(self, conn: _SimProtocol, message: wire.GatewayMessage, ts_recv: int) -> None:
        match message:
            case wire.NewOrder():
                self.received.append(message)
                self._write_log({"ts_recv": ts_recv, **wire.encode(message)})
                self._later(self._on_new, conn, message)
            case wire.Cancel():
                self.cancels += 1
                self.cancel_ids.append(message.cl_ord_id)
                self._later(self._on_cancel, conn, message)
            case wire.Heartbeat():
                conn.send(wire.Heartbeat(ts=time.time_ns()))
            case wire.StatusRequest():
                conn.send(self.status(message.cl_ord_ids))
            case _:
                self.malformed += 1

    def status(self, cl_ord_ids: list[str]) -> wire.Status:
        """Where the asked-about orders stand, which of them were never received, and positions."""
        known, unknown = [], []
        for cl_ord_id in cl_ord_ids:
            w = self._working.get(cl_ord_id)
            if w is None:
                unknown.append(cl_ord_id)
                continue
            o = w.order
            known.append(wire.OrderStatus(o.cl_ord_id, o.symbol, o.side, o.qty, o.price, w.status, w.cum_qty, o.price))
        return wire.Status(orders=known, unknown=unknown, positions=dict(self.positions), ts=time.time_ns())

    def _write_log(self, entry: dict[str, object]) -> None:
        if self._log is not None:
            self._log.write(orjson.dumps(entry) + b"\n")
            self._log.flush()

    def _deliver(self, conn: _SimProtocol, reports: list[wire.ExecReport]) -> None:
        """Log the truth, then send it, as faithfully as the configuration allows."""
        for report in reports:
            self._write_log(wire.encode(report))
        c, rng = self.config, self._rng
        wire_reports = list(reports)
        if c.reorder_rate and len(wire_reports) > 1 and rng.random() < c.reorder_rate:
            i = rng.randrange(len(wire_reports) - 1)
            wire_reports[i], wire_reports[i + 1] = wire_reports[i + 1], wire_reports[i]
            self.hostile += 1
        for report in wire_reports:
            if c.garble_rate and rng.random() < c.garble_rate:
                conn.send(self._garbled(report))
                self.hostile += 1
            conn.send(report)
            if c.duplicate_rate and rng.random() < c.duplicate_rate:
                conn.send(report)
                self.hostile += 1

    def _garbled(self, report: wire.ExecReport) -> wire.ExecReport:
        self._exec_seq += 1
        exec_id = f"E{self._exec_seq}"
        order = self._working[report.cl_ord_id].order
        match self._rng.randrange(4):
            case 0:  # more filled than ordered
                return msgspec.structs.replace(report, exec_id=exec_id, last_qty=order.qty, cum_qty=order.qty + 1)
            case 1:  # cum_qty going backwards
                return msgspec.structs.replace(
                    report, exec_id=exec_id, status=wire.ExecStatus.PARTIALLY_FILLED, last_qty=1, cum_qty=-1
                )
            case 2:  # a negative quantity
                return msgspec.structs.replace(report, exec_id=exec_id, last_qty=-5)
            case _:  # another symbol's fill
                return msgspec.structs.replace(
                    report, exec_id=exec_id, symbol=report.symbol + "X", last_qty=1, cum_qty=min(order.qty, 1)
                )

    def _later(self, fn: Callable[..., None], *args: object) -> None:
        if self.config.latency_us:
            asyncio.get_running_loop().call_later(self.config.latency_us / 1e6, fn, *args)
        else:
            fn(*args)

    def _report(
        self,
        order: wire.NewOrder,
        status: wire.ExecStatus,
        last_qty: int,
        cum_qty: int,
        text: str = "",
    ) -> wire.ExecReport:
        self._exec_seq += 1
        leaves = 0 if status in (wire.ExecStatus.REJECTED, wire.ExecStatus.CANCELED) else order.qty - cum_qty
        return wire.ExecReport(
            cl_ord_id=order.cl_ord_id,
            exec_id=f"E{self._exec_seq}",
            status=status,
            symbol=order.symbol,
            side=order.side,
            last_qty=last_qty,
            last_px=order.price if last_qty else 0.0,
            cum_qty=cum_qty,
            leaves_qty=leaves,
            ts=time.time_ns(),
            text=text,
        )

    def _on_new(self, conn: _SimProtocol, order: wire.NewOrder) -> None:
        if order.cl_ord_id in self._working:
            self.duplicate_orders += 1
            # Not logged as an execution: the original order's record stands.
            conn.send(self._report(order, wire.ExecStatus.REJECTED, 0, 0, "duplicate cl_ord_id"))
            return
        working = _Working(order)
        self._working[order.cl_ord_id] = working
        if self._rng.random() < self.config.reject_rate:
            working.status = wire.ExecStatus.REJECTED
            self._deliver(conn, [self._report(order, wire.ExecStatus.REJECTED, 0, 0, "simulated reject")])
            return
        reports = [self._report(order, wire.ExecStatus.NEW, 0, 0)]
        if self.config.rest:
            self._deliver(conn, reports)
            return
        parts = max(1, min(self.config.partial_fills, order.qty))
        base, extra = divmod(order.qty, parts)
        for i in range(parts):
            qty = base + (1 if i < extra else 0)
            working.cum_qty += qty
            done = working.cum_qty == order.qty
            working.status = wire.ExecStatus.FILLED if done else wire.ExecStatus.PARTIALLY_FILLED
            signed = qty if order.side is wire.Side.BUY else -qty
            self.positions[order.symbol] = self.positions.get(order.symbol, 0) + signed
            reports.append(self._report(order, working.status, qty, working.cum_qty))
        self._deliver(conn, reports)

    def _on_cancel(self, conn: _SimProtocol, cancel: wire.Cancel) -> None:
        working = self._working.get(cancel.orig_cl_ord_id)
        if working is None or working.status not in (wire.ExecStatus.NEW, wire.ExecStatus.PARTIALLY_FILLED):
            return
        working.status = wire.ExecStatus.CANCELED
        self._deliver(conn, [self._report(working.order, wire.ExecStatus.CANCELED, 0, working.cum_qty, "canceled")])
