"""DBN codec: round trips with databento-dbn both ways, the reference files, streaming at every
split, the vectorised checks against the v1 path, malformed input, replay and synth."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import databento_dbn as ref
import msgspec
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import FrameError
from daemon.feed import dbn, replay, synth
from daemon.feed.columns import BarColumns, bounds_codes
from daemon.feed.protocol import Bar, FeedBounds, Rejected, RejectReason, check_bar, decode
from tests.conftest import SHARED_DATA

DBN_DIR = SHARED_DATA / "dbn"
REFERENCE_FILES = (
    "test_data.ohlcv-1m.dbn",
    "test_data.ohlcv-1m.v1.dbn.zst",
    "test_data.ohlcv-1m.v2.dbn.zst",
    "test_data.ohlcv-1m.v3.dbn.zst",
)
T0 = 1_767_625_200_000_000_000  # 2026-01-05 15:00 UTC
NS_PER_MIN = 60_000_000_000
I64_MAX = (1 << 63) - 1
U64_MAX = (1 << 64) - 1
AS_IS = ref.VersionUpgradePolicy.AS_IS


def reference_file(name: str) -> Path:
    path = DBN_DIR / name
    if not path.is_file():
        pytest.skip(f"DBN reference file not found at {path} (the shared data folder is absent)")
    return path


# -- the reference decoder's view -----------------------------------------------------------------


def ref_decode(data: bytes, compression: Any = ref.Compression.NONE) -> tuple[Any, list[Any]]:
    decoder = ref.DBNDecoder(upgrade_policy=AS_IS, compression=compression)
    decoder.write(data)
    records = decoder.decode()
    return records[0], records[1:]


def assert_same_metadata(ours: dbn.Metadata, theirs: Any) -> None:
    assert ours.version == theirs.version
    assert ours.dataset == theirs.dataset
    assert (ours.schema.dbn_name if ours.schema is not None else None) == (
        theirs.schema.value if theirs.schema is not None else None
    )
    assert ours.start == theirs.start
    assert ours.end == theirs.end
    assert ours.limit == theirs.limit
    assert (ours.stype_in.name.lower() if ours.stype_in is not None else None) == (
        theirs.stype_in.value if theirs.stype_in is not None else None
    )
    assert ours.stype_out.name.lower() == theirs.stype_out.value
    assert ours.ts_out == theirs.ts_out
    assert ours.symbol_cstr_len == theirs.symbol_cstr_len
    assert list(ours.symbols) == theirs.symbols
    assert list(ours.partial) == theirs.partial
    assert list(ours.not_found) == theirs.not_found
    ours_mappings = {
        m.raw_symbol: [{"start_date": i.start_date, "end_date": i.end_date, "symbol": i.symbol} for i in m.intervals]
        for m in ours.mappings
    }
    assert ours_mappings == theirs.mappings


def assert_same_bars(ours: dbn.OhlcvArray, theirs: Sequence[Any]) -> None:
    assert len(ours) == len(theirs)
    for mine, rec in zip(ours, theirs, strict=True):
        assert int(mine["rtype"]) == int(rec.rtype)
        assert int(mine["length"]) * 4 == rec.record_size()
        for name in ("publisher_id", "instrument_id", "ts_event", "open", "high", "low", "close", "volume"):
            assert int(mine[name]) == getattr(rec, name), name
        if "ts_out" in (ours.dtype.names or ()):
            assert int(mine["ts_out"]) == rec.ts_out


def ohlcv(records: Iterable[tuple[int, int, int, int, int, int, int]], rtype: int = 0x21) -> dbn.OhlcvArray:
    """(instrument_id, ts_event, open, high, low, close, volume) rows as OHLCV records."""
    rows = list(records)
    return (
        dbn.make_ohlcv(*zip(*rows, strict=True), rtype=rtype, publisher_id=1) if rows else np.empty(0, dbn.OHLCV_DTYPE)
    )


def sample_metadata(version: int, **changes: Any) -> dbn.Metadata:
    mappings = (
        dbn.SymbolMapping(
            "AAPL",
            (
                dbn.MappingInterval(dt.date(2026, 1, 5), dt.date(2026, 1, 6), "7"),
                dbn.MappingInterval(dt.date(2026, 1, 6), dt.date(2026, 1, 8), "9"),
            ),
        ),
        dbn.SymbolMapping("MSFT", (dbn.MappingInterval(dt.date(2026, 1, 5), dt.date(2026, 1, 8), "8"),)),
    )
    fields: dict[str, Any] = {
        "version": version,
        "dataset": "XNAS.ITCH",
        "schema": dbn.Schema.OHLCV_1M,
        "start": T0,
        "end": T0 + 3 * 86_400 * 10**9,
        "limit": None,
        "stype_in": dbn.SType.RAW_SYMBOL,
        "stype_out": dbn.SType.INSTRUMENT_ID,
        "ts_out": False,
        "symbol_cstr_len": 22 if version == 1 else 71,
        "symbols": ("AAPL", "MSFT"),
        "partial": ("ZZZ",),
        "not_found": ("NOPE", "GONE"),
        "mappings": mappings,
    }
    fields.update(changes)
    return dbn.Metadata(**fields)


def their_metadata(ours: dbn.Metadata) -> Any:
    return ref.Metadata(
        dataset=ours.dataset,
        start=ours.start,
        stype_in=ref.SType(ours.stype_in.name.lower()) if ours.stype_in is not None else None,
        stype_out=ref.SType(ours.stype_out.name.lower()),
        schema=ref.Schema(ours.schema.dbn_name) if ours.schema is not None else None,
        symbols=list(ours.symbols),
        partial=list(ours.partial),
        not_found=list(ours.not_found),
        mappings=list(ours.mappings),  # the same attributes as its SymbolMapping protocol
        end=ours.end,
        limit=ours.limit,
        ts_out=ours.ts_out,
        version=ours.version,
    )


# -- databento-dbn writes, we read ----------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3])
def test_read_metadata_when_databento_encodes_it_matches_field_by_field(version: int) -> None:
    expected = sample_metadata(version, limit=5)
    data = bytes(their_metadata(expected))
    ours, offset = dbn.read_metadata(data)
    assert offset == len(data)
    assert ours == expected
    assert_same_metadata(ours, ref_decode(data)[0])


@pytest.mark.parametrize("version", [1, 2, 3])
def test_metadata_encode_when_compared_with_databento_is_byte_identical(version: int) -> None:
    ours = sample_metadata(version, limit=5)
    assert ours.encode() == bytes(their_metadata(ours))
    bare = sample_metadata(version, symbols=(), partial=(), not_found=(), mappings=(), end=None, stype_in=None)
    assert bare.encode() == bytes(their_metadata(bare))


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("compress", [None, "zstd"])
def test_read_dbn_when_databento_writes_the_file_reads_every_record(
    tmp_path: Path, version: int, compress: str | None
) -> None:
    metadata = sample_metadata(version)
    if version == 1:
        mapping = ref.SymbolMappingMsgV1(1, 42, T0, "TSLA", "TSLA", T0, T0 + NS_PER_MIN)
    else:
        mapping = ref.SymbolMappingMsg(
            1, 42, T0, ref.SType.RAW_SYMBOL, "TSLA", ref.SType.RAW_SYMBOL, "TSLA", T0, U64_MAX
        )
    theirs = [
        ref.OHLCVMsg(0x21, 1, 7, T0, 100_250_000_000, 101 * 10**9, 99 * 10**9, 100 * 10**9, 1_000),
        ref.OHLCVMsg(0x21, 1, 8, T0, 400 * 10**9, 401 * 10**9, 399 * 10**9, 400_500_000_000, 2_000),
        mapping,
        ref.ErrorMsg(T0, "slow reader") if version > 1 else ref.ErrorMsgV1(T0, "slow reader"),
        ref.OHLCVMsg(0x21, 1, 42, T0 + NS_PER_MIN, 5, 6, 4, 5, U64_MAX),
        ref.OHLCVMsg(0x21, 1, 7, T0 + NS_PER_MIN, 100 * 10**9, 100 * 10**9, 100 * 10**9, 100 * 10**9, 0),
    ]
    data = bytes(their_metadata(metadata)) + b"".join(bytes(r) for r in theirs)
    path = tmp_path / ("f.dbn.zst" if compress else "f.dbn")
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)

    loaded = dbn.read_dbn(path)

    assert loaded.metadata == metadata
    assert_same_bars(loaded.bars, [r for r in theirs if isinstance(r, ref.OHLCVMsg)])
    assert loaded.symbols == {7: "AAPL", 9: "AAPL", 8: "MSFT", 42: "TSLA"}
    assert loaded.skipped == {0x15: 1}  # the error record


def test_decoder_when_databento_writes_ts_out_reads_the_extra_timestamp() -> None:
    metadata = sample_metadata(2, ts_out=True)
    theirs = [
        ref.OHLCVMsg(0x21, 1, 7, T0, 1, 2, 1, 2, 3, ts_out=T0 + 5),
        ref.OHLCVMsg(0x21, 1, 8, T0, 1, 2, 1, 2, 3, ts_out=T0 + 6),
    ]
    decoder = dbn.DbnDecoder()
    out = decoder.feed(bytes(their_metadata(metadata)) + b"".join(bytes(r) for r in theirs))
    assert out.bars.dtype == dbn.OHLCV_TS_OUT_DTYPE
    assert_same_bars(out.bars, theirs)


# -- we write, databento-dbn reads ----------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("compress", [None, "zstd"])
def test_write_dbn_when_databento_reads_the_file_sees_every_field(
    tmp_path: Path, version: int, compress: str | None
) -> None:
    symbols = {3: "SPY", 11: "AIG", 12: "BAC"}
    minutes = [
        ohlcv([(3, T0, 431_250_000_000, 431_5 * 10**8, 431 * 10**9, 431_300_000_000, 1_234_567)]),
        ohlcv(
            [
                (11, T0 + NS_PER_MIN, 50 * 10**9, 51 * 10**9, 49 * 10**9, 50 * 10**9, 10),
                (12, T0 + NS_PER_MIN, 1, 1, 1, 1, 0),
            ]
        ),
    ]
    path = tmp_path / ("out.dbn.zst" if compress else "out.dbn")
    written = dbn.write_dbn(path, minutes, symbols, version=version, compress="zstd" if compress else None)
    assert written == 3

    raw = path.read_bytes()
    assert (raw[:4] == dbn.ZSTD_MAGIC) == bool(compress)
    metadata, records = ref_decode(raw, ref.Compression.ZSTD if compress else ref.Compression.NONE)

    ours = dbn.read_dbn(path)
    assert_same_metadata(ours.metadata, metadata)
    assert metadata.version == version and metadata.schema == ref.Schema.OHLCV_1M
    assert metadata.stype_in == ref.SType.RAW_SYMBOL and metadata.stype_out == ref.SType.INSTRUMENT_ID
    assert metadata.start == T0 and metadata.end == T0 + 2 * NS_PER_MIN
    assert metadata.symbols == ["AIG", "BAC", "SPY"]
    assert metadata.mappings["SPY"] == [
        {"start_date": dt.date(2026, 1, 5), "end_date": dt.date(2026, 1, 6), "symbol": "3"}
    ]
    mappings = [r for r in records if not isinstance(r, ref.OHLCVMsg)]
    mapping_type = ref.SymbolMappingMsgV1 if version == 1 else ref.SymbolMappingMsg
    assert all(isinstance(m, mapping_type) for m in mappings)
    assert {m.instrument_id: (m.stype_in_symbol, m.stype_out_symbol) for m in mappings} == {
        i: (s, s) for i, s in symbols.items()
    }
    assert all((m.start_ts, m.end_ts) == (T0, T0 + 2 * NS_PER_MIN) for m in mappings)
    assert_same_bars(np.concatenate(minutes), [r for r in records if isinstance(r, ref.OHLCVMsg)])
    assert ours.symbols == symbols


def test_write_dbn_when_a_record_has_no_symbol_names_the_instrument(tmp_path: Path) -> None:
    with pytest.raises(dbn.DbnEncodeError, match=r"\[5\]"):
        dbn.write_dbn(tmp_path / "x.dbn", ohlcv([(5, T0, 1, 1, 1, 1, 1)]), {6: "X"})


def test_write_dbn_when_records_are_not_ohlcv_1m_refuses(tmp_path: Path) -> None:
    with pytest.raises(dbn.DbnEncodeError, match="OHLCV-1m"):
        dbn.write_dbn(tmp_path / "x.dbn", ohlcv([(5, T0, 1, 1, 1, 1, 1)], rtype=0x22), {5: "X"})


def test_write_dbn_when_a_symbol_is_too_long_for_v1_names_it(tmp_path: Path) -> None:
    with pytest.raises(dbn.DbnEncodeError, match="longer than 21"):
        dbn.write_dbn(tmp_path / "x.dbn", ohlcv([(5, T0, 1, 1, 1, 1, 1)]), {5: "X" * 30}, version=1)


# -- the reference files --------------------------------------------------------------------------


@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_reference_file_when_read_by_both_decoders_matches_field_by_field(name: str) -> None:
    path = reference_file(name)
    ours = dbn.read_dbn(path)
    metadata, records = ref_decode(dbn.read_bytes(path))
    assert_same_metadata(ours.metadata, metadata)
    assert_same_bars(ours.bars, records)
    assert ours.symbols == {5482: "ESH1"}
    assert ours.skipped == {}
    expected_version = int(name.split(".v")[1][0]) if ".v" in name else 2
    assert ours.metadata.version == expected_version


def test_reference_file_when_compressed_is_detected_by_magic_not_name(tmp_path: Path) -> None:
    renamed = tmp_path / "no_suffix"
    renamed.write_bytes(reference_file("test_data.ohlcv-1m.v3.dbn.zst").read_bytes())
    assert len(dbn.read_dbn(renamed).bars) == 2


def test_load_dbn_when_reading_a_reference_file_gives_minutes_by_close() -> None:
    minutes = replay.load_dbn(reference_file("test_data.ohlcv-1m.v3.dbn.zst"))
    first = 1_609_160_400_000_000_000  # 2020-12-28 13:00 UTC, the first bar's start
    assert [m.ts for m in minutes] == [first + NS_PER_MIN, first + 2 * NS_PER_MIN]
    assert minutes[0].bars == (Bar(1, "ESH1", first + NS_PER_MIN, 372025.0, 372150.0, 372025.0, 372100.0, 353.0, None),)
    assert minutes[1].bars[0].seq == 3  # seq 2 is the first minute's minute_end, as load_csv numbers


# -- streaming --------------------------------------------------------------------------------------


def _mixed_stream() -> bytes:
    """v2 metadata of odd length (records start unaligned), mappings, OHLCV runs and an unknown record."""
    metadata = sample_metadata(2, symbols=("AAPL",), partial=(), not_found=())
    bars1 = ohlcv([(7, T0, 10, 12, 9, 11, 100), (8, T0, 20, 22, 19, 21, 200), (9, T0, 30, 32, 29, 31, 300)])
    bars2 = ohlcv([(7, T0 + NS_PER_MIN, 11, 13, 10, 12, 101), (42, T0 + NS_PER_MIN, 5, 5, 5, 5, 5)])
    return (
        metadata.encode()
        + dbn.symbol_mapping_records({42: "TSLA"}, 2, T0, None)
        + bars1.tobytes()
        + bytes(ref.ErrorMsg(T0, "x"))
        + bytes(ref.SymbolMappingMsgV1(1, 43, T0, "F", "F", T0, T0))
        + bars2.tobytes()
    )


def _decode_in_pieces(data: bytes, cuts: Sequence[int]) -> tuple[bytes, dict[int, str], dict[int, int], int]:
    decoder = dbn.DbnDecoder()
    parts, mappings = [], {}
    edges = [0, *cuts, len(data)]
    for a, b in itertools.pairwise(edges):
        out = decoder.feed(data[a:b])
        parts.append(out.bars.tobytes())
        mappings.update(out.mappings)
    decoder.finish()
    assert mappings == decoder.symbols
    return b"".join(parts), decoder.symbols, dict(decoder.skipped), decoder.records


def test_decoder_when_the_stream_is_split_at_every_byte_offset_gives_identical_output() -> None:
    data = _mixed_stream()
    whole = _decode_in_pieces(data, [])
    assert whole[1] == {7: "AAPL", 9: "AAPL", 8: "MSFT", 42: "TSLA", 43: "F"}
    assert whole[2] == {0x15: 1} and whole[3] == 5
    for cut in range(len(data) + 1):
        assert _decode_in_pieces(data, [cut]) == whole, cut


def test_decoder_when_fed_one_byte_at_a_time_gives_identical_output() -> None:
    data = _mixed_stream()
    assert _decode_in_pieces(data, range(1, len(data))) == _decode_in_pieces(data, [])


@given(st.lists(st.integers(min_value=0, max_value=1_000), max_size=8))
def test_decoder_when_split_anywhere_gives_identical_output(cuts: list[int]) -> None:
    data = _mixed_stream()
    points = sorted({c % (len(data) + 1) for c in cuts})
    assert _decode_in_pieces(data, points) == _decode_in_pieces(data, [])


def test_decoder_when_a_chunk_holds_only_ohlcv_returns_a_view_over_it() -> None:
    metadata = sample_metadata(3)
    decoder = dbn.DbnDecoder()
    decoder.feed(metadata.encode())
    chunk = ohlcv([(7, T0 + i * NS_PER_MIN, 1, 2, 1, 2, i) for i in range(100)]).tobytes()
    out = decoder.feed(chunk)
    assert len(out.bars) == 100
    assert np.shares_memory(out.bars, np.frombuffer(chunk, np.uint8))
    assert not out.bars.flags.writeable
    assert decoder.pending == 0


def test_decoder_when_other_records_interleave_long_runs_returns_every_bar_in_order() -> None:
    """Runs shorter and longer than the scan's growing windows, cut by heartbeats, in one buffer."""
    bars = ohlcv([(7, T0 + i * NS_PER_MIN, 1, 2, 1, 2, i) for i in range(5_000)])
    heartbeat = bytes(ref.SystemMsg(T0, "hb"))
    cuts = [0, 1, 2, 300, 301, 2_600, 4_999, 5_000]
    data = sample_metadata(3).encode() + b"".join(bars[a:b].tobytes() + heartbeat for a, b in itertools.pairwise(cuts))
    decoder = dbn.DbnDecoder()
    out = decoder.feed(data)
    decoder.finish()
    assert out.bars.tobytes() == bars.tobytes()
    assert decoder.skipped == {0x17: len(cuts) - 1}


def test_decoder_when_a_record_is_split_keeps_the_tail_for_the_next_chunk() -> None:
    decoder = dbn.DbnDecoder()
    data = sample_metadata(3).encode() + ohlcv([(7, T0, 1, 2, 1, 2, 3), (8, T0, 1, 2, 1, 2, 3)]).tobytes()
    assert len(decoder.feed(data[:-10]).bars) == 1
    assert decoder.pending == 46
    with pytest.raises(dbn.DbnDecodeError) as exc:
        decoder.finish()
    assert exc.value.problem is dbn.DbnProblem.TRUNCATED_RECORD
    assert len(decoder.feed(data[-10:]).bars) == 1
    decoder.finish()


# -- malformed input --------------------------------------------------------------------------------


def _problem(data: bytes) -> dbn.DbnProblem:
    def feed_to_the_end() -> None:
        decoder = dbn.DbnDecoder()
        decoder.feed(data)
        decoder.finish()

    with pytest.raises(dbn.DbnDecodeError) as exc:
        feed_to_the_end()
    assert isinstance(exc.value, FrameError)  # so ingest's drop-the-connection path applies
    return exc.value.problem


def _good() -> bytes:
    return sample_metadata(3).encode()


def test_decoder_when_magic_is_wrong_raises_bad_magic() -> None:
    assert _problem(b"MSG\x03" + _good()[4:]) is dbn.DbnProblem.BAD_MAGIC
    assert _problem(b"\x82\xa4type") is dbn.DbnProblem.BAD_MAGIC  # msgpack on a DBN feed, found at once


def test_decoder_when_fed_zstd_bytes_says_to_decompress_first() -> None:
    decoder = dbn.DbnDecoder()
    with pytest.raises(dbn.DbnDecodeError, match="zstd"):
        decoder.feed(zstandard.ZstdCompressor().compress(_good()))


@pytest.mark.parametrize("version", [0, 4, 255])
def test_decoder_when_version_is_unknown_names_it(version: int) -> None:
    data = _good()
    decoder = dbn.DbnDecoder()
    with pytest.raises(dbn.DbnDecodeError, match=f"version {version}") as exc:
        decoder.feed(data[:3] + bytes((version,)) + data[4:])
    assert exc.value.problem is dbn.DbnProblem.UNSUPPORTED_VERSION


def test_read_metadata_when_truncated_raises_truncated_metadata() -> None:
    data = _good()
    for cut in (0, 5, 8, 50, len(data) - 1):
        with pytest.raises(dbn.DbnDecodeError) as exc:
            dbn.read_metadata(data[:cut])
        assert exc.value.problem is dbn.DbnProblem.TRUNCATED_METADATA
        assert _problem(data[:cut]) is dbn.DbnProblem.TRUNCATED_METADATA


def test_read_metadata_when_schema_is_unknown_names_it() -> None:
    data = bytearray(_good())
    data[24:26] = (77).to_bytes(2, "little")
    with pytest.raises(dbn.DbnDecodeError, match="unknown schema 77") as exc:
        dbn.read_metadata(bytes(data))
    assert exc.value.problem is dbn.DbnProblem.UNSUPPORTED_SCHEMA


def test_decoder_when_schema_is_not_ohlcv_names_it() -> None:
    data = sample_metadata(3, schema=dbn.Schema.MBO).encode()
    with pytest.raises(dbn.DbnDecodeError, match="schema mbo is not an OHLCV schema"):
        dbn.DbnDecoder().feed(data)
    assert dbn.DbnDecoder(require_ohlcv=False).feed(data).bars.size == 0


def test_read_metadata_when_counts_run_past_its_length_raises_bad_metadata() -> None:
    data = bytearray(sample_metadata(3, symbols=(), partial=(), not_found=(), mappings=()).encode())
    symbols_count_at = 8 + 100 + 4  # after the fixed part and schema_definition_length
    data[symbols_count_at : symbols_count_at + 4] = (1_000_000).to_bytes(4, "little")
    with pytest.raises(dbn.DbnDecodeError, match="1000000 symbols do not fit") as exc:
        dbn.read_metadata(bytes(data))
    assert exc.value.problem is dbn.DbnProblem.BAD_METADATA


def test_read_metadata_when_declared_length_is_under_the_fixed_part_raises_bad_metadata() -> None:
    data = bytearray(_good())
    data[4:8] = (20).to_bytes(4, "little")
    assert _problem(bytes(data)) is dbn.DbnProblem.BAD_METADATA


def test_decoder_when_metadata_is_over_the_limit_raises_before_buffering_it() -> None:
    decoder = dbn.DbnDecoder(max_metadata_bytes=1000)
    data = bytearray(_good())
    data[4:8] = (1 << 30).to_bytes(4, "little")
    with pytest.raises(dbn.DbnDecodeError) as exc:
        decoder.feed(bytes(data[:8]))
    assert exc.value.problem is dbn.DbnProblem.METADATA_TOO_LARGE


def test_decoder_when_a_record_length_is_zero_raises_bad_record_length() -> None:
    record = bytearray(ohlcv([(7, T0, 1, 2, 1, 2, 3)]).tobytes())
    record[0] = 0
    good = _good()
    decoder = dbn.DbnDecoder()
    with pytest.raises(dbn.DbnDecodeError, match="length 0") as exc:
        decoder.feed(good + bytes(record))
    assert exc.value.problem is dbn.DbnProblem.BAD_RECORD_LENGTH
    assert exc.value.offset == len(good)


def test_decoder_when_an_ohlcv_record_has_the_wrong_length_raises_bad_record_length() -> None:
    record = bytearray(ohlcv([(7, T0, 1, 2, 1, 2, 3)]).tobytes()) + bytes(8)
    record[0] = 16
    assert _problem(_good() + bytes(record)) is dbn.DbnProblem.BAD_RECORD_LENGTH


def test_decoder_when_an_ohlcv_record_follows_a_bad_one_in_a_run_still_stops_there() -> None:
    bars = bytearray(ohlcv([(7, T0, 1, 2, 1, 2, i) for i in range(4)]).tobytes())
    bars[56 * 2] = 3  # the third record claims 12 bytes
    decoder = dbn.DbnDecoder()
    with pytest.raises(dbn.DbnDecodeError) as exc:
        decoder.feed(_good() + bytes(bars))
    assert exc.value.problem is dbn.DbnProblem.BAD_RECORD_LENGTH


@pytest.mark.parametrize("damage", ["garbage", "cut_short", "trailing_junk"])
def test_read_dbn_when_zstd_is_corrupt_raises_bad_compression(tmp_path: Path, damage: str) -> None:
    whole = zstandard.ZstdCompressor().compress(_good() + ohlcv([(7, T0, 1, 2, 1, 2, 3)] * 50).tobytes())
    path = tmp_path / "bad.dbn.zst"
    path.write_bytes(
        {
            "garbage": dbn.ZSTD_MAGIC + b"\x00" * 40,
            "cut_short": whole[:-7],  # records end on a boundary no longer: the frame must say so
            "trailing_junk": whole + b"junk",
        }[damage]
    )
    with pytest.raises(dbn.DbnDecodeError) as exc:
        dbn.read_dbn(path)
    assert exc.value.problem is dbn.DbnProblem.BAD_COMPRESSION


def test_read_dbn_when_the_file_has_several_zstd_frames_reads_them_all(tmp_path: Path) -> None:
    data = _good() + ohlcv([(7, T0, 1, 2, 1, 2, 3)] * 3).tobytes()
    path = tmp_path / "frames.dbn.zst"
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(data[i : i + 100]) for i in range(0, len(data), 100)))
    assert len(dbn.read_dbn(path).bars) == 3


@given(st.binary(max_size=300))
def test_decoder_when_fed_arbitrary_bytes_after_metadata_decodes_or_raises_decode_error(tail: bytes) -> None:
    decoder = dbn.DbnDecoder()
    try:
        decoder.feed(_good() + tail)
        decoder.finish()
    except dbn.DbnDecodeError:
        pass


@given(st.binary(max_size=400), st.integers(min_value=0, max_value=400))
def test_decoder_when_metadata_bytes_are_corrupted_decodes_or_raises_decode_error(noise: bytes, at: int) -> None:
    data = bytearray(sample_metadata(2).encode())
    data[8 + at % (len(data) - 8) : 8 + at % (len(data) - 8) + len(noise)] = noise
    decoder = dbn.DbnDecoder()
    try:
        decoder.feed(bytes(data))
        decoder.finish()
    except dbn.DbnDecodeError:
        pass


# -- vectorised checks against the v1 path ----------------------------------------------------------


def v1_reason(
    record: Any, symbols: dict[int, str], bounds: FeedBounds, now_ns: int, feed_ts: int | None
) -> RejectReason | None:
    """What the v1 path does with the equivalent bar: decode, check_bar, then the symbol lookup."""
    iid = int(record["instrument_id"])
    wire = {
        "type": "bar",
        "seq": 1,
        "symbol": symbols.get(iid, f"#{iid}"),  # an unmapped id: a symbol outside the universe
        "ts": int(record["ts_event"]) + dbn.BAR_NS[int(record["rtype"])],
        "open": float(int(record["open"])) / 1e9,
        "high": float(int(record["high"])) / 1e9,
        "low": float(int(record["low"])) / 1e9,
        "close": float(int(record["close"])) / 1e9,
        "volume": int(record["volume"]),
    }
    message = decode(wire)
    if isinstance(message, Rejected):
        return message.reason
    assert isinstance(message, Bar)
    rejected = check_bar(message, bounds, now_ns, feed_ts)
    if rejected is not None:
        return rejected.reason
    return None if iid in symbols else RejectReason.UNKNOWN_SYMBOL


I64 = st.integers(min_value=-(1 << 63), max_value=I64_MAX)
U64 = st.integers(min_value=0, max_value=U64_MAX)


NEAR_T0 = st.integers(min_value=T0 - 10**12, max_value=T0 + 10**12)
REALISTIC_PRICE = st.integers(min_value=1, max_value=10**13)  # up to 10,000.0
TYPICAL_PRICE = st.integers(min_value=10**10, max_value=5 * 10**11)  # 10.0 to 500.0


@st.composite
def records(draw: st.DrawFn) -> tuple[int, ...]:
    rtype = draw(st.sampled_from(sorted(dbn.OHLCV_RTYPES)))
    iid = draw(st.sampled_from([1, 2, 3, 4, 1 << 23]))
    ts_event = draw(
        st.one_of(NEAR_T0, NEAR_T0, st.integers(min_value=I64_MAX - 10**14, max_value=I64_MAX + 10**3), U64)
    )
    kind = draw(st.sampled_from(["consistent", "consistent", "consistent", "positive", "any"]))
    if kind == "consistent":  # OHLC around a level, which the bounds then judge
        low = draw(
            st.one_of(TYPICAL_PRICE, TYPICAL_PRICE, REALISTIC_PRICE, st.integers(min_value=-(10**9), max_value=10**19))
        )
        d_open, d_close, d_high = (draw(st.integers(min_value=0, max_value=10**10)) for _ in range(3))
        open_, close = low + d_open, low + d_close
        high = max(open_, close) + d_high
        o, h, lo, c = (min(p, I64_MAX) for p in (open_, high, low, close))
    elif kind == "positive":  # independent prices: mostly inconsistent
        o, h, lo, c = (draw(REALISTIC_PRICE) for _ in range(4))
    else:
        o, h, lo, c = (draw(st.one_of(I64, st.integers(min_value=-5, max_value=5))) for _ in range(4))
    small = st.integers(min_value=0, max_value=10**7)
    volume = draw(st.one_of(small, small, small, U64, st.sampled_from([10**7, 10**15, 10**15 + 1, 2**53 + 1])))
    return (14, rtype, 1, iid, ts_event, o, h, lo, c, volume)


@st.composite
def bounds(draw: st.DrawFn) -> FeedBounds:
    return FeedBounds(
        min_price=draw(st.sampled_from([1e-6, 1e-9, 0.5, 1.0])),
        max_price=draw(st.sampled_from([1e9, 1e3, 9.223372036854776e9])),
        max_volume=draw(st.sampled_from([1e15, 0.0, 1e7, 1.8446744073709552e19])),
        max_future_ns=draw(st.sampled_from([0, 10**9, 10**12, 10**14])),
        max_ahead_ns=draw(st.sampled_from([0, 10**9, 10**12, 10**14])),
    )


CHECK_ARGS = (
    st.lists(records(), min_size=1, max_size=40),
    st.dictionaries(st.sampled_from([1, 2, 3, 1 << 23]), st.sampled_from(["AAA", "BBB"]), min_size=1, max_size=4),
    bounds(),
    st.one_of(NEAR_T0, NEAR_T0, I64),
    st.one_of(st.none(), NEAR_T0, NEAR_T0, I64),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(*CHECK_ARGS)
def test_check_bars_when_bars_are_random_rejects_exactly_as_check_bar_with_the_same_reason(
    rows: list[tuple[int, ...]],
    symbols: dict[int, str],
    feed_bounds: FeedBounds,
    now_ns: int,
    feed_ts: int | None,
) -> None:
    bars = np.array(rows, dtype=dbn.OHLCV_DTYPE)
    expected = [v1_reason(r, symbols, feed_bounds, now_ns, feed_ts) for r in bars]
    codes = dbn.reject_codes(bars, symbols, feed_bounds, now_ns, feed_ts)
    assert [dbn.CHECK_REASONS[c] for c in codes.tolist()] == expected
    accepted, counts = dbn.check_bars(bars, symbols, feed_bounds, now_ns, feed_ts)
    assert accepted.tolist() == [e is None for e in expected]
    tally: dict[RejectReason, int] = {}
    for reason in expected:
        if reason is not None:
            tally[reason] = tally.get(reason, 0) + 1
    assert counts == tally


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(*CHECK_ARGS)
def test_ohlcv_columns_when_completed_by_the_runtime_bounds_rejects_as_check_bar(
    rows: list[tuple[int, ...]],
    symbols: dict[int, str],
    feed_bounds: FeedBounds,
    now_ns: int,
    feed_ts: int | None,
) -> None:
    """The integration path: decode-level codes here, then the runtime's ``bounds_codes``."""
    bars = np.array(rows, dtype=dbn.OHLCV_DTYPE)
    expected = dbn.reject_codes(bars, symbols, feed_bounds, now_ns, feed_ts)
    cols = dbn.ohlcv_columns(bars, dbn.InstrumentIndex(symbols))
    decode_level = np.where(expected <= dbn.DECODE_CODES, expected, 0)
    assert cols.codes.tolist() == decode_level.tolist()
    fine = expected == 0
    assert cols.ts[fine].tolist() == [int(r["ts_event"]) + dbn.BAR_NS[int(r["rtype"])] for r in bars[fine]]
    assert cols.close[fine].tolist() == [float(int(r["close"])) / 1e9 for r in bars[fine]]

    names = [symbols.get(int(i), f"#{i}") for i in bars["instrument_id"]]
    columns = BarColumns(
        idx=cols.idx,
        ts=cols.ts,
        open=cols.open,
        high=cols.high,
        low=cols.low,
        close=cols.close,
        volume=cols.volume,
        prev_close=np.full(len(bars), np.nan),
        codes=cols.codes.copy(),
        names=names,
    )
    codes = columns.codes.copy()
    bounds_codes(codes, columns, feed_bounds, now_ns, feed_ts)
    assert codes.tolist() == expected.tolist()


def test_check_bars_when_each_rule_is_broken_counts_it_under_its_reason() -> None:
    p = 100 * 10**9
    bars = np.concatenate(
        [
            ohlcv([(1, T0, p, p + 10**9, p - 10**9, p, 10)]),  # accepted
            ohlcv([(1, I64_MAX, p, p, p, p, 1)]),  # close past i64
            ohlcv([(1, T0, 0, p, 0, p, 1)]),
            ohlcv([(1, T0, p, p, p + 1, p, 1)]),  # low above open
            ohlcv([(1, T0, 2 * 10**18, 2 * 10**18, 2 * 10**18, 2 * 10**18, 1)]),  # 2e9 > max_price
            ohlcv([(1, T0, p, p, p, p, 10**16)]),
            ohlcv([(1, T0 + 10**12, p, p, p, p, 1)]),  # far ahead of the wall clock
            ohlcv([(2, T0, p, p, p, p, 1)]),  # unmapped
        ]
    )
    accepted, counts = dbn.check_bars(bars, {1: "SPY"}, FeedBounds(), now_ns=T0 + NS_PER_MIN, feed_ts=None)
    assert accepted.tolist() == [True] + [False] * 7
    assert counts == {
        RejectReason.TS_OUT_OF_RANGE: 1,
        RejectReason.NON_POSITIVE_PRICE: 1,
        RejectReason.INCONSISTENT_OHLC: 1,
        RejectReason.PRICE_OUT_OF_RANGE: 1,
        RejectReason.VOLUME_OUT_OF_RANGE: 1,
        RejectReason.FUTURE_TS: 1,
        RejectReason.UNKNOWN_SYMBOL: 1,
    }
    _, ahead = dbn.check_bars(bars[:1], {1: "SPY"}, FeedBounds(max_ahead_ns=0), T0 + NS_PER_MIN, feed_ts=T0)
    assert ahead == {RejectReason.AHEAD_OF_FEED: 1}


def test_instrument_index_when_ids_are_outside_the_universe_looks_them_up_as_unknown() -> None:
    ids = np.array([1, 2, 3, 1 << 30, 7, 0], dtype=np.uint32)
    dense = dbn.InstrumentIndex({1: "A", 2: "B", 7: "C"}, universe=["C", "A"])
    sparse = dbn.InstrumentIndex({1: "A", 2: "B", 7: "C", 1 << 30: "A"}, universe=["C", "A"])
    assert dense.lookup(ids).tolist() == [1, -1, -1, -1, 0, -1]
    assert sparse.lookup(ids).tolist() == [1, -1, -1, 1, 0, -1]
    assert dbn.InstrumentIndex({}).lookup(ids).tolist() == [-1] * 6


def test_split_minutes_when_bars_share_ts_event_groups_consecutive_runs() -> None:
    bars = ohlcv(
        [
            (i, ts, 1, 1, 1, 1, 1)
            for i, ts in enumerate([T0, T0, T0 + NS_PER_MIN, T0 + 2 * NS_PER_MIN, T0 + 2 * NS_PER_MIN])
        ]
    )
    assert dbn.split_minutes(bars) == [(0, 2), (2, 3), (3, 5)]
    assert dbn.split_minutes(bars[:0]) == []


# -- conversions ------------------------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["SPY", "AIG", "BAC"]),
            st.integers(min_value=0, max_value=10**7),  # price in cents
            st.integers(min_value=0, max_value=10**12),  # volume
        ),
        max_size=20,
    )
)
def test_bars_to_records_when_converted_back_gives_the_same_bars_without_prev_close(
    rows: list[tuple[str, int, int]],
) -> None:
    bars = [
        Bar(i + 1, s, T0 + i * NS_PER_MIN, c / 100, (c + 5) / 100, c / 100, c / 100, float(v), 1.0)
        for i, (s, c, v) in enumerate(rows)
    ]
    ids = {"SPY": 1, "AIG": 2, "BAC": 3}
    records = dbn.bars_to_records(bars, ids)
    back = dbn.records_to_bars(records, {i: s for s, i in ids.items()})
    assert back == [msgspec.structs.replace(b, prev_close=None) for b in bars]


def test_bars_to_records_when_volume_is_fractional_refuses() -> None:
    with pytest.raises(dbn.DbnEncodeError, match="volume"):
        dbn.bars_to_records([Bar(1, "SPY", T0, 1.0, 1.0, 1.0, 1.0, 1.5)], {"SPY": 1})


def test_records_to_bars_when_an_id_is_unmapped_names_it() -> None:
    with pytest.raises(dbn.UnmappedInstrumentError, match="instrument_id 9"):
        dbn.records_to_bars(ohlcv([(9, T0, 1, 1, 1, 1, 1)]), {1: "SPY"})


# -- synth and replay -------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_synth_write_dbn_file_when_loaded_equals_the_csv_of_the_same_universe(
    tmp_path: Path, compress: str | None
) -> None:
    universe = synth.generate(synth.SynthParams(symbols=6, minutes=12, seed=4))
    synth.write_csv(universe, tmp_path / "u.csv")
    path = tmp_path / "u.dbn"
    assert synth.write_dbn_file(universe, path, compress="zstd" if compress else None) == 72
    # One session: load_csv finds no previous close either, so the two agree bar for bar.
    assert replay.load_minutes(path) == replay.load_csv(tmp_path / "u.csv")
    metadata, _ = ref_decode(dbn.read_bytes(path))
    assert metadata.symbols == synth.symbol_names(6)


def test_load_dbn_when_the_file_is_corrupt_raises_replay_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.dbn"
    path.write_bytes(b"DBN\x09" + bytes(200))
    with pytest.raises(replay.ReplayError, match=r"bad\.dbn: unsupported_version"):
        replay.load_minutes(path)


async def _read_dbn_stream(port: int, expected_records: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    decoder, data = dbn.DbnDecoder(), bytearray()
    try:
        while decoder.records < expected_records:
            chunk = await asyncio.wait_for(reader.read(65536), timeout=10)
            assert chunk, "the server closed the stream early"
            data += chunk
            decoder.feed(chunk)
    finally:
        writer.close()
    return bytes(data)


async def test_dbn_replay_server_when_a_client_connects_sends_metadata_mappings_then_the_records(
    tmp_path: Path,
) -> None:
    universe = synth.generate(synth.SynthParams(symbols=4, minutes=5, seed=2))
    path = tmp_path / "u.dbn.zst"
    synth.write_dbn_file(universe, path, compress="zstd")
    server = replay.open_replay(path, feed_format="dbn")
    assert isinstance(server, replay.DbnReplayServer) and server.total_minutes == 5
    port = await server.start()
    try:
        data = await _read_dbn_stream(port, 20)
        await asyncio.wait_for(server.done.wait(), timeout=10)
    finally:
        await server.close()
    on_file = dbn.read_dbn(path)
    ours = dbn.DbnDecoder()
    out = ours.feed(data)
    assert out.bars.tobytes() == on_file.bars.tobytes()
    assert ours.symbols == on_file.symbols == dict(enumerate(synth.symbol_names(4), start=1))
    metadata, records = ref_decode(data)
    assert_same_metadata(ours.metadata, metadata)  # type: ignore[arg-type]
    assert [type(r).__name__ for r in records[:4]] == ["SymbolMappingMsg"] * 4
    assert_same_bars(on_file.bars, records[4:])


async def test_dbn_replay_server_when_serving_a_csv_sends_its_bars_as_ohlcv_1m(tmp_path: Path) -> None:
    universe = synth.generate(synth.SynthParams(symbols=3, minutes=4, seed=5))
    csv_path = tmp_path / "u.csv"
    synth.write_csv(universe, csv_path)
    server = replay.open_replay(csv_path, feed_format="dbn")
    port = await server.start()
    try:
        data = await _read_dbn_stream(port, 12)
    finally:
        await server.close()
    decoder = dbn.DbnDecoder()
    bars = decoder.feed(data).bars
    assert replay.records_to_minutes(bars, decoder.symbols) == replay.load_csv(csv_path)


def test_open_replay_when_msgpack_is_asked_of_a_dbn_file_serves_its_minutes_as_v1(tmp_path: Path) -> None:
    universe = synth.generate(synth.SynthParams(symbols=2, minutes=3, seed=1))
    path = tmp_path / "u.dbn"
    synth.write_dbn_file(universe, path)
    server = replay.open_replay(path, feed_format="msgpack")
    assert type(server) is replay.ReplayServer and server.total_minutes == 3


def test_check_bars_when_values_sit_exactly_on_the_bounds_accepts_them() -> None:
    limits = FeedBounds(min_price=1.0, max_price=500.0, max_volume=1e6, max_future_ns=10**9, max_ahead_ns=10**9)
    bar = ohlcv([(1, T0, 10**9, 500 * 10**9, 10**9, 500 * 10**9, 10**6)])
    close = T0 + NS_PER_MIN
    accepted, counts = dbn.check_bars(bar, {1: "X"}, limits, now_ns=close - 10**9, feed_ts=close - 10**9)
    assert accepted.tolist() == [True] and counts == {}
    accepted, counts = dbn.check_bars(bar, {1: "X"}, limits, now_ns=close - 10**9 - 1, feed_ts=None)
    assert counts == {RejectReason.FUTURE_TS: 1}


async def test_dbn_replay_server_when_a_client_reconnects_resends_the_metadata_then_resumes(tmp_path: Path) -> None:
    universe = synth.generate(synth.SynthParams(symbols=3, minutes=5, seed=7))
    path = tmp_path / "u.dbn"
    synth.write_dbn_file(universe, path)
    server = replay.DbnReplayServer.from_file(path)
    server.position = 2  # as if a client had taken the first two minutes before it dropped
    port = await server.start()
    try:
        data = await _read_dbn_stream(port, 9)
    finally:
        await server.close()
    decoder = dbn.DbnDecoder()
    bars = decoder.feed(data).bars
    assert decoder.metadata == dbn.read_dbn(path).metadata
    assert bars.tobytes() == dbn.read_dbn(path).bars[6:].tobytes()
