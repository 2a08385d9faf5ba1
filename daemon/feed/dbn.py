"""Databento Binary Encoding (DBN), versions 1 to 3: OHLCV bars decoded in bulk with numpy.

A DBN stream is a prelude (``b"DBN"``, a version byte, the metadata length as a u32), the
metadata, then records. Every record starts with a 16-byte header whose first byte is the
record's length in 4-byte words, so a reader can step over any record, known or not. All
integers are little-endian; prices are i64 fixed point with 1e-9 units.

Metadata (after the prelude): dataset (16-byte C string), schema u16, start u64, end u64,
limit u64, (v1: record_count u64), stype_in u8, stype_out u8, ts_out u8, (v2+:
symbol_cstr_len u16), reserved bytes (47 in v1, 53 after), schema_definition_length u32 (0),
then symbols, partial and not_found (a u32 count and that many C strings each) and the mappings
(a u32 count; each a raw symbol, a u32 interval count and intervals of start and end date as
u32 ``YYYYMMDD`` and a symbol). C strings are 22 bytes in v1, 71 after. v3 pads the metadata to
a multiple of 8 bytes.

``DbnDecoder`` is fed bytes as they come off a socket and returns, per call, every complete
OHLCV record as one structured array (``OHLCV_DTYPE``), a zero-copy view over the bytes when
nothing else is interleaved, and the instrument-to-symbol mappings it saw. ``check_bars``
applies the feed protocol's rejection rules to a whole array at once, with the same reasons
and in the same order as ``decode`` plus ``check_bar`` do for one v1 bar.
"""

from __future__ import annotations

import functools
import itertools
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import zstandard

from broker.errors import FrameError
from daemon.feed.protocol import Bar, FeedBounds, RejectReason

DBN_PREFIX = b"DBN"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SUPPORTED_VERSIONS = (1, 2, 3)
PRELUDE_LEN = 8
METADATA_FIXED_LEN = 100  # every version: the fields up to schema_definition_length
DATASET_CSTR_LEN = 16
SYMBOL_CSTR_LEN_V1 = 22
SYMBOL_CSTR_LEN = 71  # versions 2 and 3
HEADER_LEN = 16
FIXED_PRICE_SCALE = 1_000_000_000
UNDEF_PRICE = (1 << 63) - 1
UNDEF_TIMESTAMP = (1 << 64) - 1
NULL_SCHEMA = 0xFFFF
NULL_STYPE = 0xFF
NULL_RECORD_COUNT = (1 << 64) - 1
DEFAULT_DATASET = "TRADINGD"
DEFAULT_MAX_METADATA_BYTES = 64 << 20

_I64_MAX = (1 << 63) - 1
_I64_MIN = -(1 << 63)
_U64_MAX = (1 << 64) - 1
_PRICE_SCALE_F = float(FIXED_PRICE_SCALE)
_NS_PER_S = 1_000_000_000


class RType(IntEnum):
    """The record types this codec reads (a record of any other type is skipped and counted)."""

    SYMBOL_MAPPING = 0x16
    OHLCV_1S = 0x20
    OHLCV_1M = 0x21
    OHLCV_1H = 0x22
    OHLCV_1D = 0x23
    OHLCV_EOD = 0x24


class Schema(IntEnum):
    """DBN schemas by their u16 code in the metadata."""

    MBO = 0
    MBP_1 = 1
    MBP_10 = 2
    TBBO = 3
    TRADES = 4
    OHLCV_1S = 5
    OHLCV_1M = 6
    OHLCV_1H = 7
    OHLCV_1D = 8
    DEFINITION = 9
    STATISTICS = 10
    STATUS = 11
    IMBALANCE = 12
    OHLCV_EOD = 13
    CMBP_1 = 14
    CBBO_1S = 15
    CBBO_1M = 16
    TCBBO = 17
    BBO_1S = 18
    BBO_1M = 19

    @property
    def dbn_name(self) -> str:
        """The name DBN tools print: ``ohlcv-1m``, ``mbp-10``."""
        return self.name.lower().replace("_", "-")


class SType(IntEnum):
    """Symbology types by their u8 code in the metadata and mapping records."""

    INSTRUMENT_ID = 0
    RAW_SYMBOL = 1
    SMART = 2
    CONTINUOUS = 3
    PARENT = 4
    NASDAQ_SYMBOL = 5
    CMS_SYMBOL = 6
    ISIN = 7
    US_CODE = 8
    BBG_COMP_ID = 9
    BBG_COMP_TICKER = 10
    FIGI = 11
    FIGI_TICKER = 12
    LISTING_ID = 13
    ISSUER_ID = 14
    SECURITY_ID = 15


OHLCV_RTYPES = frozenset({RType.OHLCV_1S, RType.OHLCV_1M, RType.OHLCV_1H, RType.OHLCV_1D, RType.OHLCV_EOD})
OHLCV_SCHEMAS = frozenset({Schema.OHLCV_1S, Schema.OHLCV_1M, Schema.OHLCV_1H, Schema.OHLCV_1D, Schema.OHLCV_EOD})
# A bar's duration by record type: its ts_event is the bar's start, a v1 bar's ts its close.
BAR_NS: Mapping[int, int] = {
    RType.OHLCV_1S: _NS_PER_S,
    RType.OHLCV_1M: 60 * _NS_PER_S,
    RType.OHLCV_1H: 3_600 * _NS_PER_S,
    RType.OHLCV_1D: 86_400 * _NS_PER_S,
    RType.OHLCV_EOD: 86_400 * _NS_PER_S,
}
_BAR_NS_TABLE = np.zeros(256, dtype=np.uint64)
_I64_MAX_U = np.uint64(_I64_MAX)
for _rtype, _ns in BAR_NS.items():
    _BAR_NS_TABLE[_rtype] = _ns

_HEADER_FIELDS: list[tuple[str, str]] = [
    ("length", "<u1"),
    ("rtype", "<u1"),
    ("publisher_id", "<u2"),
    ("instrument_id", "<u4"),
    ("ts_event", "<u8"),
]
OHLCV_DTYPE = np.dtype(
    [*_HEADER_FIELDS, ("open", "<i8"), ("high", "<i8"), ("low", "<i8"), ("close", "<i8"), ("volume", "<u8")]
)
OHLCV_TS_OUT_DTYPE = np.dtype([*OHLCV_DTYPE.descr, ("ts_out", "<u8")])  # a stream whose metadata says ts_out
SYMBOL_MAPPING_V1_DTYPE = np.dtype(
    [
        *_HEADER_FIELDS,
        ("stype_in_symbol", f"S{SYMBOL_CSTR_LEN_V1}"),
        ("stype_out_symbol", f"S{SYMBOL_CSTR_LEN_V1}"),
        ("_dummy", "S4"),
        ("start_ts", "<u8"),
        ("end_ts", "<u8"),
    ]
)
SYMBOL_MAPPING_DTYPE = np.dtype(  # versions 2 and 3
    [
        *_HEADER_FIELDS,
        ("stype_in", "<u1"),
        ("stype_in_symbol", f"S{SYMBOL_CSTR_LEN}"),
        ("stype_out", "<u1"),
        ("stype_out_symbol", f"S{SYMBOL_CSTR_LEN}"),
        ("start_ts", "<u8"),
        ("end_ts", "<u8"),
    ]
)
assert OHLCV_DTYPE.itemsize == 56 and OHLCV_TS_OUT_DTYPE.itemsize == 64
assert SYMBOL_MAPPING_V1_DTYPE.itemsize == 80 and SYMBOL_MAPPING_DTYPE.itemsize == 176

OhlcvArray = npt.NDArray[np.void]


# -- errors -------------------------------------------------------------------------------------


class DbnError(Exception):
    """Base class of the DBN codec's errors."""


class DbnProblem(StrEnum):
    """Why DBN bytes could not be read: the ``reason`` of a ``DbnDecodeError``."""

    BAD_MAGIC = "bad_magic"  # not DBN (zstd-compressed bytes say so)
    UNSUPPORTED_VERSION = "unsupported_version"
    UNSUPPORTED_SCHEMA = "unsupported_schema"  # an unknown schema, or not OHLCV where OHLCV is required
    TRUNCATED_METADATA = "truncated_metadata"
    BAD_METADATA = "bad_metadata"  # counts past the metadata's length, bad dates or strings, unknown stype
    METADATA_TOO_LARGE = "metadata_too_large"
    BAD_RECORD_LENGTH = "bad_record_length"  # shorter than a header (0 included), or wrong for its type
    TRUNCATED_RECORD = "truncated_record"  # the stream ended inside a record
    BAD_COMPRESSION = "bad_compression"  # a .zst file whose zstd frames do not decompress


class DbnDecodeError(FrameError, DbnError):
    """The DBN bytes cannot be read further; a stream must be dropped (it cannot resync).

    A ``FrameError``, so a feed that already drops the connection on one does the same here.
    ``offset`` is the byte position in the stream where the problem was found.
    """

    def __init__(self, problem: DbnProblem, detail: str, offset: int | None = None) -> None:
        self.problem = problem
        self.offset = offset
        super().__init__(str(problem), detail if offset is None else f"{detail} (at byte {offset})")


class DbnEncodeError(DbnError, ValueError):
    """A value cannot be written as DBN; names the field and the value."""

    def __init__(self, what: str, problem: str) -> None:
        self.what = what
        self.problem = problem
        super().__init__(f"{what}: {problem}")


class UnmappedInstrumentError(DbnError):
    """A record's instrument id has no symbol mapping, so it cannot become a named bar."""

    def __init__(self, instrument_id: int) -> None:
        self.instrument_id = instrument_id
        super().__init__(f"instrument_id {instrument_id} has no symbol mapping")


# -- metadata -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MappingInterval:
    """``symbol`` (in the metadata's ``stype_out``) for the UTC dates [start_date, end_date)."""

    start_date: date
    end_date: date
    symbol: str


@dataclass(frozen=True, slots=True)
class SymbolMapping:
    """The intervals of one ``stype_in`` symbol (the same attributes databento-dbn reads)."""

    raw_symbol: str
    intervals: tuple[MappingInterval, ...]


@dataclass(frozen=True, slots=True)
class Metadata:
    """The header of a DBN stream. ``end`` and ``limit`` are None where DBN leaves them unset."""

    version: int
    dataset: str
    schema: Schema | None
    start: int
    end: int | None
    limit: int | None
    stype_in: SType | None
    stype_out: SType
    ts_out: bool
    symbol_cstr_len: int
    symbols: tuple[str, ...] = ()
    partial: tuple[str, ...] = ()
    not_found: tuple[str, ...] = ()
    mappings: tuple[SymbolMapping, ...] = ()

    def symbols_by_id(self) -> dict[int, str]:
        """instrument_id -> symbol from the mappings (every interval; a later one wins).

        With ``stype_out`` instrument_id the intervals name the ids and ``raw_symbol`` the
        symbol; with ``stype_in`` instrument_id the other way round; otherwise there are none.
        """
        out: dict[int, str] = {}
        for mapping in self.mappings:
            for interval in mapping.intervals:
                if self.stype_out is SType.INSTRUMENT_ID:
                    key, symbol = interval.symbol, mapping.raw_symbol
                elif self.stype_in is SType.INSTRUMENT_ID:
                    key, symbol = mapping.raw_symbol, interval.symbol
                else:
                    continue
                if key.isascii() and key.isdigit() and symbol:
                    out[int(key)] = symbol
        return out

    def encode(self) -> bytes:
        """The prelude and metadata as DBN bytes (the version's own layout)."""
        version = self.version
        if version not in SUPPORTED_VERSIONS:
            raise DbnEncodeError("version", f"{version} is not one of {SUPPORTED_VERSIONS}")
        cstr = _version_cstr_len(version)
        if self.symbol_cstr_len != cstr:
            raise DbnEncodeError("symbol_cstr_len", f"{self.symbol_cstr_len} for version {version} (it is {cstr})")
        body = bytearray(_cstr(self.dataset, DATASET_CSTR_LEN, "dataset"))
        end = UNDEF_TIMESTAMP if self.end is None else self.end
        schema = NULL_SCHEMA if self.schema is None else int(self.schema)
        for name, value in (("start", self.start), ("end", end), ("limit", self.limit or 0)):
            if not 0 <= value <= UNDEF_TIMESTAMP:
                raise DbnEncodeError(name, f"{value} is not a u64")
        body += struct.pack("<HQQQ", schema, self.start, end, self.limit or 0)
        if version == 1:
            body += struct.pack("<Q", NULL_RECORD_COUNT)
        stype_in = NULL_STYPE if self.stype_in is None else int(self.stype_in)
        body += struct.pack("<BBB", stype_in, int(self.stype_out), int(self.ts_out))
        if version > 1:
            body += struct.pack("<H", cstr)
        body += bytes(47 if version == 1 else 53)
        body += struct.pack("<I", 0)  # schema_definition_length
        for name, strings in (("symbols", self.symbols), ("partial", self.partial), ("not_found", self.not_found)):
            body += struct.pack("<I", len(strings))
            for s in strings:
                body += _cstr(s, cstr, name)
        body += struct.pack("<I", len(self.mappings))
        for mapping in self.mappings:
            body += _cstr(mapping.raw_symbol, cstr, "mappings.raw_symbol")
            body += struct.pack("<I", len(mapping.intervals))
            for interval in mapping.intervals:
                body += struct.pack("<II", _yyyymmdd(interval.start_date), _yyyymmdd(interval.end_date))
                body += _cstr(interval.symbol, cstr, "mappings.intervals.symbol")
        if version >= 3 and len(body) % 8:
            body += bytes(8 - len(body) % 8)
        return DBN_PREFIX + bytes((version,)) + struct.pack("<I", len(body)) + bytes(body)


def _version_cstr_len(version: int) -> int:
    return SYMBOL_CSTR_LEN_V1 if version == 1 else SYMBOL_CSTR_LEN


def _cstr(text: str, size: int, what: str) -> bytes:
    if not text.isascii():
        raise DbnEncodeError(what, f"{text!r} is not ASCII")
    if len(text) >= size:
        raise DbnEncodeError(what, f"{text!r} is longer than {size - 1} characters")
    return text.encode("ascii").ljust(size, b"\0")


def _yyyymmdd(day: date) -> int:
    return day.year * 10_000 + day.month * 100 + day.day


class _Cursor:
    """Reads the metadata body; running past its declared length is BAD_METADATA."""

    def __init__(self, body: bytes, base: int) -> None:
        self.body = body
        self.pos = 0
        self.base = base  # the body's offset in the stream, for error positions

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.body):
            raise DbnDecodeError(
                DbnProblem.BAD_METADATA,
                f"{what} runs past the end of the {len(self.body)}-byte metadata",
                self.base + self.pos,
            )
        out = self.body[self.pos : end]
        self.pos = end
        return out

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def cstr(self, size: int, what: str) -> str:
        at = self.base + self.pos
        raw = self.take(size, what)
        try:
            return _text(raw)
        except UnicodeDecodeError as exc:
            raise DbnDecodeError(DbnProblem.BAD_METADATA, f"{what} is not UTF-8: {raw!r}", at) from exc

    def cstrs(self, size: int, what: str) -> tuple[str, ...]:
        (count,) = self.unpack("<I", f"{what} count")
        at = self.base + self.pos
        if count * size > len(self.body) - self.pos:
            raise DbnDecodeError(DbnProblem.BAD_METADATA, f"{count} {what} do not fit in the metadata", at)
        raws = np.frombuffer(self.body, f"S{size}", count, self.pos).tolist() if count else []
        self.pos += count * size
        try:
            return tuple(_text(raw) for raw in raws)
        except UnicodeDecodeError as exc:
            raise DbnDecodeError(DbnProblem.BAD_METADATA, f"{what}: a symbol is not UTF-8: {exc}", at) from exc

    def mappings(self, size: int) -> tuple[SymbolMapping, ...]:
        (count,) = self.unpack("<I", "mappings count")
        body, pos, end = self.body, self.pos, len(self.body)
        interval_len = 8 + size
        u32, two_u32 = _U32.unpack_from, _TWO_U32.unpack_from
        out: list[SymbolMapping] = []
        try:
            for _ in range(count):
                if pos + size + 4 > end:
                    raise ValueError("runs past the end of the metadata")
                raw_symbol = _text(body[pos : pos + size])
                (intervals_count,) = u32(body, pos + size)
                pos += size + 4
                if intervals_count * interval_len > end - pos:
                    raise ValueError(f"declares {intervals_count} intervals that do not fit in the metadata")
                intervals = []
                for _ in range(intervals_count):
                    start, stop = two_u32(body, pos)
                    symbol = _text(body[pos + 8 : pos + interval_len])
                    intervals.append(MappingInterval(_yyyymmdd_date(start), _yyyymmdd_date(stop), symbol))
                    pos += interval_len
                out.append(SymbolMapping(raw_symbol, tuple(intervals)))
        except ValueError as exc:  # UnicodeDecodeError included
            raise DbnDecodeError(DbnProblem.BAD_METADATA, f"mappings[{len(out)}] {exc}", self.base + pos) from exc
        self.pos = pos
        return tuple(out)


_U32 = struct.Struct("<I")
_TWO_U32 = struct.Struct("<II")


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8")


@functools.lru_cache(maxsize=4096)
def _yyyymmdd_date(raw: int) -> date:
    try:
        return date(raw // 10_000, raw // 100 % 100, raw % 100)
    except ValueError:
        raise ValueError(f"has {raw}, which is not a YYYYMMDD date") from None


def _check_prelude(buf: bytes | memoryview, max_bytes: int) -> tuple[int, int] | None:
    """(version, metadata length) once 8 bytes are there, None before; raises on a bad prelude."""
    head = bytes(buf[:PRELUDE_LEN])
    if head[:3] != DBN_PREFIX[: len(head)]:
        hint = " (zstd-compressed: decompress it first)" if head[:4] == ZSTD_MAGIC[: len(head[:4])] else ""
        raise DbnDecodeError(DbnProblem.BAD_MAGIC, f"expected b'DBN', got {head[:3]!r}{hint}", 0)
    if len(head) < PRELUDE_LEN:
        return None
    version = head[3]
    if version not in SUPPORTED_VERSIONS:
        legacy = " (version 0 is the legacy DBZ format)" if version == 0 else ""
        raise DbnDecodeError(
            DbnProblem.UNSUPPORTED_VERSION, f"DBN version {version}{legacy}; supported: {SUPPORTED_VERSIONS}", 3
        )
    (length,) = struct.unpack_from("<I", head, 4)
    if length < METADATA_FIXED_LEN:
        raise DbnDecodeError(
            DbnProblem.BAD_METADATA, f"metadata length {length} is under the fixed {METADATA_FIXED_LEN} bytes", 4
        )
    if length > max_bytes:
        raise DbnDecodeError(DbnProblem.METADATA_TOO_LARGE, f"metadata length {length} is over {max_bytes}", 4)
    return version, length


def read_metadata(buf: bytes | memoryview, max_bytes: int = DEFAULT_MAX_METADATA_BYTES) -> tuple[Metadata, int]:
    """Parse the prelude and metadata at the start of ``buf``: (metadata, offset of the first record).

    Raises ``DbnDecodeError``: not DBN, a version other than 1-3, an unknown schema or stype,
    fewer bytes than the metadata declares, or counts that run past it.
    """
    prelude = _check_prelude(buf, max_bytes)
    if prelude is None:
        raise DbnDecodeError(DbnProblem.TRUNCATED_METADATA, f"{len(buf)} bytes, the prelude alone is 8", 0)
    version, length = prelude
    end = PRELUDE_LEN + length
    if len(buf) < end:
        raise DbnDecodeError(
            DbnProblem.TRUNCATED_METADATA, f"metadata declares {length} bytes, {len(buf) - PRELUDE_LEN} present", 4
        )
    return _parse_metadata(version, bytes(buf[PRELUDE_LEN:end])), end


def _parse_metadata(version: int, body: bytes) -> Metadata:
    c = _Cursor(body, PRELUDE_LEN)
    dataset = c.cstr(DATASET_CSTR_LEN, "dataset")
    at = c.base + c.pos
    (raw_schema,) = c.unpack("<H", "schema")
    schema: Schema | None = None
    if raw_schema != NULL_SCHEMA:
        try:
            schema = Schema(raw_schema)
        except ValueError as exc:
            raise DbnDecodeError(DbnProblem.UNSUPPORTED_SCHEMA, f"unknown schema {raw_schema}", at) from exc
    start, end, limit = c.unpack("<QQQ", "start, end, limit")
    if version == 1:
        c.take(8, "record_count")
    at = c.base + c.pos
    raw_in, raw_out, ts_out = c.unpack("<BBB", "stype_in, stype_out, ts_out")
    stype_in = None if raw_in == NULL_STYPE else _stype(raw_in, "stype_in", at)
    stype_out = _stype(raw_out, "stype_out", at + 1)
    if version == 1:
        cstr_len = SYMBOL_CSTR_LEN_V1
    else:
        at = c.base + c.pos
        (cstr_len,) = c.unpack("<H", "symbol_cstr_len")
        if cstr_len == 0:
            raise DbnDecodeError(DbnProblem.BAD_METADATA, "symbol_cstr_len is 0", at)
    c.take(47 if version == 1 else 53, "reserved")
    at = c.base + c.pos
    (schema_definition_length,) = c.unpack("<I", "schema_definition_length")
    if schema_definition_length:
        raise DbnDecodeError(
            DbnProblem.BAD_METADATA, f"a schema definition ({schema_definition_length} bytes) is not supported", at
        )
    symbols = c.cstrs(cstr_len, "symbols")
    partial = c.cstrs(cstr_len, "partial")
    not_found = c.cstrs(cstr_len, "not_found")
    mappings = c.mappings(cstr_len)
    return Metadata(
        version=version,
        dataset=dataset,
        schema=schema,
        start=start,
        end=None if end in (0, UNDEF_TIMESTAMP) else end,
        limit=limit or None,
        stype_in=stype_in,
        stype_out=stype_out,
        ts_out=bool(ts_out),
        symbol_cstr_len=cstr_len,
        symbols=symbols,
        partial=partial,
        not_found=not_found,
        mappings=mappings,
    )


def _stype(raw: int, what: str, at: int) -> SType:
    try:
        return SType(raw)
    except ValueError as exc:
        raise DbnDecodeError(DbnProblem.BAD_METADATA, f"unknown {what} {raw}", at) from exc


# -- streaming decoder --------------------------------------------------------------------------


class Decoded(NamedTuple):
    """What one ``DbnDecoder.feed`` completed.

    ``bars``: every complete OHLCV record, in stream order, read-only (a view over the bytes
    fed where possible). ``mappings``: instrument_id -> symbol learnt in this call (from the
    metadata, then from SymbolMappingMsg records); apply them before looking up ``bars``.
    """

    bars: OhlcvArray
    mappings: dict[int, str]


class DbnDecoder:
    """Decodes a DBN byte stream fed chunk by chunk, OHLCV records in bulk.

    The metadata is parsed once (``metadata`` is None until it is complete). Each ``feed``
    returns every complete record and keeps the partial tail for the next call. A run of OHLCV
    records of one type becomes one ``np.frombuffer`` view (the common case: a whole chunk is
    one view, no copy); other records split the runs, which are then concatenated.
    SymbolMappingMsg records (either version's layout, told apart by length) update
    ``symbols``; any other record type is skipped and counted in ``skipped`` by rtype.

    Raises ``DbnDecodeError`` on bytes it cannot go on from: the stream must be dropped.
    """

    def __init__(self, *, require_ohlcv: bool = True, max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES) -> None:
        self.require_ohlcv = require_ohlcv
        self.max_metadata_bytes = max_metadata_bytes
        self.metadata: Metadata | None = None
        self.symbols: dict[int, str] = {}  # every mapping seen so far
        self.skipped: Counter[int] = Counter()
        self.records = 0  # OHLCV records decoded
        self.dtype: np.dtype[np.void] = OHLCV_DTYPE
        self._record_len = OHLCV_DTYPE.itemsize
        self._key_dtype = _key_dtype(self._record_len)
        self._tail = b""
        self._consumed = 0  # stream bytes before the tail
        self._empty: OhlcvArray = np.empty(0, dtype=OHLCV_DTYPE)

    @property
    def pending(self) -> int:
        """Bytes held back: a record (or the metadata) not yet complete."""
        return len(self._tail)

    def feed(self, chunk: bytes | bytearray | memoryview) -> Decoded:
        # The views handed out alias these bytes, so they must be immutable: a bytearray the
        # caller reuses would change bars already returned.
        data = self._tail + chunk if self._tail else (chunk if type(chunk) is bytes else bytes(chunk))
        mappings: dict[int, str] = {}
        pos = 0
        if self.metadata is None:
            prelude = _check_prelude(data, self.max_metadata_bytes)
            if prelude is None or len(data) < PRELUDE_LEN + prelude[1]:
                self._tail = data
                return Decoded(self._empty, mappings)
            metadata, pos = read_metadata(data, self.max_metadata_bytes)
            self._start(metadata)
            mappings.update(metadata.symbols_by_id())
        bars, pos = self._records(data, pos, mappings)
        self._consumed += pos
        self._tail = data[pos:]
        self.symbols.update(mappings)
        return Decoded(bars, mappings)

    def finish(self) -> None:
        """At the end of a file or stream: raises if it ended inside the metadata or a record."""
        if self.metadata is None:
            detail = f"the stream ended after {len(self._tail)} bytes, before the metadata was complete"
            raise DbnDecodeError(DbnProblem.TRUNCATED_METADATA, detail, self._consumed + len(self._tail))
        if self._tail:
            raise DbnDecodeError(
                DbnProblem.TRUNCATED_RECORD,
                f"the stream ended {len(self._tail)} bytes into a record of {self._tail[0] * 4}",
                self._consumed,
            )

    def _start(self, metadata: Metadata) -> None:
        schema = metadata.schema
        if self.require_ohlcv and schema is not None and schema not in OHLCV_SCHEMAS:
            raise DbnDecodeError(
                DbnProblem.UNSUPPORTED_SCHEMA,
                f"schema {schema.dbn_name} is not an OHLCV schema (ohlcv-1s, -1m, -1h, -1d, -eod)",
                PRELUDE_LEN + DATASET_CSTR_LEN,
            )
        self.metadata = metadata
        self.dtype = OHLCV_TS_OUT_DTYPE if metadata.ts_out else OHLCV_DTYPE
        self._record_len = self.dtype.itemsize
        self._key_dtype = _key_dtype(self._record_len)
        self._empty = np.empty(0, dtype=self.dtype)

    def _records(self, data: bytes, pos: int, mappings: dict[int, str]) -> tuple[OhlcvArray, int]:
        end = len(data)
        size = self._record_len
        runs: list[OhlcvArray] = []
        while pos < end:
            length = data[pos] * 4
            if length < HEADER_LEN:
                raise DbnDecodeError(
                    DbnProblem.BAD_RECORD_LENGTH,
                    f"record length {length} is shorter than the {HEADER_LEN}-byte header",
                    self._consumed + pos,
                )
            if end - pos < length:
                break
            rtype = data[pos + 1]
            if rtype in OHLCV_RTYPES:
                if length != size:
                    raise DbnDecodeError(
                        DbnProblem.BAD_RECORD_LENGTH,
                        f"OHLCV record of {length} bytes, expected {size}",
                        self._consumed + pos,
                    )
                n = self._run_length(data, pos, (end - pos) // size, size // 4 | rtype << 8)
                runs.append(np.frombuffer(data, self.dtype, n, pos))
                pos += n * size
            elif rtype == RType.SYMBOL_MAPPING:
                self._mapping(data, pos, length, mappings)
                pos += length
            else:
                self.skipped[rtype] += 1
                pos += length
        if not runs:
            return self._empty, pos
        bars = runs[0] if len(runs) == 1 else np.concatenate(runs)
        self.records += len(bars)
        return bars, pos

    def _run_length(self, data: bytes, pos: int, most: int, key: int) -> int:
        # Length and rtype of record-sized steps ahead, a window at a time: the run ends at the
        # first step that differs, a real record boundary (every record before it is this size).
        # Windows that grow keep a chunk of OHLCV to a check or two, and a run cut short by
        # interleaved records from rescanning the rest of a large buffer each time.
        n, window = 0, _FIRST_WINDOW
        while n < most:
            take = min(window, most - n)
            differs = np.frombuffer(data, self._key_dtype, take, pos + n * self._record_len)["key"] != key
            if differs.any():
                return n + int(differs.argmax())
            n += take
            window *= 8
        return n

    def _mapping(self, data: bytes, pos: int, length: int, mappings: dict[int, str]) -> None:
        if length >= SYMBOL_MAPPING_DTYPE.itemsize:
            layout = SYMBOL_MAPPING_DTYPE
        elif length >= SYMBOL_MAPPING_V1_DTYPE.itemsize:
            layout = SYMBOL_MAPPING_V1_DTYPE
        else:
            raise DbnDecodeError(
                DbnProblem.BAD_RECORD_LENGTH,
                f"symbol mapping record of {length} bytes, shorter than either layout",
                self._consumed + pos,
            )
        record = np.frombuffer(data, layout, 1, pos)[0]
        symbol = bytes(record["stype_out_symbol"]).split(b"\0", 1)[0].decode("utf-8", "replace")
        if symbol:
            mappings[int(record["instrument_id"])] = symbol


_FIRST_WINDOW = 256


def _key_dtype(record_len: int) -> np.dtype[np.void]:
    # The header's first two bytes (length in words, rtype) as one u16 per record-sized step.
    return np.dtype({"names": ["key"], "formats": ["<u2"], "offsets": [0], "itemsize": record_len})


# -- validation ---------------------------------------------------------------------------------


class InstrumentIndex:
    """instrument_id -> slot in a universe, for whole arrays.

    Built once from the mappings and the universe; ids mapped to a symbol outside the universe,
    or not mapped, look up as -1 (an unknown symbol). With no universe, every mapped symbol is
    in it, at its position in sorted order. Ids under ``DENSE_IDS`` (all of a usual venue's)
    are looked up in a flat table, others by binary search.
    """

    DENSE_IDS = 1 << 22  # a 16 MiB table at most

    def __init__(self, symbols_of_ids: Mapping[int, str], universe: Sequence[str] | None = None) -> None:
        names = sorted(set(symbols_of_ids.values())) if universe is None else list(universe)
        slot_of = {name: i for i, name in enumerate(names)}
        pairs = sorted((iid, slot_of[s]) for iid, s in symbols_of_ids.items() if s in slot_of)
        self.universe: tuple[str, ...] = tuple(names)
        self.ids = np.array([p[0] for p in pairs], dtype=np.uint32)
        self.slots = np.array([p[1] for p in pairs], dtype=np.int32)
        self._table: npt.NDArray[np.int32] | None = None
        if not len(self.ids) or int(self.ids[-1]) < self.DENSE_IDS:
            size = int(self.ids[-1]) + 1 if len(self.ids) else 0
            table = np.full(size + 1, -1, dtype=np.int32)  # the last entry answers every larger id
            table[self.ids] = self.slots
            self._table = table

    def lookup(self, instrument_ids: npt.NDArray[np.uint32]) -> npt.NDArray[np.int32]:
        """The universe slot of each id, -1 where unknown."""
        table = self._table
        if table is not None:
            return table.take(instrument_ids, mode="clip")  # past the end: the last entry, -1
        at = np.minimum(np.searchsorted(self.ids, instrument_ids), len(self.ids) - 1)
        return np.where(self.ids[at] == instrument_ids, self.slots[at], np.int32(-1))


# Rejection codes of ``reject_codes``: 0 accepted, else an index into this tuple. The order is
# the v1 path's: decode's rules, then check_bar's, then the runtime's unknown symbol.
CHECK_REASONS: tuple[RejectReason | None, ...] = (
    None,
    RejectReason.TS_OUT_OF_RANGE,
    RejectReason.NON_POSITIVE_PRICE,
    RejectReason.INCONSISTENT_OHLC,
    RejectReason.PRICE_OUT_OF_RANGE,
    RejectReason.VOLUME_OUT_OF_RANGE,
    RejectReason.FUTURE_TS,
    RejectReason.AHEAD_OF_FEED,
    RejectReason.UNKNOWN_SYMBOL,
)


# The decode-level rules, which a bar shows on its own: ``ohlcv_columns`` applies these; the
# bounds and the symbol lookup come after, in ``reject_codes`` or the runtime.
DECODE_CODES = 3
assert CHECK_REASONS[DECODE_CODES + 1 :] == (
    RejectReason.PRICE_OUT_OF_RANGE,
    RejectReason.VOLUME_OUT_OF_RANGE,
    RejectReason.FUTURE_TS,
    RejectReason.AHEAD_OF_FEED,
    RejectReason.UNKNOWN_SYMBOL,
)


def _clamp_i64(value: int) -> np.int64:
    return np.int64(min(max(value, _I64_MIN), _I64_MAX))


def close_ns(bars: OhlcvArray) -> npt.NDArray[np.uint64]:
    """Each bar's close (ts_event + its duration): the ``ts`` of the equivalent v1 bar (may wrap
    past u64 for a ts_event near its maximum, which ``check_bars`` rejects as out of range)."""
    return np.asarray(bars["ts_event"] + _BAR_NS_TABLE[bars["rtype"]], dtype=np.uint64)


def prices(bars: OhlcvArray, name: str) -> npt.NDArray[np.float64]:
    """One price column as float64, exactly as ``float(fixed) / 1e9`` gives it per bar."""
    return np.asarray(bars[name].astype(np.float64) / _PRICE_SCALE_F, dtype=np.float64)


class OhlcvColumns(NamedTuple):
    """OHLCV records as contiguous columns, the values the equivalent v1 bars would carry.

    ``idx``: the instrument's slot in the index's universe, -1 when unknown. ``ts``: the bar's
    close (ts_event + its duration; 0 where that is past i64). Prices ``fixed / 1e9``, volume
    as float64. ``codes``: 0, or the ``CHECK_REASONS`` index of the first decode-level rule the
    bar breaks (close past i64, a non-positive price, inconsistent OHLC); the bounds and the
    unknown symbol are not applied here.
    """

    idx: npt.NDArray[np.int64]
    ts: npt.NDArray[np.int64]
    open: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]
    low: npt.NDArray[np.float64]
    close: npt.NDArray[np.float64]
    volume: npt.NDArray[np.float64]
    codes: npt.NDArray[np.uint8]


def ohlcv_columns(bars: OhlcvArray, index: InstrumentIndex) -> OhlcvColumns:
    """The records as columns with their decode-level codes (see ``OhlcvColumns``)."""
    n = len(bars)
    ts_event = bars["ts_event"]
    durations = _BAR_NS_TABLE.take(bars["rtype"])
    ts_out_of_range = ts_event > _I64_MAX_U - durations
    ts = (ts_event + durations).view(np.int64)  # wraps past u64 only where out of range
    # The four prices as one block: one strided read and conversion into [4, n], rows contiguous.
    px = bars.view(_price_block(bars.dtype))["px"].T.astype(np.float64, order="C")
    px /= _PRICE_SCALE_F
    o, h, lo, c = px
    low_body, high_body = np.minimum(o, c), np.maximum(o, c)
    non_positive = np.minimum(np.minimum(low_body, lo), h) <= 0.0
    inconsistent = (lo > low_body) | (h < high_body)
    codes = _first_code([ts_out_of_range, non_positive, inconsistent], first=1)
    if codes is None:
        codes = np.zeros(n, dtype=np.uint8)
    elif ts_out_of_range.any():
        ts = np.where(ts_out_of_range, np.int64(0), ts)  # a wrapped close never looks valid
    return OhlcvColumns(
        idx=index.lookup(bars["instrument_id"]).astype(np.int64),
        ts=ts,
        open=o,
        high=h,
        low=lo,
        close=c,
        volume=bars["volume"].astype(np.float64),
        codes=codes,
    )


def _first_code(conditions: Sequence[npt.NDArray[np.bool_]], first: int) -> npt.NDArray[np.uint8] | None:
    # Per row, ``first`` + the index of the first true condition, else 0; None when none holds
    # anywhere, the usual case, which then costs one reduction.
    anywhere = conditions[0]
    for condition in conditions[1:]:
        anywhere = anywhere | condition
    if not anywhere.any():
        return None
    codes = np.zeros(len(conditions[0]), dtype=np.uint8)
    for k in range(len(conditions) - 1, -1, -1):  # the first rule broken writes last, so it wins
        np.putmask(codes, conditions[k], first + k)
    return codes


def reject_codes(
    bars: OhlcvArray,
    symbols_of_ids: Mapping[int, str] | InstrumentIndex,
    bounds: FeedBounds,
    now_ns: int,
    feed_ts: int | None,
) -> npt.NDArray[np.uint8]:
    """Per bar, 0 when accepted or the index in ``CHECK_REASONS`` of the first rule it breaks.

    The rules of ``decode`` and ``check_bar`` for the v1 bar with ``ts`` = the bar's close,
    prices ``fixed / 1e9`` and no ``prev_close``, then an unknown instrument (no mapping, or a
    symbol outside the index's universe). ``feed_ts`` is the feed's clock at the start of the
    array (a v1 feed moves it bar by bar; within one minute's bars that is the same).
    """
    index = symbols_of_ids if isinstance(symbols_of_ids, InstrumentIndex) else InstrumentIndex(symbols_of_ids)
    if len(bars) <= _CHECK_BLOCK:
        return _reject_block(bars, index, bounds, now_ns, feed_ts)
    # A long array block by block: each block's several passes then run in cache.
    out = np.empty(len(bars), dtype=np.uint8)
    for start in range(0, len(bars), _CHECK_BLOCK):
        stop = start + _CHECK_BLOCK
        out[start:stop] = _reject_block(bars[start:stop], index, bounds, now_ns, feed_ts)
    return out


_CHECK_BLOCK = 16_384  # under 1 MiB of records


def _reject_block(
    bars: OhlcvArray, index: InstrumentIndex, bounds: FeedBounds, now_ns: int, feed_ts: int | None
) -> npt.NDArray[np.uint8]:
    cols = ohlcv_columns(bars, index)
    ts = cols.ts
    bounded = [
        (cols.low < bounds.min_price) | (cols.high > bounds.max_price),
        cols.volume > bounds.max_volume,
        ts > _clamp_i64(now_ns + bounds.max_future_ns),
        np.zeros(len(ts), dtype=bool) if feed_ts is None else ts > _clamp_i64(feed_ts + bounds.max_ahead_ns),
        cols.idx < 0,
    ]
    later = _first_code(bounded, first=DECODE_CODES + 1)
    codes = cols.codes
    if later is not None:
        np.copyto(codes, later, where=codes == 0)
    return codes


_PRICE_BLOCKS: dict[int, np.dtype[np.void]] = {}


def _price_block(dtype: np.dtype[np.void]) -> np.dtype[np.void]:
    # open, high, low, close are adjacent i8 fields: one [4] field over them, in a record of this size.
    block = _PRICE_BLOCKS.get(dtype.itemsize)
    if block is None:
        offset = dtype.fields["open"][1] if dtype.fields else 0
        block = np.dtype({"names": ["px"], "formats": [("<i8", (4,))], "offsets": [offset], "itemsize": dtype.itemsize})
        _PRICE_BLOCKS[dtype.itemsize] = block
    return block


def check_bars(
    bars: OhlcvArray,
    symbols_of_ids: Mapping[int, str] | InstrumentIndex,
    bounds: FeedBounds,
    now_ns: int,
    feed_ts: int | None,
) -> tuple[npt.NDArray[np.bool_], dict[RejectReason, int]]:
    """(accepted mask, rejections counted by reason): ``reject_codes`` summarised."""
    codes = reject_codes(bars, symbols_of_ids, bounds, now_ns, feed_ts)
    accepted = codes == 0
    by_reason: dict[RejectReason, int] = {}
    if accepted.all():
        return accepted, by_reason
    counts = np.bincount(codes, minlength=len(CHECK_REASONS))
    for code in (np.flatnonzero(counts[1:]) + 1).tolist():
        reason = CHECK_REASONS[code]
        assert reason is not None
        by_reason[reason] = int(counts[code])
    return accepted, by_reason


def split_minutes(bars: OhlcvArray) -> list[tuple[int, int]]:
    """[start, stop) index ranges of consecutive bars with the same ts_event, in order."""
    n = len(bars)
    if n == 0:
        return []
    ts = bars["ts_event"]
    cuts = (np.flatnonzero(ts[1:] != ts[:-1]) + 1).tolist()
    edges = [0, *cuts, n]
    return list(itertools.pairwise(edges))


# -- conversions --------------------------------------------------------------------------------


def make_ohlcv(
    instrument_id: npt.ArrayLike,
    ts_event: npt.ArrayLike,
    open_: npt.ArrayLike,
    high: npt.ArrayLike,
    low: npt.ArrayLike,
    close: npt.ArrayLike,
    volume: npt.ArrayLike,
    *,
    rtype: int = RType.OHLCV_1M,
    publisher_id: int = 0,
) -> OhlcvArray:
    """OHLCV records from columns; prices already in fixed point (integers, 1e-9 units)."""
    ids = np.asarray(instrument_id, dtype=np.uint32)
    out = np.zeros(len(ids), dtype=OHLCV_DTYPE)
    out["length"] = OHLCV_DTYPE.itemsize // 4
    out["rtype"] = rtype
    out["publisher_id"] = publisher_id
    out["instrument_id"] = ids
    out["ts_event"] = np.asarray(ts_event, dtype=np.uint64)
    for name, column in (("open", open_), ("high", high), ("low", low), ("close", close)):
        out[name] = np.asarray(column, dtype=np.int64)
    out["volume"] = np.asarray(volume, dtype=np.uint64)
    return out


def to_fixed(price: float, what: str = "price") -> int:
    """A price in DBN's 1e-9 fixed point (rounded to the nearest unit)."""
    try:
        fixed = round(price * _PRICE_SCALE_F)
    except (OverflowError, ValueError) as exc:
        raise DbnEncodeError(what, f"{price} is not finite") from exc
    if not _I64_MIN <= fixed <= _I64_MAX:
        raise DbnEncodeError(what, f"{price} is outside the i64 fixed-point range")
    return fixed


def bars_to_records(
    bars: Iterable[Bar], ids_of_symbols: Mapping[str, int], *, rtype: int = RType.OHLCV_1M, publisher_id: int = 0
) -> OhlcvArray:
    """v1 bars as OHLCV records: ``ts_event`` = ``ts`` - the bar's duration, prices fixed point.

    ``prev_close`` has no place in DBN and is dropped. A volume that is not a whole number of
    at most a u64, or a symbol without an id, raises ``DbnEncodeError``.
    """
    duration = BAR_NS[rtype]
    rows = []
    for bar in bars:
        iid = ids_of_symbols.get(bar.symbol)
        if iid is None:
            raise DbnEncodeError("symbol", f"{bar.symbol!r} has no instrument id")
        ts_event = bar.ts - duration
        if not 0 <= ts_event <= _U64_MAX:
            raise DbnEncodeError("ts", f"{bar.symbol} bar closing at {bar.ts} starts outside u64")
        volume = bar.volume
        if not (volume >= 0 and float(volume).is_integer() and volume <= _U64_MAX):
            raise DbnEncodeError("volume", f"{bar.symbol} volume {volume} is not a whole number in u64")
        rows.append(
            (
                iid,
                ts_event,
                to_fixed(bar.open, "open"),
                to_fixed(bar.high, "high"),
                to_fixed(bar.low, "low"),
                to_fixed(bar.close, "close"),
                int(volume),
            )
        )
    if not rows:
        return np.empty(0, dtype=OHLCV_DTYPE)
    cols = list(zip(*rows, strict=True))
    return make_ohlcv(*cols, rtype=rtype, publisher_id=publisher_id)


def records_to_bars(bars: OhlcvArray, symbols_of_ids: Mapping[int, str], first_seq: int = 1) -> list[Bar]:
    """OHLCV records as v1 bars (``ts`` the close, numbered from ``first_seq``, no prev_close).

    Raises ``UnmappedInstrumentError`` for an id with no symbol.
    """
    if not len(bars):
        return []
    ts = close_ns(bars).tolist()
    o, h, lo, c = (prices(bars, name).tolist() for name in ("open", "high", "low", "close"))
    volume = bars["volume"].astype(np.float64).tolist()
    out = []
    for i, iid in enumerate(bars["instrument_id"].tolist()):
        symbol = symbols_of_ids.get(iid)
        if symbol is None:
            raise UnmappedInstrumentError(iid)
        out.append(Bar(first_seq + i, symbol, ts[i], o[i], h[i], lo[i], c[i], volume[i], None))
    return out


# -- files --------------------------------------------------------------------------------------


def symbol_mapping_records(symbols_of_ids: Mapping[int, str], version: int, start_ts: int, end_ts: int | None) -> bytes:
    """One SymbolMappingMsg per instrument (sorted by id) in the version's layout: raw symbol
    in and out, valid from ``start_ts`` to ``end_ts``."""
    layout = SYMBOL_MAPPING_V1_DTYPE if version == 1 else SYMBOL_MAPPING_DTYPE
    cstr = _version_cstr_len(version)
    records = np.zeros(len(symbols_of_ids), dtype=layout)
    records["length"] = layout.itemsize // 4
    records["rtype"] = RType.SYMBOL_MAPPING
    records["ts_event"] = start_ts
    records["start_ts"] = start_ts
    records["end_ts"] = UNDEF_TIMESTAMP if end_ts is None else end_ts
    if version > 1:
        records["stype_in"] = SType.RAW_SYMBOL
        records["stype_out"] = SType.RAW_SYMBOL
    pairs = sorted(symbols_of_ids.items())
    raw = [_cstr(symbol, cstr, f"symbol of instrument {iid}").rstrip(b"\0") for iid, symbol in pairs]
    records["instrument_id"] = [iid for iid, _ in pairs]
    records["stype_in_symbol"] = raw
    records["stype_out_symbol"] = raw
    return records.tobytes()


def ohlcv_metadata(
    symbols_of_ids: Mapping[int, str],
    start: int,
    end: int | None,
    *,
    version: int = 3,
    schema: Schema = Schema.OHLCV_1M,
    dataset: str = DEFAULT_DATASET,
) -> Metadata:
    """Metadata for raw symbols in, instrument ids out, one mapping interval per instrument
    over the UTC dates [start, end)."""
    if version not in SUPPORTED_VERSIONS:
        raise DbnEncodeError("version", f"{version} is not one of {SUPPORTED_VERSIONS}")
    first = datetime.fromtimestamp(start // _NS_PER_S, UTC).date()
    last_ns = start if end is None or end <= start else end - 1
    last = datetime.fromtimestamp(last_ns // _NS_PER_S, UTC).date() + timedelta(days=1)
    by_symbol: dict[str, list[int]] = {}
    for iid, symbol in sorted(symbols_of_ids.items()):
        by_symbol.setdefault(symbol, []).append(iid)
    mappings = tuple(
        SymbolMapping(symbol, tuple(MappingInterval(first, last, str(iid)) for iid in ids))
        for symbol, ids in sorted(by_symbol.items())
    )
    return Metadata(
        version=version,
        dataset=dataset,
        schema=schema,
        start=start,
        end=end,
        limit=None,
        stype_in=SType.RAW_SYMBOL,
        stype_out=SType.INSTRUMENT_ID,
        ts_out=False,
        symbol_cstr_len=_version_cstr_len(version),
        symbols=tuple(sorted(by_symbol)),
        mappings=mappings,
    )


def _as_arrays(records: OhlcvArray | Iterable[OhlcvArray]) -> list[OhlcvArray]:
    arrays = [records] if isinstance(records, np.ndarray) else list(records)
    for i, a in enumerate(arrays):
        if a.dtype != OHLCV_DTYPE:
            raise DbnEncodeError(f"records[{i}]", f"dtype {a.dtype} is not OHLCV_DTYPE")
    return arrays


def write_dbn(
    path: Path,
    records: OhlcvArray | Iterable[OhlcvArray],
    symbols_of_ids: Mapping[int, str],
    *,
    version: int = 3,
    compress: Literal["zstd"] | None = None,
    dataset: str = DEFAULT_DATASET,
) -> int:
    """Write an OHLCV-1m DBN file: metadata, SymbolMappingMsg records, then the records (one
    array or several, e.g. one per minute, written in the order given). Returns the count.

    Every record must be OHLCV-1m and its instrument id mapped; ``compress="zstd"`` writes a
    zstd frame (``.dbn.zst``).
    """
    arrays = _as_arrays(records)
    count = sum(len(a) for a in arrays)
    ids: set[int] = set()
    start, stop = _U64_MAX, 0
    for i, a in enumerate(arrays):
        if not len(a):
            continue
        if np.any(a["rtype"] != RType.OHLCV_1M) or np.any(a["length"] != OHLCV_DTYPE.itemsize // 4):
            raise DbnEncodeError(f"records[{i}]", "every record must be OHLCV-1m (rtype 0x21, length 14 words)")
        ids.update(np.unique(a["instrument_id"]).tolist())
        start = min(start, int(a["ts_event"].min()))
        stop = max(stop, int(a["ts_event"].max()))
    missing = sorted(ids - set(symbols_of_ids))
    if missing:
        raise DbnEncodeError("symbols", f"instrument ids {missing[:10]} have no symbol")
    if count == 0:
        start, end = 0, None
    else:
        end = stop + BAR_NS[RType.OHLCV_1M]
    metadata = ohlcv_metadata(symbols_of_ids, start, end, version=version, dataset=dataset)
    head = metadata.encode() + symbol_mapping_records(symbols_of_ids, version, start, end)
    with path.open("wb") as f:
        if compress == "zstd":
            with zstandard.ZstdCompressor().stream_writer(f, closefd=False) as z:
                z.write(head)
                for a in arrays:
                    z.write(np.ascontiguousarray(a).tobytes())
        elif compress is None:
            f.write(head)
            for a in arrays:
                f.write(np.ascontiguousarray(a).tobytes())
        else:
            raise DbnEncodeError("compress", f"{compress!r} is not None or 'zstd'")
    return count


@dataclass(frozen=True, slots=True)
class DbnFile:
    """A whole DBN file, decoded."""

    metadata: Metadata
    bars: OhlcvArray
    symbols: dict[int, str]  # instrument_id -> symbol, from the metadata and mapping records
    skipped: dict[int, int] = field(default_factory=dict)  # rtype -> records of types not read


def read_bytes(path: Path) -> bytes:
    """A DBN file's bytes, decompressed when it starts with the zstd magic (whatever its name).

    Every zstd frame must be complete: a file cut short is an error, not fewer records.
    """
    raw = path.read_bytes()
    if raw[:4] != ZSTD_MAGIC:
        return raw
    out, rest = [], raw
    try:
        while rest:
            frame = zstandard.ZstdDecompressor().decompressobj()
            out.append(frame.decompress(rest))
            if not frame.eof:
                raise DbnDecodeError(DbnProblem.BAD_COMPRESSION, f"{path}: the zstd frame is cut short")
            rest = frame.unused_data
    except zstandard.ZstdError as exc:
        raise DbnDecodeError(DbnProblem.BAD_COMPRESSION, f"{path}: zstd: {exc}") from exc
    return b"".join(out)


def read_dbn(path: Path, *, require_ohlcv: bool = True) -> DbnFile:
    """Read a ``.dbn`` or ``.dbn.zst`` file whole. Raises ``DbnDecodeError`` (and OSError)."""
    decoder = DbnDecoder(require_ohlcv=require_ohlcv, max_metadata_bytes=_U64_MAX)
    decoded = decoder.feed(read_bytes(path))
    decoder.finish()
    assert decoder.metadata is not None
    return DbnFile(decoder.metadata, decoded.bars, dict(decoder.symbols), dict(decoder.skipped))
