"""Signed quantities by symbol, kept in step with an array indexed by the universe.

The order book keeps positions and working quantities as dicts (operators, snapshots and the
journal speak of symbols); the batch gates want them as arrays by universe index. A ``Ledger``
is the dict, and on every change it adds the difference to ``totals[index[symbol]]``, so two
ledgers sharing one ``totals`` hold their per-symbol sum (position plus working: the exposure)
without a pass over every symbol per batch. Symbols outside the index are kept in ``outside``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt


class Ledger(dict[str, int]):
    __slots__ = ("index", "outside", "totals")

    def __init__(self, items: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> None:
        super().__init__(items)
        self.index: Mapping[str, int] | None = None
        self.totals: npt.NDArray[np.int64] | None = None
        self.outside: set[str] = set()

    def attach(self, index: Mapping[str, int], totals: npt.NDArray[np.int64]) -> None:
        """From now on, keep ``totals`` in step (what is held now is added to it)."""
        self.index, self.totals, self.outside = index, totals, set()
        for symbol, qty in self.items():
            self._moved(symbol, qty)

    def _moved(self, symbol: str, delta: int) -> None:
        index, totals = self.index, self.totals
        if index is None or totals is None or not delta:
            return
        i = index.get(symbol)
        if i is None:
            self.outside.add(symbol)
        else:
            totals[i] += delta

    def __setitem__(self, symbol: str, qty: int) -> None:
        self._moved(symbol, qty - self.get(symbol, 0))
        super().__setitem__(symbol, qty)

    def __delitem__(self, symbol: str) -> None:
        self._moved(symbol, -self.get(symbol, 0))
        super().__delitem__(symbol)

    def pop(self, symbol: str, *default: Any) -> Any:
        if symbol in self:
            self._moved(symbol, -self[symbol])
        return super().pop(symbol, *default)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a Ledger changes one symbol at a time (ledger[symbol] = qty), so its totals stay right")

    update = setdefault = popitem = clear = __ior__ = _refuse
