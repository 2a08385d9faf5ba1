"""DBN as the daemon's feed: real sockets, real ONNX Runtime, the same decisions as msgpack v1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import FeedConfig, SignalConfig
from daemon.feed.dbn import read_bytes
from daemon.feed.synth import SynthParams, generate, symbol_names, write_dbn_file
from tests.helpers import running_rig, wait_for

SYMBOLS, MINUTES = 6, 24


def _tradingd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dbn_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dbn") / "bars.dbn.zst"
    write_dbn_file(generate(SynthParams(symbols=SYMBOLS, minutes=MINUTES, seed=5)), path, compress="zstd")
    return path


def test_demo_when_fed_dbn_decides_exactly_as_over_msgpack(dbn_file: Path) -> None:
    runs = {}
    for feed in ("dbn", "msgpack"):
        result = _tradingd("demo", "--data", str(dbn_file), "--feed", feed, "--json", "--no-metrics")
        assert result.returncode == 0, result.stderr
        runs[feed] = json.loads(result.stdout)
    dbn, v1 = runs["dbn"], runs["msgpack"]
    assert dbn["bars"]["accepted"] == v1["bars"]["accepted"] == SYMBOLS * MINUTES
    assert dbn["minutes"]["received"] == MINUTES  # a minute ends when every symbol has reported it
    assert dbn["signals"] == v1["signals"]
    assert dbn["orders"]["intents"] == v1["orders"]["intents"] and dbn["orders"]["sent"] == v1["orders"]["sent"]


async def test_daemon_when_dbn_arrives_in_odd_chunks_takes_every_bar_then_drops_garbage(
    tmp_path: Path, dbn_file: Path
) -> None:
    data = read_bytes(dbn_file)
    symbols = tuple(symbol_names(SYMBOLS))
    async with running_rig(
        tmp_path,
        symbols,
        feed=FeedConfig(format="dbn", port=0, reconnect_initial_ms=10, reconnect_max_ms=50),
        signal=SignalConfig(confidence_threshold=0.0),
    ) as rig:
        for start in range(0, len(data), 997):  # records and the metadata split across reads
            rig.writer.write(data[start : start + 997])
            await rig.writer.drain()
        s = rig.daemon.stats
        await wait_for(lambda: s.bars_accepted == SYMBOLS * MINUTES, what="every bar")
        await wait_for(lambda: s.minute_ends >= MINUTES - 1, what="the minutes")
        assert s.bars_rejected.total() == 0 and s.batches > 0
        rig.writer.write(b"\x00" * 200)  # a record length of 0: the stream cannot go on
        await rig.writer.drain()
        await wait_for(lambda: s.feed_frame_errors.total() == 1, what="the frame error")
        await rig.feed.next_connection()  # and the daemon reconnects
