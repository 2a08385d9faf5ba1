"""Start-up cost against journal history: records before the newest snapshot must cost nothing.

For each size N it writes a journal of N order records (intent, send, ack, fill per order; 100
symbols) in one of two shapes, then times, in a fresh process, exactly what ``tradingd run`` does
with it before connecting anything: ``recover`` (newest snapshot, segments after it), the desk's
``load`` of the snapshot, ``restore`` of the records after it, ``begin_session``. Reported: that
time (wall clock, ``time.perf_counter``) and the process's peak RSS (``VmHWM``), against an
empty journal measured in the same invocation.

- ``before``: the N records, then a snapshot (taken from the state they build), then 100 more.
- ``after``: a snapshot of an empty state, then the N records after it (the worst case: a
  snapshot interval's worth of records is what a real start-up reads).

    python -m bench.journal_startup [--sizes 10000,1000000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from broker import records as rec
from broker.journal import Journal, recover, write_snapshot

SYMBOLS = tuple(f"S{i:04d}" for i in range(100))
WALL = 1_700_000_000_000_000_000


def _orders(journal: Journal, n_records: int, start: int) -> None:
    for k in range(start, start + n_records // 4):
        oid, symbol, ts = f"B-{k}", SYMBOLS[k % len(SYMBOLS)], WALL + k * 10_000_000  # 100 orders a second
        journal.append(rec.Intent(ts=ts, id=oid, symbol=symbol, side="buy", qty=10, price=100.0, ts_event=ts))
        journal.append(rec.Send(ts=ts, id=oid))
        journal.append(rec.Report(ts=ts, id=oid, exec_id=f"E{k}a", status="new", last_qty=0, last_px=0.0, cum_qty=0))
        journal.append(
            rec.Report(ts=ts, id=oid, exec_id=f"E{k}b", status="filled", last_qty=10, last_px=100.0, cum_qty=10)
        )
        if k % 5000 == 0:
            journal.sync()
    journal.sync()


def _desk(work: Path):  # type: ignore[no-untyped-def]
    from daemon.clock import FakeClock  # noqa: PLC0415
    from daemon.config import Config, UniverseConfig  # noqa: PLC0415
    from daemon.desk import OrderDesk  # noqa: PLC0415
    from daemon.stats import Stats  # noqa: PLC0415
    from daemon.windows import FeatureWindows  # noqa: PLC0415
    from engines.chooser import DEFAULT_MODEL  # noqa: PLC0415
    from engines.manifest import load_manifest  # noqa: PLC0415

    manifest = load_manifest(DEFAULT_MODEL)
    return OrderDesk(
        Config(universe=UniverseConfig(symbols=SYMBOLS)),
        FeatureWindows(SYMBOLS, manifest.window, manifest.features),
        FakeClock(),
        Journal(work / "scratch.msgpack", "none"),
        Stats(),
    )


def build(base: Path, size: int, shape: str) -> None:
    from daemon import snapshot  # noqa: PLC0415

    journal = Journal(base, "none", wall_ns=WALL)
    if shape == "before":
        _orders(journal, size, 0)
        desk = _desk(base.parent)
        recovery = recover(base)
        desk.restore(recovery.records)
    else:
        desk = _desk(base.parent)
    write_snapshot(base, journal.segment, snapshot.encode(desk.snapshot()), WALL)
    journal.rotate(WALL)
    _orders(journal, size if shape == "after" else 100, size)
    journal.close()


def measure(base: Path) -> dict[str, float]:
    """In this (fresh) process: what start-up does with the journal, timed; and peak RSS (VmHWM:
    ``ru_maxrss`` would carry the parent's peak across the exec)."""
    from daemon import snapshot  # noqa: PLC0415

    started = time.perf_counter()
    recovery = recover(base)
    desk = _desk(base.parent)
    if recovery.snapshot is not None:
        desk.load(snapshot.decode(recovery.snapshot))
    desk.restore(recovery.records)
    desk.begin_session()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "records_read": len(recovery.records),
        "rss_mib": _vm_hwm_kib() / 1024,
        "positions": len(desk.book.positions),
    }


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _in_fresh_process(base: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.journal_startup", "--measure", str(base)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty" / "journal.msgpack"
        empty.parent.mkdir()
        Journal(empty, "none").close()
        rows.append(("empty journal", 0, _in_fresh_process(empty)))
        for size in (int(x) for x in args.sizes.split(",")):
            for shape in ("before", "after"):
                base = Path(tmp) / f"{shape}-{size}" / "journal.msgpack"
                base.parent.mkdir()
                t = time.perf_counter()
                build(base, size, shape)
                print(f"built {shape} {size} in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
                rows.append((f"{size:,} records {shape} the snapshot", size, _in_fresh_process(base)))
    print("| journal | records read at start | start-up (s) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|")
    for name, _, r in rows:
        print(f"| {name} | {int(r['records_read']):,} | {r['seconds']:.3f} | {r['rss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
