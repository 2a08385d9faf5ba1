"""A broker simulator on the native protocol: acknowledges and fills at the limit price.

It is the far side of the order gateway for the demo, the tests and the bench: partial fills,
rejects and latency are configurable, and every order it receives is written to its log as one
JSON line (with its receive time), so what reached the broker can be checked independently.
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
import orjson

from broker import protocol as wire
from broker.errors import FrameError
from broker.framing import FrameReader


@dataclass(frozen=True, slots=True)
class SimConfig:
    latency_us: int = 0
    partial_fills: int = 1  # fills per order: 1 fills at once, N splits it into N parts
    reject_rate: float = 0.0
    seed: int = 0
    max_frame_bytes: int = 65536


@dataclass(slots=True)
class _Working:
    order: wire.NewOrder
    cum_qty: int = 0
    status: wire.ExecStatus = wire.ExecStatus.NEW


class _SimProtocol(asyncio.Protocol):
    def __init__(self, sim: BrokerSimulator) -> None:
        self._sim = sim
        self._reader = FrameReader(sim.config.max_frame_bytes)
        self._transport: asyncio.Transport | None = None
        self._packer = msgpack.Packer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._sim.connections += 1
        self._sim._live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._sim._live.discard(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            for obj in self._reader.feed(data):
                self._sim._handle(self, wire.decode(obj), time.time_ns())
        except FrameError:
            self._sim.malformed += 1
            if self._transport is not None:
                self._transport.abort()

    def send(self, report: wire.ExecReport | wire.Heartbeat | wire.Status) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self._packer.pack(wire.encode(report)))


class BrokerSimulator:
    """Serve the native protocol on ``host:port`` (port 0 picks a free one)."""

    def __init__(self, config: SimConfig, log_path: Path | None = None) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._log: IO[bytes] | None = log_path.open("ab") if log_path else None
        self._working: dict[str, _Working] = {}
        self._exec_seq = 0
        self._server: asyncio.Server | None = None
        self._live: set[_SimProtocol] = set()
        self.positions: dict[str, int] = {}
        self.received: list[wire.NewOrder] = []
        self.connections = 0
        self.malformed = 0
        self.cancels = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _SimProtocol(self), host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and drop every connection at once, as a broker that vanishes would."""
        if self._server is not None:
            self._server.close()
            for conn in list(self._live):
                conn.abort()
            await self._server.wait_closed()
        if self._log is not None:
            self._log.close()

    def _handle(self, conn: _SimProtocol, message: wire.GatewayMessage, ts_recv: int) -> None:
        match message:
            case wire.NewOrder():
                self.received.append(message)
                if self._log is not None:
                    self._log.write(orjson.dumps({"ts_recv": ts_recv, **wire.encode(message)}) + b"\n")
                    self._log.flush()
                self._later(self._on_new, conn, message)
            case wire.Cancel():
                self.cancels += 1
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
            conn.send(self._report(order, wire.ExecStatus.REJECTED, 0, 0, "duplicate cl_ord_id"))
            return
        working = _Working(order)
        self._working[order.cl_ord_id] = working
        if self._rng.random() < self.config.reject_rate:
            working.status = wire.ExecStatus.REJECTED
            conn.send(self._report(order, wire.ExecStatus.REJECTED, 0, 0, "simulated reject"))
            return
        conn.send(self._report(order, wire.ExecStatus.NEW, 0, 0))
        parts = max(1, min(self.config.partial_fills, order.qty))
        base, extra = divmod(order.qty, parts)
        for i in range(parts):
            qty = base + (1 if i < extra else 0)
            working.cum_qty += qty
            done = working.cum_qty == order.qty
            working.status = wire.ExecStatus.FILLED if done else wire.ExecStatus.PARTIALLY_FILLED
            signed = qty if order.side is wire.Side.BUY else -qty
            self.positions[order.symbol] = self.positions.get(order.symbol, 0) + signed
            conn.send(self._report(order, working.status, qty, working.cum_qty))

    def _on_cancel(self, conn: _SimProtocol, cancel: wire.Cancel) -> None:
        working = self._working.get(cancel.orig_cl_ord_id)
        if working is None or working.status not in (wire.ExecStatus.NEW, wire.ExecStatus.PARTIALLY_FILLED):
            return
        working.status = wire.ExecStatus.CANCELED
        conn.send(self._report(working.order, wire.ExecStatus.CANCELED, 0, working.cum_qty, "canceled"))
