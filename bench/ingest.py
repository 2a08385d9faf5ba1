"""Ingest rate on one core: bytes off the socket to a symbol waiting for inference.

    python -m bench.ingest [--symbols 5000] [--minutes 20]

Times the daemon's per-bar path in one thread over a prebuilt feed byte stream: msgpack framing
(``FrameReader``), validation (``decode``), the feature window push, the halt rule and the
batcher. Baselines in the same run: the framing alone, and framing plus validation, so each
stage's share is visible. The socket read itself is not in it (a loopback read of 64 KiB moves
hundreds of bars per call).
"""

from __future__ import annotations

import argparse
import time

import msgpack

from broker.framing import FrameReader
from daemon.batcher import Batcher
from daemon.feed.protocol import Bar, bar_map, decode
from daemon.feed.synth import SynthParams, generate
from daemon.windows import FeatureWindows
from engines.chooser import DEFAULT_MODEL
from engines.manifest import load_manifest
from risk.halts import HaltBook, HaltRule

NS = 1_000_000_000
CHUNK = 65536


def _stream(symbols: int, minutes: int) -> tuple[list[str], list[bytes], int]:
    universe = generate(SynthParams(symbols=symbols, minutes=minutes, seed=3))
    names = list(universe)
    packer = msgpack.Packer()
    data = bytearray()
    seq = 0
    for m in range(minutes):
        ts = 1_767_625_200 * NS + m * 60 * NS
        for name in names:
            o, h, lo, c, v = (float(x) for x in universe[name][m])
            seq += 1
            data += packer.pack(bar_map(Bar(seq, name, ts, o, h, lo, c, v)))
    chunks = [bytes(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]
    return names, chunks, seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=5000)
    parser.add_argument("--minutes", type=int, default=20)
    args = parser.parse_args()
    names, chunks, bars = _stream(args.symbols, args.minutes)
    manifest = load_manifest(DEFAULT_MODEL)

    def framing() -> int:
        reader, n = FrameReader(4096), 0
        for chunk in chunks:
            for _ in reader.feed(chunk):
                n += 1
        return n

    def validation() -> int:
        reader, n = FrameReader(4096), 0
        for chunk in chunks:
            for obj in reader.feed(chunk):
                if isinstance(decode(obj), Bar):
                    n += 1
        return n

    def full_path() -> int:
        reader, n = FrameReader(4096), 0
        windows = FeatureWindows(tuple(names), manifest.window, manifest.features)
        halts = HaltBook(HaltRule(), tuple(names))
        batcher = Batcher(len(names), 256, 1_000_000)
        index = windows.index
        for chunk in chunks:
            for obj in reader.feed(chunk):
                bar = decode(obj)
                if not isinstance(bar, Bar):
                    continue
                i = index[bar.symbol]
                if windows.push(i, bar.ts, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.prev_close):
                    halts.on_bar(bar.symbol, bar.ts, bar.open, bar.close, bar.prev_close)
                    if windows.full(i) and batcher.add(i, 0, bar.ts, bar.close):
                        batcher.take()
                    n += 1
        return n

    print(f"{bars} bars ({args.symbols} symbols x {args.minutes} minutes), {sum(map(len, chunks))} bytes, one thread")
    print()
    print("| stage | bars/s | µs per bar |")
    print("|---|---:|---:|")
    for name, fn in (
        ("framing (msgpack)", framing),
        ("+ validation", validation),
        ("+ windows, halts, batcher", full_path),
    ):
        fn()  # warm
        best = min(_timed(fn, bars) for _ in range(3))
        print(f"| {name} | {bars / best:,.0f} | {best / bars * 1e6:.2f} |")


def _timed(fn: object, expected: int) -> float:
    assert callable(fn)
    t = time.perf_counter()
    n = fn()
    elapsed = time.perf_counter() - t
    assert n == expected, (n, expected)
    return elapsed


if __name__ == "__main__":
    main()
