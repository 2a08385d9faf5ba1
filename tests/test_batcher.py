"""The micro-batcher: nothing lost, nothing twice, bounded, and due exactly when the rules say."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.batcher import Batcher


@given(
    n_symbols=st.integers(1, 40),
    max_batch=st.integers(1, 16),
    adds=st.lists(st.integers(0, 39), max_size=200),
    take_every=st.integers(1, 30),
)
def test_every_added_symbol_is_taken_once_per_wait_in_arrival_order(
    n_symbols: int, max_batch: int, adds: list[int], take_every: int
) -> None:
    batcher = Batcher(n_symbols, max_batch, max_delay_ns=1_000)
    waiting: list[int] = []
    taken: list[int] = []
    superseded = 0
    for step, raw in enumerate(adds):
        i = raw % n_symbols
        newly_waiting = i not in waiting
        if newly_waiting:
            waiting.append(i)
        else:
            superseded += 1
        full = batcher.add(i, ts_recv=step, ts_event=step, close=1.0 + step)
        assert full == (newly_waiting and len(waiting) >= max_batch)
        assert len(batcher) == len(waiting) <= n_symbols
        if step % take_every == 0:
            batch = batcher.take()
            assert len(batch) <= max_batch
            assert list(batch.symbols) == waiting[:max_batch]
            assert batch.close.tolist() == [
                1.0 + max(k for k, r in enumerate(adds[: step + 1]) if r % n_symbols == i) for i in waiting[:max_batch]
            ]
            taken.extend(batch.symbols.tolist())
            del waiting[:max_batch]
    while len(batcher):
        taken.extend(batcher.take().symbols.tolist())
    assert batcher.superseded == superseded
    assert len(taken) == len(adds) - superseded


def test_due_when_delay_passes_or_batch_fills() -> None:
    batcher = Batcher(8, max_batch=3, max_delay_ns=500)
    assert not batcher.due(0) and batcher.deadline_ns() is None
    batcher.add(0, ts_recv=100, ts_event=1, close=1.0)
    assert batcher.deadline_ns() == 600
    assert not batcher.due(599)
    assert batcher.due(600)
    batcher.add(1, ts_recv=200, ts_event=1, close=1.0)
    assert batcher.add(2, ts_recv=300, ts_event=1, close=1.0)
    assert batcher.due(301)


def test_take_keeps_the_rest_waiting_with_their_own_deadline() -> None:
    batcher = Batcher(8, max_batch=2, max_delay_ns=500)
    for i, ts in enumerate((100, 200, 300)):
        batcher.add(i, ts_recv=ts, ts_event=1, close=1.0)
    assert batcher.take().symbols.tolist() == [0, 1]
    assert batcher.deadline_ns() == 800
    assert batcher.take().ts_recv.tolist() == [300]
    assert batcher.deadline_ns() is None
