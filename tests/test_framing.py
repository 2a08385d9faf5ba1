"""The msgpack stream reader: any chunking yields the same frames; limits and garbage are errors."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import FrameError
from broker.framing import FrameReader

objects = st.lists(
    st.dictionaries(st.text(max_size=10), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=40), max_size=5),
    max_size=30,
)


@given(objects, st.lists(st.integers(1, 64), min_size=1, max_size=50))
def test_feed_when_stream_is_split_anywhere_yields_every_frame_in_order(
    messages: list[object], cuts: list[int]
) -> None:
    data = b"".join(msgpack.packb(m) for m in messages)
    reader = FrameReader(4096)
    out: list[object] = []
    pos, i = 0, 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        out.extend(reader.feed(data[pos : pos + step]))
        pos += step
        i += 1
    assert out == messages


def test_feed_when_frame_exceeds_limit_raises_oversized() -> None:
    reader = FrameReader(256)
    with pytest.raises(FrameError) as err:
        list(reader.feed(msgpack.packb({"symbol": "x" * 300})))
    assert err.value.reason == "oversized_frame"


def test_feed_when_oversized_frame_arrives_in_small_pieces_raises_before_buffering_it_all() -> None:
    reader = FrameReader(256)
    data = msgpack.packb([b"y" * 200, b"z" * 200])
    fed = 0

    def feed_in_pieces() -> None:
        nonlocal fed
        for i in range(0, len(data), 16):
            fed = i + 16
            list(reader.feed(data[i : i + 16]))

    with pytest.raises(FrameError) as err:
        feed_in_pieces()
    assert err.value.reason == "oversized_frame"
    assert fed < len(data)


def test_feed_when_bytes_are_not_msgpack_raises_not_msgpack() -> None:
    reader = FrameReader(256)
    with pytest.raises(FrameError) as err:
        list(reader.feed(b"\xc1\xc1\xc1"))
    assert err.value.reason == "not_msgpack"


def test_feed_when_declared_length_is_huge_raises_once_the_limit_is_passed() -> None:
    reader = FrameReader(256)
    assert list(reader.feed(b"\xdb\xff\xff\xff\xf0abc")) == []  # str32 announcing ~4 GB: waits
    with pytest.raises(FrameError) as err:
        list(reader.feed(b"a" * 300))
    assert err.value.reason == "oversized_frame"
