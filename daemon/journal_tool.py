"""``tradingd journal inspect | verify | stats``: how an operator reads the journal.

``inspect`` prints records as JSON lines, filtered by kind, symbol and time; ``verify`` checks
every snapshot's checksum, every segment's records, headers and numbering, and the chain from the
snapshots to the active segment (exit 1 on any problem); ``stats`` counts. All read-only: a torn
tail is reported, never cut (the daemon cuts it at start).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import orjson

from broker.errors import JournalError
from broker.journal import read_snapshot, sealed_segments, snapshots
from broker.records import READS, Header, Record, order_rows


def journal_path(args: argparse.Namespace) -> Path:
    if args.path:
        return Path(args.path)
    from daemon.config import load_config  # noqa: PLC0415

    return Path(load_config(Path(args.config)).journal.path)


def _segments(base: Path) -> list[tuple[str, Path]]:
    out = [(f"{n:06d}", p) for n, p in sealed_segments(base)]
    if base.exists():
        out.append(("active", base))
    return out


def _records(path: Path) -> Iterator[tuple[dict[str, Any] | None, int, int]]:
    """(record map, or None for bytes that are not a record; offset; size) through one file."""
    data = path.read_bytes()
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1 << 20))
    unpacker.feed(data)
    start = 0
    while True:
        try:
            obj = next(unpacker)
        except StopIteration:
            break
        except (msgpack.UnpackException, ValueError, TypeError):
            yield None, start, len(data) - start
            return
        end = unpacker.tell()
        yield (obj if isinstance(obj, dict) else None), start, end - start
        start = end
    if start < len(data):
        yield None, start, len(data) - start  # a torn tail


def _ts(record: dict[str, Any]) -> int:
    ts = record.get("ts", 0)
    return ts if isinstance(ts, int) else 0


def _when(text: str | None) -> int | None:
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise SystemExit(f"tradingd journal: {text!r} is not a time (ISO 8601, or epoch ns)") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1e9)


def _printable(record: dict[str, Any]) -> dict[str, Any]:
    out = dict(record)
    if record.get("kind") == "bars":
        symbols = record.get("symbols") or []
        out = {"kind": "bars", "ts": record.get("ts"), "bars": len(symbols), "symbols": symbols[:20]}
    out["time"] = datetime.fromtimestamp(_ts(record) / 1e9, UTC).isoformat()
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    base = journal_path(args)
    kinds = set(args.kind or ())
    since, until = _when(args.since), _when(args.until)
    symbol_of: dict[str, str] = {}  # order id -> symbol, from intents, so --symbol finds reports too
    out = sys.stdout.buffer
    shown = 0
    for segment, path in _segments(base):
        for record, offset, _ in _records(path):
            if record is None:
                print(f"tradingd journal: {path} at byte {offset}: not a record (torn tail?)", file=sys.stderr)
                break
            # A batch's block of orders is shown order by order (kind "orders", each with its id).
            told = (
                [{"kind": "orders", "ts": record.get("ts"), **row} for row in order_rows(record)]
                if record.get("kind") == "orders"
                else [record]
            )
            for one in told:
                kind, ts = one.get("kind"), _ts(one)
                if kind in ("intent", "orders"):
                    symbol_of[str(one.get("id"))] = str(one.get("symbol"))
                # A block order is an intent and a send at once: either kind shows it.
                if kinds and kind not in kinds and not (kind == "orders" and kinds & {"intent", "send"}):
                    continue
                if (since is not None and ts < since) or (until is not None and ts > until):
                    continue
                if args.symbol:
                    symbol = one.get("symbol") or symbol_of.get(str(one.get("id")))
                    if symbol != args.symbol and not (kind == "bars" and args.symbol in one.get("symbols", ())):
                        continue
                line = _printable(one)
                line["segment"] = segment
                out.write(orjson.dumps(line, default=str) + b"\n")
                shown += 1
                if args.limit and shown >= args.limit:
                    return 0
    return 0


def verify(base: Path) -> list[str]:
    """Every problem found, or none."""
    problems: list[str] = []
    snaps = snapshots(base)
    for number, path in snaps:
        try:
            covered, _ = read_snapshot(path)
            if covered != number:
                problems.append(f"{path}: names segment {covered}")
        except JournalError as exc:
            problems.append(str(exc))
    sealed = sealed_segments(base)
    numbers = [n for n, _ in sealed]
    for a, b in itertools.pairwise(numbers):
        if b != a + 1:
            problems.append(f"segments {a + 1}..{b - 1} are missing between {a} and {b}")
    if snaps and sealed and sealed[0][0] > snaps[0][0] + 1:
        problems.append(f"segment {snaps[0][0] + 1}, needed after snapshot {snaps[0][0]}, is missing")
    last = numbers[-1] if numbers else None
    for segment, path in _segments(base):
        for k, (record, offset, size) in enumerate(_records(path)):
            if record is None:
                where = f"{path}: {size} bytes at {offset} are not a record"
                problems.append(where + (" (a torn tail: cut at the next start)" if segment == "active" else ""))
                break
            try:
                typed: Record = msgspec.convert(record, Record)
            except msgspec.ValidationError as exc:
                problems.append(f"{path}: record {k}: {exc}")
                continue
            if k == 0:
                if not isinstance(typed, Header):
                    problems.append(f"{path}: first record is {record.get('kind')}, not a header")
                elif typed.format not in READS:
                    known = ", ".join(map(str, sorted(READS)))
                    problems.append(f"{path}: format {typed.format}, this build reads {known}")
                elif segment != "active" and typed.segment != int(segment):
                    problems.append(f"{path}: header says segment {typed.segment}")
                elif segment == "active" and last is not None and typed.segment != last + 1:
                    problems.append(f"{path}: active segment {typed.segment} does not follow sealed {last}")
    return problems


def cmd_verify(args: argparse.Namespace) -> int:
    base = journal_path(args)
    if not base.exists() and not sealed_segments(base):
        print(f"tradingd journal: no journal at {base}", file=sys.stderr)
        return 1
    problems = verify(base)
    for problem in problems:
        print(f"problem: {problem}")
    segments = _segments(base)
    print(
        f"{base}: {len(segments)} segments, {len(snapshots(base))} snapshots: "
        + ("ok" if not problems else f"{len(problems)} problems")
    )
    return 0 if not problems else 1


def cmd_stats(args: argparse.Namespace) -> int:
    base = journal_path(args)
    kinds: Counter[str] = Counter()
    first = last = None
    segments = _segments(base)
    for _, path in segments:
        for record, _, _ in _records(path):
            if record is None:
                break
            kinds[str(record.get("kind"))] += 1
            ts = _ts(record)
            if record.get("kind") != "header":
                first = ts if first is None else min(first, ts)
                last = ts if last is None else max(last, ts)
    snaps = snapshots(base)
    after = 0
    newest = snaps[-1][0] if snaps else 0
    for segment, path in segments:
        if segment == "active" or int(segment) > newest:
            after += sum(1 for r, _, _ in _records(path) if r is not None)

    def iso(ts: int | None) -> str | None:
        return None if ts is None else datetime.fromtimestamp(ts / 1e9, UTC).isoformat()

    summary = {
        "journal": str(base),
        "segments": len(segments),
        "segment_bytes": sum(p.stat().st_size for _, p in segments),
        "snapshots": [n for n, _ in snaps],
        "snapshot_bytes": sum(p.stat().st_size for _, p in snaps),
        "records": sum(kinds.values()),
        "records_after_newest_snapshot": after,
        "by_kind": dict(sorted(kinds.items())),
        "first": iso(first),
        "last": iso(last),
    }
    sys.stdout.buffer.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


def add_parser(sub: Any) -> None:
    journal = sub.add_parser("journal", help="read the journal: inspect, verify, stats")
    jsub = journal.add_subparsers(dest="journal_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group(required=True)
    group.add_argument("--path", help="the journal (journal.path: the active segment; the rest lie beside it)")
    group.add_argument("--config", help="read journal.path from this configuration")
    p = jsub.add_parser("inspect", parents=[where], help="records as JSON lines")
    p.add_argument("--kind", action="append", help="only records of this kind (repeatable): intent, send, report, ...")
    p.add_argument("--symbol", help="only records about this symbol (orders by their intent's symbol)")
    p.add_argument("--since", help="from this time (ISO 8601, UTC unless it says, or epoch ns)")
    p.add_argument("--until", help="up to this time")
    p.add_argument("--limit", type=int, default=0, help="stop after this many records")
    p.set_defaults(func=cmd_inspect)
    p = jsub.add_parser("verify", parents=[where], help="checksums, records, headers, the segment chain")
    p.set_defaults(func=cmd_verify)
    p = jsub.add_parser("stats", parents=[where], help="segments, snapshots, records by kind")
    p.set_defaults(func=cmd_stats)
