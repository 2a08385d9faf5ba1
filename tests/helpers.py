"""Test-side peers: a feed server the test scripts byte by byte, and a daemon on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import msgspec

from broker.sim import BrokerSimulator, SimConfig
from daemon.app import Daemon
from daemon.config import (
    AdminConfig,
    BatchConfig,
    BrokerConfig,
    Config,
    EnginesConfig,
    FeedConfig,
    JournalConfig,
    MetricsConfig,
    RiskConfig,
    UniverseConfig,
)
from daemon.sdnotify import Notifier

NS_PER_MIN = 60_000_000_000
T0 = 1_700_000_040_000_000_000


class ScriptedFeed:
    """A feed server on 127.0.0.1 whose connections the test writes to directly."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.append(writer)
            await self.connections.put(writer)

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def next_connection(self, timeout: float = 10.0) -> asyncio.StreamWriter:
        return await asyncio.wait_for(self.connections.get(), timeout)

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def bar(seq: int, symbol: str, minute: int, close: float = 100.0, **override: object) -> dict[str, object]:
    message: dict[str, object] = {
        "type": "bar",
        "seq": seq,
        "symbol": symbol,
        "ts": T0 + minute * NS_PER_MIN,
        "open": close,
        "high": close * 1.001,
        "low": close * 0.999,
        "close": close,
        "volume": 1000.0,
    }
    message.update(override)
    return message


def pack(*messages: object) -> bytes:
    return b"".join(msgpack.packb(m) for m in messages)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@dataclass
class Rig:
    daemon: Daemon
    feed: ScriptedFeed
    broker: BrokerSimulator | None  # None when the rig trades with an external broker
    writer: asyncio.StreamWriter


def rig_config(tmp: Path, feed_port: int, broker_port: int, symbols: tuple[str, ...], **sections: object) -> Config:
    base = {
        "feed": FeedConfig(port=feed_port, max_frame_bytes=1024, reconnect_initial_ms=10, reconnect_max_ms=50),
        "universe": UniverseConfig(symbols=symbols),
        "batch": BatchConfig(max_batch=64, max_delay_us=500),
        "broker": BrokerConfig(port=broker_port, reconnect_initial_ms=10, reconnect_max_ms=50),
        "metrics": MetricsConfig(enabled=False),
        "journal": JournalConfig(path=str(tmp / "journal.msgpack"), fsync="none"),
        "admin": AdminConfig(socket=str(tmp / "admin.sock"), operators=(os.getuid(),)),
        "risk": RiskConfig(clock="feed"),
    }
    base.update(sections)
    feed = base["feed"]
    assert isinstance(feed, FeedConfig)
    base["feed"] = msgspec.structs.replace(feed, port=feed_port)  # the scripted feed's, whatever was given
    # The rigs trade the shipped model, which is not qualified (see test_qualification).
    engines = base.get("engine", EnginesConfig())
    assert isinstance(engines, EnginesConfig)
    base["engine"] = msgspec.structs.replace(engines, allow_unqualified=True)
    return Config(**base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running_rig(
    tmp: Path,
    symbols: tuple[str, ...] = ("AAA", "BBB"),
    sim: SimConfig | None = None,
    notifier: Notifier | None = None,
    broker_port: int | None = None,
    **sections: object,
) -> AsyncIterator[Rig]:
    """Broker simulator (or, with ``broker_port``, a broker already listening there) + scripted
    feed + daemon (real engine) on loopback, torn down after."""
    broker = BrokerSimulator(sim or SimConfig(), tmp / "broker.jsonl") if broker_port is None else None
    feed = ScriptedFeed()
    port = await broker.start() if broker is not None else broker_port
    assert port is not None
    feed_port = await feed.start()
    daemon = Daemon(rig_config(tmp, feed_port, port, symbols, **sections), notifier=notifier)
    try:
        await daemon.start()
        writer = await feed.next_connection()
        yield Rig(daemon, feed, broker, writer)
    finally:
        await daemon.shutdown(deadline_s=2.0)
        await feed.close()
        if broker is not None:
            await broker.close()
