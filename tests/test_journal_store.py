"""Journal segments, snapshots and retention: start-up reads the newest good snapshot and only
what follows it; a bad snapshot falls back; a crash between the snapshot and the seal loses
nothing; retention bounds the disk and never drops what a kept snapshot needs. And a restarted
daemon trades on the next minute instead of warming up again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from broker import records as rec
from broker.errors import JournalError
from broker.journal import (
    Journal,
    Retention,
    prune,
    read_journal,
    recover,
    sealed_segments,
    snapshot_path,
    snapshots,
    write_snapshot,
)
from daemon.app import Daemon
from daemon.config import JournalConfig, SignalConfig
from daemon.windows import FeatureWindows
from engines.chooser import DEFAULT_MODEL
from engines.manifest import load_manifest
from tests.helpers import Rig, ScriptedFeed, rig_config, wait_for
from tests.test_daemon_loopback import WINDOW, _send_minutes


def _sends(records: list[rec.Record]) -> list[str]:
    return [r.id for r in records if isinstance(r, rec.Send)]


def _journal_with_snapshots(base: Path, rounds: int) -> Journal:
    """``rounds`` segments of two sends each, a snapshot (body = the segment number) after each."""
    journal = Journal(base, "none")
    for k in range(rounds):
        journal.append(rec.Send(ts=k, id=f"{k}-a"))
        journal.append(rec.Send(ts=k, id=f"{k}-b"))
        journal.sync()
        write_snapshot(base, journal.segment, str(journal.segment).encode(), k)
        journal.rotate(k)
    journal.append(rec.Send(ts=99, id="tail"))
    journal.sync()
    return journal


def test_recover_reads_the_newest_snapshot_and_only_the_segments_after_it(tmp_path: Path) -> None:
    base = tmp_path / "journal.msgpack"
    _journal_with_snapshots(base, 3).close()
    recovery = recover(base)
    assert (recovery.snapshot, recovery.snapshot_segment) == (b"3", 3)
    assert _sends(recovery.records) == ["tail"] and recovery.next_segment == 4
    # Tools still see the whole history that retention kept.
    assert [r["id"] for r in read_journal(base) if r["kind"] == "send"][:2] == ["0-a", "0-b"]


def test_recover_when_the_newest_snapshot_is_corrupt_falls_back_to_the_one_before(tmp_path: Path) -> None:
    base = tmp_path / "journal.msgpack"
    _journal_with_snapshots(base, 3).close()
    newest = snapshot_path(base, 3)
    newest.write_bytes(newest.read_bytes()[:-5] + b"XXXXX")
    recovery = recover(base)
    assert (recovery.snapshot, recovery.snapshot_segment) == (b"2", 2)
    assert _sends(recovery.records) == ["2-a", "2-b", "tail"] and recovery.skipped_snapshots


def test_recover_when_the_process_died_between_snapshot_and_seal_seals_the_covered_segment(tmp_path: Path) -> None:
    base = tmp_path / "journal.msgpack"
    journal = Journal(base, "none")
    journal.append(rec.Send(ts=1, id="covered"))
    journal.sync()
    write_snapshot(base, journal.segment, b"1", 1)  # ... and the process dies before ``rotate``
    journal.close()
    recovery = recover(base)
    assert recovery.snapshot == b"1" and _sends(recovery.records) == [] and recovery.next_segment == 2
    assert not base.exists() and [n for n, _ in sealed_segments(base)] == [1]
    appended = Journal(base, "none", segment=recovery.next_segment)
    appended.append(rec.Send(ts=2, id="after"))
    appended.close()
    assert _sends(recover(base).records) == ["after"]


def test_recover_when_a_snapshot_was_torn_ignores_its_temporary_file(tmp_path: Path) -> None:
    base = tmp_path / "journal.msgpack"
    _journal_with_snapshots(base, 1).close()
    torn = snapshot_path(base, 2).with_name(snapshot_path(base, 2).name + ".tmp")
    torn.write_bytes(b"\x85half a snapshot")
    recovery = recover(base)
    assert recovery.snapshot == b"1" and not torn.exists()


def test_prune_bounds_the_segments_and_keeps_what_the_kept_snapshots_need(tmp_path: Path) -> None:
    base = tmp_path / "journal.msgpack"
    journal = _journal_with_snapshots(base, 30)
    removed = prune(base, Retention(keep_snapshots=2, max_segments=5, max_bytes=1 << 30, max_age_s=1e9))
    journal.close()
    assert removed
    assert [n for n, _ in snapshots(base)] == [29, 30]
    assert [n for n, _ in sealed_segments(base)] == [26, 27, 28, 29, 30]
    # A corrupt newest snapshot still has what the one before it needs.
    snapshot_path(base, 30).write_bytes(b"garbage")
    assert _sends(recover(base).records) == ["29-a", "29-b", "tail"]


def test_resume_when_a_restored_window_is_older_than_the_gap_rule_warms_up_again() -> None:
    manifest = load_manifest(DEFAULT_MODEL)
    windows = FeatureWindows(("AAA", "BBB"), manifest.window, manifest.features)
    for m in range(manifest.window):
        for i in (0, 1):
            windows.push(i, (m + 1) * 60_000_000_000, 100.0, 101.0, 99.0, 100.0, 10.0, None)
    restored = FeatureWindows(("AAA", "BBB"), manifest.window, manifest.features)
    assert restored.load(windows.export()) == [] and restored.restored == {0, 1}
    last = windows.last_ts[0]
    assert restored.resume(0, last + 60_000_000_000, 300_000_000_000) is None and restored.full(0)
    assert restored.resume(1, last + 3600_000_000_000, 300_000_000_000) == 3600_000_000_000
    assert not restored.full(1) and restored.count[1] == 0


async def test_a_restart_trades_on_the_next_minute_without_warming_up(tmp_path: Path) -> None:
    """Killed or stopped, the daemon comes back with its windows: the first minute after the
    restart is inferred (without a snapshot it would take 15 minutes of warm-up)."""
    from broker.sim import BrokerSimulator, SimConfig  # noqa: PLC0415

    symbols = ("AAA", "BBB", "CCC")
    broker = BrokerSimulator(SimConfig())
    broker_port = await broker.start()
    feed = ScriptedFeed()
    feed_port = await feed.start()
    config = rig_config(
        tmp_path,
        feed_port,
        broker_port,
        symbols,
        signal=SignalConfig(confidence_threshold=0.0),
        journal=JournalConfig(path=str(tmp_path / "journal.msgpack"), fsync="none", snapshot_interval_s=3600.0),
    )
    first = Daemon(config)
    try:
        await first.start()
        rig = Rig(first, feed, broker, await feed.next_connection())
        seq = await _send_minutes(rig, symbols, range(WINDOW + 2))
        await wait_for(lambda: first.stats.minute_ends == WINDOW + 2 and first.runtime.idle_event.is_set())
        assert first.stats.batches >= 1
        await first.shutdown(deadline_s=1.0)
        assert [n for n, _ in snapshots(tmp_path / "journal.msgpack")] == [1]

        second = Daemon(config)
        await second.start()
        rig = Rig(second, feed, broker, await feed.next_connection())
        await _send_minutes(rig, symbols, range(WINDOW + 2, WINDOW + 3), seq=seq)
        await wait_for(lambda: second.stats.minute_ends == 1 and second.runtime.idle_event.is_set())
        assert second.stats.batches == 1 and second.stats.batch_rows == len(symbols)
        assert second.stats.bars_warmup == 0
        await second.shutdown(deadline_s=1.0)
    finally:
        await feed.close()
        await broker.close()


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "journal", *args], capture_output=True, text=True, timeout=60
    )


def test_journal_tool_inspects_verifies_and_counts(tmp_path: Path) -> None:
    base = tmp_path / "journal.msgpack"
    journal = _journal_with_snapshots(base, 2)
    wall = 1_700_000_000_000_000_000
    journal.append(rec.Intent(ts=wall, id="X-1", symbol="IBM", side="buy", qty=5, price=10.0, ts_event=wall))
    journal.append(rec.Send(ts=wall + 1, id="X-1"))
    journal.append(rec.Intent(ts=wall + 2, id="X-2", symbol="AIG", side="sell", qty=5, price=10.0, ts_event=wall))
    journal.close()

    shown = [json.loads(line) for line in _tool("inspect", "--path", str(base), "--symbol", "IBM").stdout.splitlines()]
    assert [(r["kind"], r["id"]) for r in shown] == [("intent", "X-1"), ("send", "X-1")]
    sends = _tool("inspect", "--path", str(base), "--kind", "send", "--since", "2023-11-14T22:13:20")
    assert [json.loads(line)["id"] for line in sends.stdout.splitlines()] == ["X-1"]

    verified = _tool("verify", "--path", str(base))
    assert verified.returncode == 0 and "3 segments, 2 snapshots: ok" in verified.stdout
    stats = json.loads(_tool("stats", "--path", str(base)).stdout)
    assert stats["snapshots"] == [1, 2] and stats["by_kind"]["intent"] == 2
    assert stats["records_after_newest_snapshot"] == 5  # header, tail send, intent, send, intent

    newest = snapshot_path(base, 2)
    newest.write_bytes(newest.read_bytes()[:-3] + b"zzz")
    base.write_bytes(base.read_bytes() + b"\x92\x01")  # and a torn tail
    broken = _tool("verify", "--path", str(base))
    assert broken.returncode == 1
    assert "snapshot.000002" in broken.stdout and "torn tail" in broken.stdout


def test_journal_disk_use_after_100000_orders_is_bounded_by_the_retention_policy(tmp_path: Path) -> None:
    base = tmp_path / "journal.msgpack"
    journal = Journal(base, "none")
    retention = Retention(keep_snapshots=2, max_segments=4, max_bytes=1 << 30, max_age_s=1e9)
    peak = 0
    for k in range(100_000):
        oid, ts = f"O-{k}", 1_700_000_000_000_000_000 + k
        journal.append(rec.Intent(ts=ts, id=oid, symbol="AAA", side="buy", qty=1, price=1.0, ts_event=ts))
        journal.append(rec.Send(ts=ts, id=oid))
        journal.append(rec.Report(ts=ts, id=oid, exec_id=f"E{k}", status="filled", last_qty=1, last_px=1.0, cum_qty=1))
        if k % 5000 == 4999:  # as the daemon's checkpoint does: sync, snapshot, seal, prune
            journal.sync()
            write_snapshot(base, journal.segment, b"state", ts)
            journal.rotate(ts)
            prune(base, retention)
            peak = max(peak, sum(p.stat().st_size for p in tmp_path.iterdir()))
    journal.close()
    one_segment = sealed_segments(base)[-1][1].stat().st_size
    assert len(sealed_segments(base)) == 4 and len(snapshots(base)) == 2
    assert peak <= 6 * one_segment  # four sealed segments, the active one, snapshots: not 20 segments' worth


def test_recover_when_a_newer_release_wrote_a_kind_this_one_does_not_know_skips_it(tmp_path: Path) -> None:
    import msgpack  # noqa: PLC0415

    base = tmp_path / "journal.msgpack"
    journal = Journal(base, "none")
    journal.append(rec.Send(ts=1, id="A"))
    journal.close()
    with base.open("ab") as f:
        f.write(msgpack.packb({"kind": "from_the_future", "ts": 2, "whatever": [1, 2]}))
    Journal(base, "none").close()
    appended = Journal(base, "none")
    appended.append(rec.Send(ts=3, id="B"))
    appended.close()
    recovery = recover(base)
    assert _sends(recovery.records) == ["A", "B"] and recovery.unknown_kinds == {"from_the_future": 1}
    base.write_bytes(base.read_bytes() + msgpack.packb({"kind": "send", "ts": "not a number", "id": 5}))
    with pytest.raises(JournalError):
        recover(base)  # a kind it knows that does not decode is not skipped: it stops the start


# -- found by an adversarial review ------------------------------------------------------------


def test_recover_when_a_segment_in_the_chain_is_missing_refuses_instead_of_rebuilding_part_of_it(
    tmp_path: Path,
) -> None:
    base = tmp_path / "journal.msgpack"
    _journal_with_snapshots(base, 4).close()
    for _, path in snapshots(base):
        path.unlink()  # no snapshot to start from: every segment from 1 is needed
    sealed_segments(base)[1][1].unlink()
    with pytest.raises(JournalError, match="segment 2 is missing"):
        recover(base)


def test_recover_when_the_newest_snapshot_cannot_be_taken_falls_back_to_the_one_before(tmp_path: Path) -> None:
    base = tmp_path / "journal.msgpack"
    _journal_with_snapshots(base, 3).close()

    def accept(body: bytes) -> None:
        if body == b"3":
            raise ValueError("snapshot state format 9; this build reads 1")

    recovery = recover(base, accept)
    assert recovery.snapshot == b"2" and _sends(recovery.records) == ["2-a", "2-b", "tail"]
    assert "format 9" in recovery.skipped_snapshots[0]


def _windows() -> FeatureWindows:
    manifest = load_manifest(DEFAULT_MODEL)
    return FeatureWindows(("AAA",), manifest.window, manifest.features)


def _bars(ts: int) -> rec.Bars:
    import numpy as np  # noqa: PLC0415

    return rec.Bars(
        ts=ts,
        symbols=["AAA"],
        bar_ts=np.array([ts], dtype="<i8").tobytes(),
        ohlcv=np.array([[100.0, 101.0, 99.0, 100.0, 10.0]], dtype="<f8").tobytes(),
        prev_close=np.array([float("nan")], dtype="<f8").tobytes(),
    )


def test_restore_replays_the_gap_rule_so_a_window_reset_before_a_crash_stays_reset(tmp_path: Path) -> None:
    from daemon.clock import FakeClock  # noqa: PLC0415
    from daemon.config import Config, UniverseConfig  # noqa: PLC0415
    from daemon.desk import OrderDesk  # noqa: PLC0415
    from daemon.stats import Stats  # noqa: PLC0415

    minute = 60_000_000_000
    full = _windows()
    for m in range(full.window):
        full.push(0, (m + 1) * minute, 100.0, 101.0, 99.0, 100.0, 10.0, None)
    desk = OrderDesk(
        Config(universe=UniverseConfig(symbols=("AAA",))),
        _windows(),
        FakeClock(),
        Journal(tmp_path / "j", "none"),
        Stats(),
    )
    from daemon import snapshot  # noqa: PLC0415

    state = desk.snapshot()
    state = snapshot.State(**{**{f: getattr(state, f) for f in state.__struct_fields__}, "windows": full.export()})
    desk.load(state)
    # The live process after the snapshot: its first bar came a day later and reset the window;
    # then it crashed. The replay must reach the same state.
    late = full.last_ts[0] + 24 * 60 * minute
    desk.restore([rec.Start(ts=late, session=2), _bars(late)])
    assert desk.windows.count[0] == 1 and not desk.windows.full(0)


def test_resume_when_the_first_bar_repeats_the_last_keeps_checking_the_next() -> None:
    windows = _windows()
    for m in range(windows.window):
        windows.push(0, (m + 1) * 60_000_000_000, 100.0, 101.0, 99.0, 100.0, 10.0, None)
    windows.mark_restored()
    last = windows.last_ts[0]
    assert windows.resume(0, last, 300_000_000_000) is None and 0 in windows.restored  # a repeat decides nothing
    assert windows.resume(0, last + 86_400_000_000_000, 300_000_000_000) is not None and windows.count[0] == 0


def test_restore_when_a_halt_names_a_symbol_no_longer_traded_skips_it(tmp_path: Path) -> None:
    from daemon.clock import FakeClock  # noqa: PLC0415
    from daemon.config import Config, UniverseConfig  # noqa: PLC0415
    from daemon.desk import OrderDesk  # noqa: PLC0415
    from daemon.stats import Stats  # noqa: PLC0415

    desk = OrderDesk(
        Config(universe=UniverseConfig(symbols=("AAA",))),
        _windows(),
        FakeClock(),
        Journal(tmp_path / "j", "none"),
        Stats(),
    )
    desk.restore([rec.HaltRecord(ts=1, symbol="GONE", reason="moved", ts_event=1)])
    assert desk.stats.restore_skipped == 1 and desk.halts.halted_symbols() == []


def test_a_snapshot_keeps_the_duplicate_window_across_a_clean_restart(tmp_path: Path) -> None:
    from broker import protocol as wire  # noqa: PLC0415
    from broker.orders import Order  # noqa: PLC0415
    from daemon.clock import FakeClock  # noqa: PLC0415
    from daemon.config import Config, UniverseConfig  # noqa: PLC0415
    from daemon.desk import OrderDesk  # noqa: PLC0415
    from daemon.stats import Stats  # noqa: PLC0415

    clock, config = FakeClock(), Config(universe=UniverseConfig(symbols=("AAA",)))
    first = OrderDesk(config, _windows(), clock, Journal(tmp_path / "a", "none"), Stats())
    order = Order("A-1", "AAA", wire.Side.BUY, 10, 100.0, 0, 0)
    first.risk.remember_send(order, clock.wall_ns())
    second = OrderDesk(config, _windows(), clock, Journal(tmp_path / "b", "none"), Stats())
    second.load(first.snapshot())
    assert second.risk.recent_same() == [("AAA", "buy", 10, 100.0, clock.wall_ns())]


def test_sync_soon_writes_at_once_and_fsyncs_on_the_journal_thread(tmp_path: Path) -> None:
    path = tmp_path / "journal.msgpack"
    journal = Journal(path, "batch")
    journal.append(rec.Send(ts=1, id="halted-before-crash"))
    journal.sync_soon()
    # In the file before anything else happens (a process crash loses nothing)...
    assert [r["id"] for r in read_journal(path) if r["kind"] == "send"] == ["halted-before-crash"]
    flusher = journal._flusher
    assert flusher is not None and flusher.is_alive()
    # ...and a later batch sync, rotation and close still work behind it.
    journal.append(rec.Send(ts=2, id="next-batch"))
    journal.sync()
    journal.rotate(3)
    assert not flusher.is_alive()
    journal.append(rec.Send(ts=4, id="after-rotate"))
    journal.sync_soon()
    journal.close()
    assert journal._flusher is None
    assert [r["id"] for r in read_journal(path) if r["kind"] == "send"] == [
        "halted-before-crash",
        "next-batch",
        "after-rotate",
    ]


def test_sync_soon_when_the_background_fsync_fails_fails_the_journal_and_says_so(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.msgpack", "batch")
    failures: list[JournalError] = []
    told = threading.Event()

    def on_error(error: JournalError) -> None:
        failures.append(error)
        told.set()

    journal.on_background_error = on_error
    # A pipe takes the write and refuses the fsync (EINVAL), as a failing disk would refuse it.
    read_end, write_end = os.pipe()
    real_fd, journal._fd = journal._fd, write_end
    try:
        journal.append(rec.Send(ts=1, id="x"))
        journal.sync_soon()
        assert told.wait(5.0)
        assert "fsync" in str(failures[0])
        with pytest.raises(JournalError):
            journal.append(rec.Send(ts=2, id="y"))  # nothing more is trusted to this journal
        with pytest.raises(JournalError):
            journal.sync()
    finally:
        journal._fd = real_fd
        os.close(read_end)
        os.close(write_end)
        journal.close()


def test_sync_soon_under_fsync_always_or_none_is_sync(tmp_path: Path) -> None:
    for policy in ("always", "none"):
        journal = Journal(tmp_path / f"{policy}.msgpack", policy)
        journal.append(rec.Send(ts=1, id="x"))
        journal.sync_soon()
        assert journal._flusher is None
        assert [r["id"] for r in read_journal(tmp_path / f"{policy}.msgpack") if r["kind"] == "send"] == ["x"]
        journal.close()


def test_sync_waiting_on_the_flushers_fsync_sees_its_failure_and_does_not_pass(tmp_path: Path) -> None:
    """A failed write-back is reported to one fsync of a file only. A batch's sync that overlaps
    the flusher's fsync must learn of the flusher's failure, not fsync again cleanly and let the
    batch's orders leave."""
    journal = Journal(tmp_path / "journal.msgpack", "batch")
    journal.append(rec.Send(ts=1, id="x"))
    outcome: list[BaseException | None] = []
    with journal._fd_lock:  # the flusher, mid-fsync
        batch = threading.Thread(target=lambda: outcome.append(_sync_outcome(journal)))
        batch.start()
        batch.join(0.2)
        assert batch.is_alive()  # the batch's sync waits for the flusher's fsync
        journal.failed = JournalError(str(journal.path), "fsync", OSError(5, "EIO"))  # the flusher's error
    batch.join(5.0)
    assert isinstance(outcome[0], JournalError) and outcome[0].operation == "fsync"
    journal.failed = None
    journal.close()


def _sync_outcome(journal: Journal) -> BaseException | None:
    try:
        journal.sync()
    except JournalError as exc:
        return exc
    return None
