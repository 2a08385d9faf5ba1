"""Many new orders at once: a batch's orders as columns, and their native frames in one buffer.

``NewOrders`` is what the order manager hands a gateway for a batch that passed the gates:
order k is ``NewOrder(f"{prefix}-{first + k}", universe[idx[k]], side[k], qty[k], price[k], ts)``.
``FrameEncoder`` writes the native gateway's msgpack frames for all of them into one buffer;
each frame decodes to exactly the map ``protocol.encode`` gives for the same ``NewOrder``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
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


class _Frame(msgspec.Struct, frozen=True, tag_field="type", tag="new_order"):
    """A ``new_order`` frame as ``protocol.encode`` writes it (the same keys and values)."""

    cl_ord_id: str
    symbol: str
    side: str
    qty: int
    price: float
    ts: int
    tif: str = "day"


class FrameEncoder:
    """Native ``new_order`` frames for a batch, in one buffer: msgspec packs them as one array,
    whose header is cut off (an array's items are its frames, back to back)."""

    def __init__(self, universe: tuple[str, ...]) -> None:
        self.universe = universe
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, orders: NewOrders) -> bytes:
        n = len(orders)
        if not n:
            return b""
        if np.any(orders.qty <= 0) or orders.ts < 0:
            raise ValueError("a new order's quantity and time must be positive")
        universe, ts = self.universe, orders.ts
        frames = [
            _Frame(cl_ord_id, universe[i], "buy" if side > 0 else "sell", qty, price, ts)
            for cl_ord_id, i, side, qty, price in zip(
                orders.ids(),
                orders.idx.tolist(),
                orders.side.tolist(),
                orders.qty.tolist(),
                orders.price.tolist(),
                strict=True,
            )
        ]
        data = self._encoder.encode(frames)
        return data[1 if n < 16 else 3 if n < 1 << 16 else 5 :]
