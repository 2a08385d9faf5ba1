"""DBN decode and validation rate on one core: OHLCV-1m bytes to checked arrays.

    python -m bench.dbn_decode [--symbols 5000] [--minutes 400] [--chunk 65536] [--repeat 5]

Writes the synthetic universe as an OHLCV-1m DBN stream (metadata, one SymbolMappingMsg per
symbol, the records minute by minute, through ``synth.write_dbn_file``), holds its bytes in
memory cut into socket-sized chunks, and times in one thread, best of ``--repeat``:

- ``decode_chunked``: ``DbnDecoder.feed`` over every chunk of records (as ``data_received``
  would), the decoder already past the metadata and mappings (timed apart, once per connection);
- ``decode_whole``: one ``feed`` of all the records;
- ``validate``: ``check_bars`` over the decoded records (the v1 rejection rules, vectorised);
- ``split_minutes``: the per-minute index ranges;
- ``decode_validate_chunked``: feed, ``check_bars`` and ``split_minutes`` per chunk;
- ``decode_columns_chunked``: feed and ``ohlcv_columns`` per chunk: what ingest hands the
  runtime's ``on_bars`` (which then applies the bounds itself).

Prints JSON (records per second per stage, and the machine); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from daemon.feed import dbn
from daemon.feed.protocol import FeedBounds
from daemon.feed.synth import START, SynthParams, generate, write_dbn_file


def _stream(symbols: int, minutes: int) -> bytes:
    universe = generate(SynthParams(symbols=symbols, minutes=minutes, seed=3))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.dbn"
        write_dbn_file(universe, path)
        return path.read_bytes()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _best(setup: Callable[[], object], fn: Callable[[object], int], expected: int, repeat: int) -> float:
    fn(setup())  # warm
    best = float("inf")
    for _ in range(repeat):
        state = setup()
        t = time.perf_counter()
        n = fn(state)
        best = min(best, time.perf_counter() - t)
        if n != expected:
            raise SystemExit(f"counted {n} records, expected {expected}")
    return best


def _primed(prologue: bytes) -> Callable[[], object]:
    def setup() -> dbn.DbnDecoder:
        decoder = dbn.DbnDecoder()
        decoder.feed(prologue)
        return decoder

    return setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=5000)
    parser.add_argument("--minutes", type=int, default=400)
    parser.add_argument("--chunk", type=int, default=65536, help="bytes per feed call (a socket read)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    stream = _stream(args.symbols, args.minutes)
    # The metadata and mapping records come once per connection; the records are the rate.
    _, metadata_end = dbn.read_metadata(stream)
    split = metadata_end + args.symbols * dbn.SYMBOL_MAPPING_DTYPE.itemsize
    prologue, body = stream[:split], stream[split:]
    chunks = [body[i : i + args.chunk] for i in range(0, len(body), args.chunk)]
    records = args.symbols * args.minutes
    bounds = FeedBounds()
    start_ns = int(START.timestamp()) * 1_000_000_000
    now_ns = start_ns + args.minutes * 60_000_000_000
    whole = dbn.DbnDecoder()
    bars = whole.feed(stream).bars
    index = dbn.InstrumentIndex(whole.symbols)  # built once, at start-up, in the daemon
    primed = _primed(prologue)

    def metadata(_: object) -> int:
        decoder = dbn.DbnDecoder()
        decoder.feed(prologue)
        return records if len(decoder.symbols) == args.symbols else -1

    def decode_chunked(decoder: object) -> int:
        assert isinstance(decoder, dbn.DbnDecoder)
        n = 0
        for chunk in chunks:
            n += len(decoder.feed(chunk).bars)
        return n

    def decode_whole(decoder: object) -> int:
        assert isinstance(decoder, dbn.DbnDecoder)
        return len(decoder.feed(body).bars)

    def validate(_: object) -> int:
        accepted, _counts = dbn.check_bars(bars, index, bounds, now_ns, start_ns)
        return int(np.count_nonzero(accepted))

    def split_minutes(_: object) -> int:
        return sum(b - a for a, b in dbn.split_minutes(bars))

    def decode_validate_chunked(decoder: object) -> int:
        assert isinstance(decoder, dbn.DbnDecoder)
        n = 0
        for chunk in chunks:
            out = decoder.feed(chunk)
            accepted, _counts = dbn.check_bars(out.bars, index, bounds, now_ns, start_ns)
            dbn.split_minutes(out.bars)
            n += int(np.count_nonzero(accepted))
        return n

    def decode_columns_chunked(decoder: object) -> int:
        assert isinstance(decoder, dbn.DbnDecoder)
        n = 0
        for chunk in chunks:
            cols = dbn.ohlcv_columns(decoder.feed(chunk).bars, index)
            n += int(np.count_nonzero(cols.codes == 0))
        return n

    stages: dict[str, tuple[Callable[[], object], Callable[[object], int]]] = {
        "decode_chunked": (primed, decode_chunked),
        "decode_whole": (primed, decode_whole),
        "validate": (lambda: None, validate),
        "split_minutes": (lambda: None, split_minutes),
        "decode_validate_chunked": (primed, decode_validate_chunked),
        "decode_columns_chunked": (primed, decode_columns_chunked),
    }
    seconds = {name: _best(setup, fn, records, args.repeat) for name, (setup, fn) in stages.items()}
    metadata_s = _best(lambda: None, metadata, records, args.repeat)
    print(
        json.dumps(
            {
                "bench": "dbn_decode",
                "records": records,
                "symbols": args.symbols,
                "minutes": args.minutes,
                "stream_bytes": len(stream),
                "chunk_bytes": args.chunk,
                "chunks": len(chunks),
                "threads": 1,
                "records_per_s": {name: round(records / s) for name, s in seconds.items()},
                "ns_per_record": {name: round(s / records * 1e9, 2) for name, s in seconds.items()},
                "metadata_and_mappings_ms": round(metadata_s * 1e3, 2),
                "machine": {
                    "nproc": os.cpu_count(),
                    "cpu": _cpu_model(),
                    "python": platform.python_version(),
                    "numpy": np.__version__,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
