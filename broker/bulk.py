"""Many new orders at once: a batch's orders as columns, and their native frames in one buffer.

``NewOrders`` is what the order manager hands a gateway for a batch that passed the gates:
order k is ``NewOrder(f"{prefix}-{first + k}", universe[idx[k]], side[k], qty[k], price[k], ts)``.
``FrameEncoder`` writes the native gateway's msgpack frames for all of them into one buffer,
with numpy (no Python object per order); each frame decodes to exactly the map
``protocol.encode`` gives for the same ``NewOrder``, in an order the broker need not care about.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from broker import protocol as wire

U8 = npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class NewOrders:
    prefix: str
    first: int
    universe: tuple[str, ...]
    idx: npt.NDArray[np.int64]
    side: npt.NDArray[np.int8]  # +1 buy, -1 sell
    qty: npt.NDArray[np.int64]
    price: npt.NDArray[np.float64]
    ts: int  # wall-clock ns at send, one for the batch

    def __len__(self) -> int:
        return len(self.idx)

    def ids(self) -> list[str]:
        prefix = self.prefix
        return [f"{prefix}-{seq}" for seq in range(self.first, self.first + len(self.idx))]

    def messages(self) -> Iterator[wire.NewOrder]:
        """One ``NewOrder`` each (for a gateway that writes them one by one)."""
        universe, ts = self.universe, self.ts
        for cl_ord_id, i, side, qty, price in zip(
            self.ids(), self.idx.tolist(), self.side.tolist(), self.qty.tolist(), self.price.tolist(), strict=True
        ):
            yield wire.NewOrder(cl_ord_id, universe[i], wire.Side.BUY if side > 0 else wire.Side.SELL, qty, price, ts)


def _fixstr(text: str) -> bytes:
    data = text.encode()
    assert len(data) < 32
    return bytes([0xA0 | len(data)]) + data


def _str8(data: bytes) -> bytes:
    return b"\xd9" + bytes([len(data)]) + data


_BUY = _str8(b"buy")  # five bytes, as "sell" is as a fixstr: the side is one width
_SELL = _fixstr("sell")
_DIGITS = 19  # a positive int64 has at most this many
_TENS = 10 ** np.arange(1, _DIGITS, dtype=np.int64)  # below 10**d: at most d digits
# "0000" .. "9999" as ASCII bytes, [10000, 4]: the digits of a number four at a time.
_FOUR_DIGITS = np.array([b"%04d" % k for k in range(10_000)], dtype="S4").view(np.uint8).reshape(10_000, 4)


class FrameEncoder:
    """Native ``new_order`` frames for a batch, in one buffer, made with numpy: orders whose
    client ids have as many digits and whose symbols are as long have frames of one layout, so
    each such group is one [orders, bytes] array filled column by column. Each frame is a map of
    the keys and values ``protocol.encode`` gives (strings as fixstr or str8, quantities and
    times as uint64, prices as float64: the shortest form is not required of msgpack)."""

    def __init__(self, universe: tuple[str, ...]) -> None:
        self.universe = universe
        raw = [s.encode() for s in universe]
        lengths = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
        width = int(lengths.max(initial=0))
        if width > 255:
            raise ValueError("a symbol longer than 255 bytes does not fit a str8")
        # Each symbol as a str8 (0xd9, length, bytes), padded to one width, built without a loop.
        self._sym_len = lengths + 2
        self._symbols = np.zeros((len(raw), width + 2), dtype=np.uint8)
        self._symbols[:, 0] = 0xD9
        self._symbols[:, 1] = lengths
        if width:
            self._symbols[:, 2:] = np.array(raw, dtype=f"S{width}").view(np.uint8).reshape(len(raw), width)
        self._layouts: dict[tuple[str, int, int], tuple[npt.NDArray[np.uint8], int, int, int, int, int, int]] = {}

    def _layout(self, prefix: str, digits: int, sym: int) -> tuple[npt.NDArray[np.uint8], int, int, int, int, int, int]:
        """A frame's bytes with zeros where the orders differ, and where each of those begins:
        digits, symbol, side, qty, price, ts."""
        key = (prefix, digits, sym)
        found = self._layouts.get(key)
        if found is not None:
            return found
        head = (prefix + "-").encode()
        if len(head) + digits > 255:
            raise ValueError("client order id too long for a str8")
        parts = [
            bytes([0x88]),
            _fixstr("type"),
            _fixstr("new_order"),
            _fixstr("cl_ord_id"),
            b"\xd9" + bytes([len(head) + digits]) + head,
        ]
        at_digits = sum(map(len, parts))
        parts += [bytes(digits), _fixstr("symbol")]
        at_sym = sum(map(len, parts))
        parts += [bytes(sym), _fixstr("side")]
        at_side = sum(map(len, parts))
        parts += [bytes(len(_BUY)), _fixstr("qty"), b"\xcf"]
        at_qty = sum(map(len, parts))
        parts += [bytes(8), _fixstr("price"), b"\xcb"]
        at_price = sum(map(len, parts))
        parts += [bytes(8), _fixstr("ts"), b"\xcf"]
        at_ts = sum(map(len, parts))
        parts += [bytes(8), _fixstr("tif"), _fixstr("day")]
        template = np.frombuffer(b"".join(parts), dtype=np.uint8)
        found = (template, at_digits, at_sym, at_side, at_qty, at_price, at_ts)
        if len(self._layouts) < 256:
            self._layouts[key] = found
        return found

    def encode(self, orders: NewOrders) -> bytes:
        n = len(orders)
        if not n:
            return b""
        if np.any(orders.qty <= 0) or orders.ts < 0 or orders.first < 0:
            raise ValueError("a new order's quantity must be positive, its time and number not negative")
        seq = orders.first + np.arange(n, dtype=np.int64)
        ndig = np.searchsorted(_TENS, seq, side="right").astype(np.int64) + 1
        sym_len = self._sym_len[orders.idx]
        group = ndig * 1024 + sym_len
        if (group == group[0]).all():
            keys, which = group[:1], np.zeros(n, dtype=np.int64)
        else:
            keys, which = np.unique(group, return_inverse=True)
        ts = np.frombuffer(int(orders.ts).to_bytes(8, "big"), dtype=np.uint8)
        buy = np.frombuffer(_BUY, dtype=np.uint8)
        sell = np.frombuffer(_SELL, dtype=np.uint8)
        out = []
        for j, key in enumerate(keys.tolist()):
            rows = np.flatnonzero(which == j) if len(keys) > 1 else np.arange(n)
            k = len(rows)
            digits, sym = divmod(key, 1024)
            template, at_d, at_s, at_side, at_q, at_p, at_t = self._layout(orders.prefix, digits, sym)
            frames = np.empty((k, len(template)), dtype=np.uint8)
            frames[:] = template
            left = seq[rows]
            end = at_d + digits
            while end > at_d:  # four digits at a time, last first: one division by a scalar each
                width = min(4, end - at_d)
                frames[:, end - width : end] = _FOUR_DIGITS[left % 10_000, 4 - width :]
                left //= 10_000
                end -= width
            frames[:, at_s : at_s + sym] = self._symbols[orders.idx[rows], :sym]
            frames[:, at_side : at_side + len(_BUY)] = np.where((orders.side[rows] > 0)[:, None], buy, sell)
            frames[:, at_q : at_q + 8] = orders.qty[rows].astype(">u8").view(np.uint8).reshape(k, 8)
            frames[:, at_p : at_p + 8] = orders.price[rows].astype(">f8").view(np.uint8).reshape(k, 8)
            frames[:, at_t : at_t + 8] = ts
            out.append(frames.tobytes())
        return b"".join(out)
