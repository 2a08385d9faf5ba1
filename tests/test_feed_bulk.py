"""The msgpack v1 feed decoded a read at a time: msgspec takes a read's frames at once when all
are sound, and anything else goes frame by frame, so what the runtime is handed (and every
rejection's reason, and every frame error) is what decoding frame by frame gives."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker import records as rec
from broker.errors import FrameError
from broker.framing import FrameReader
from broker.journal import Journal, header_format, recover_journal, sealed_segments
from daemon.feed.ingest import FeedProtocol
from daemon.feed.protocol import Bar, Message, UnknownType, decode

T = 1_700_000_040 * 1_000_000_000
LIMIT = 4096


def _bar(n: int, **over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"type": "bar", "seq": n, "symbol": f"S{n % 7}", "ts": T + n, "open": 100.0}
    m.update(high=101.0, low=99.0, close=100.5, volume=10.0)
    m.update(over)
    return m


class Sink:
    """The runtime's side, recording each message (a group of bars as its bars)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_bar(self, bar: Bar, ts: int) -> None:
        self.events.append(("bar", bar))

    def on_bar_group(self, bars: list[Bar], ts: int, values: object = None) -> None:
        self.events += [("bar", b) for b in bars]

    def on_minute_end(self, m: Any, ts: int) -> None:
        self.events.append(("minute_end", m))

    def on_heartbeat(self, m: Any, ts: int) -> None:
        self.events.append(("heartbeat", m))

    def on_rejected(self, r: Any, ts: int) -> None:
        self.events.append(("rejected", r))

    def on_unknown_type(self, m: UnknownType) -> None:
        self.events.append(("unknown", m))

    def on_feed_connected(self, feed: Any) -> None:
        pass

    def on_feed_lost(self) -> None:
        pass

    def on_frame_error(self, e: FrameError) -> None:
        self.events.append(("frame_error", e.reason))

    def on_internal_error(self, exc: BaseException, where: str) -> None:
        raise AssertionError(f"internal error in {where}: {exc!r}")


class Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.aborted


def _fed(reads: list[bytes]) -> tuple[list[tuple[Any, ...]], FeedProtocol]:
    async def feed_them() -> tuple[list[tuple[Any, ...]], FeedProtocol]:
        sink = Sink()
        feed = FeedProtocol(sink, LIMIT, lambda: 0)  # type: ignore[arg-type]
        feed.connection_made(Transport())  # type: ignore[arg-type]
        for data in reads:
            feed.data_received(data)
        return sink.events, feed

    return asyncio.run(feed_them())


def _frame_by_frame(reads: list[bytes]) -> list[tuple[Any, ...]]:
    """What the feed handed on before reads were decoded at once: each frame unpacked by the
    frame reader and decoded on its own, up to the first frame error."""
    reader = FrameReader(LIMIT)
    events: list[tuple[Any, ...]] = []
    kinds = {"Bar": "bar", "MinuteEnd": "minute_end", "Heartbeat": "heartbeat", "Rejected": "rejected"}
    try:
        for data in reads:
            for obj in reader.feed(data):
                message: Message = decode(obj)
                events.append((kinds.get(type(message).__name__, "unknown"), message))
    except FrameError as exc:
        events.append(("frame_error", exc.reason))
    return events


frames = st.one_of(
    st.builds(lambda seq: msgpack.packb(_bar(seq)), st.integers(0, 10**6)),
    st.builds(
        lambda seq, field, value: msgpack.packb(_bar(seq, **{field: value})),
        st.integers(0, 10**6),
        st.sampled_from(("open", "high", "low", "close", "volume", "prev_close", "seq", "ts", "symbol", "note")),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(allow_nan=True, allow_infinity=True),
            st.text(max_size=3),
            st.binary(max_size=3),
        ),
    ),
    st.builds(lambda seq: msgpack.packb({"type": "minute_end", "seq": seq, "ts": T, "count": 3}), st.integers(0, 99)),
    st.builds(lambda seq: msgpack.packb({"type": "heartbeat", "seq": seq, "ts": T}), st.integers(0, 99)),
    st.sampled_from(
        (
            msgpack.packb({"type": "news", "seq": 1}),
            msgpack.packb([1, 2, 3]),
            b"\x81\xa4type\xa2\xff\xfe",  # a string that is not UTF-8
            b"\x81\x81\x01\x01\x01",  # a map as a map key
            b"\xc1",  # a byte msgpack never uses
            b"\xdf\xff\xff\xff\xff",  # a map claiming 4 billion pairs
        )
    ),
)


@example([b"\xdf\xff\xff\xff\xff", b"\xc1"], 2)  # a header past the limit, then a bad byte
@settings(max_examples=300, deadline=None)
@given(st.lists(frames, min_size=1, max_size=12), st.integers(1, 200))
def test_a_feed_decoded_a_read_at_a_time_hands_on_what_frame_by_frame_decoding_does(
    chunks: list[bytes], cut: int
) -> None:
    stream = b"".join(chunks)
    reads = [stream[k : k + cut] for k in range(0, len(stream), cut)]
    events, _feed = _fed(reads)
    assert events == _frame_by_frame(reads)


def test_a_read_of_sound_bars_is_decoded_at_once_and_a_bad_one_sends_the_read_frame_by_frame() -> None:
    clean = b"".join(msgpack.packb(_bar(k)) for k in range(50))
    events, feed = _fed([clean])
    assert len(events) == 50 and feed.reads_one_by_one == 0
    events, feed = _fed([clean + msgpack.packb(_bar(99, close=-1.0))])
    assert feed.reads_one_by_one == 1
    assert events[-1][0] == "rejected" and str(events[-1][1].reason) == "non_positive_price"


def test_a_frame_that_does_not_unpack_ends_the_stream_after_the_bars_before_it() -> None:
    """A string that is not UTF-8 passes the boundary scan; it must still be a frame error (the
    connection dropped and redone), never an exception out of the protocol."""
    events, feed = _fed([msgpack.packb(_bar(1)) + b"\x81\xa4type\xa2\xff\xfe" + msgpack.packb(_bar(2))])
    assert [e[0] for e in events] == ["bar", "frame_error"] and events[1][1] == "not_msgpack"
    assert feed._transport is not None and feed._transport.is_closing()


def test_a_sound_bar_with_an_unknown_field_holding_bad_bytes_is_refused_as_before() -> None:
    extra = b"\xa4note\xa2\xff\xfe"  # "note": a string that is not UTF-8
    body = msgpack.packb(_bar(9))
    frame = bytes([body[0] + 1]) + body[1:] + extra  # one more pair in the map
    assert _fed([frame])[0] == _frame_by_frame([frame]) == [("frame_error", "not_msgpack")]


def test_a_length_header_past_the_limit_is_refused_before_its_bytes_arrive() -> None:
    events, _feed = _fed([msgpack.packb(_bar(1)) + b"\xdd\x00\x10\x00\x00"])
    assert [e[0] for e in events] == ["bar", "frame_error"] and events[1][1] == "oversized_frame"


def test_an_active_segment_an_older_release_began_is_sealed_before_this_release_writes(tmp_path: Path) -> None:
    """An ``orders`` record must never land under a format-2 header: a release rolled back to
    would skip it as unknown, and not know orders working at the broker."""
    path = tmp_path / "journal.msgpack"
    older = msgpack.packb({"kind": "header", "ts": T, "format": 2, "created_by": "tradingd", "segment": 1})
    path.write_bytes(older + msgpack.packb({"kind": "start", "ts": T, "session": 1, "after_fail_stop": False}))
    journal = Journal(path, "batch", wall_ns=T, segment=1)
    journal.append(rec.Send(ts=T, id="X-1"))
    journal.close()
    assert header_format(path) == rec.FORMAT
    ((number, sealed),) = sealed_segments(path)
    assert number == 1 and header_format(sealed) == 2
    records, _ = recover_journal(path)
    assert [type(r).__name__ for r in records] == ["Header", "Send"]
