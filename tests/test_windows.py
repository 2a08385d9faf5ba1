"""Feature windows: the gathered batch is exactly each symbol's last W bars, normalised, and no
bar whose features are not finite gets in."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.windows import FeatureWindows, Push
from engines.features import DEFAULT_FEATURES, feature_array, feature_row_fn
from engines.manifest import Feature, Normalisation

FEATURES = tuple(
    Feature(n, Normalisation("zscore", mean=0.1 * i, std=0.5 + i, clip=3.0)) for i, n in enumerate(DEFAULT_FEATURES)
)


def _reference(history: list[tuple[float, float, float, float, float]], window: int) -> np.ndarray:
    raw = feature_array(DEFAULT_FEATURES, np.array(history, dtype=np.float64))[-window:]
    mean = np.array([f.norm.mean for f in FEATURES], dtype=np.float32)
    std = np.array([f.norm.std for f in FEATURES], dtype=np.float32)
    return np.clip((raw - mean) / std, -3.0, 3.0)


bars = st.tuples(
    st.floats(1.0, 500.0),
    st.floats(1.0, 500.0),
    st.floats(0.0, 0.05),
    st.floats(0.0, 0.05),
    st.floats(0.0, 1e7),
).map(lambda t: (t[0], max(t[0], t[1]) * (1 + t[2]), min(t[0], t[1]) * (1 - t[3]), t[1], t[4]))


@settings(max_examples=60)
@given(
    window=st.integers(1, 8),
    streams=st.lists(st.lists(bars, min_size=0, max_size=20), min_size=1, max_size=4),
    order=st.randoms(use_true_random=False),
)
def test_gather_when_windows_are_full_equals_last_w_bars_of_each_symbol(
    window: int, streams: list[list[tuple[float, float, float, float, float]]], order: object
) -> None:
    symbols = tuple(f"S{i}" for i in range(len(streams)))
    windows = FeatureWindows(symbols, window, FEATURES)
    events = [(i, k) for i, s in enumerate(streams) for k in range(len(s))]
    order.shuffle(events)  # type: ignore[attr-defined]
    events.sort(key=lambda e: e[1])  # each symbol in time order, symbols interleaved at random
    for i, k in events:
        o, h, lo, c, v = streams[i][k]
        assert windows.push(i, k + 1, o, h, lo, c, v, None)
    full = [i for i, s in enumerate(streams) if len(s) >= window]
    assert [windows.full(i) for i in range(len(streams))] == [len(s) >= window for s in streams]
    if not full:
        return
    out = np.full((len(full) + 2, window, len(FEATURES)), np.nan, dtype=np.float32)
    windows.gather(np.array(full, dtype=np.int64), out[: len(full)])
    for row, i in enumerate(full):
        np.testing.assert_allclose(out[row], _reference(streams[i], window), rtol=1e-5, atol=1e-5)
    assert np.isnan(out[len(full) :]).all(), "gather wrote past the rows it was given"


def test_push_when_timestamp_not_after_last_is_refused_and_changes_nothing() -> None:
    windows = FeatureWindows(("A",), 2, FEATURES)
    assert windows.push(0, 10, 1.0, 1.0, 1.0, 1.0, 5.0, None)
    before = windows.buf.copy()
    assert not windows.push(0, 10, 2.0, 2.0, 2.0, 2.0, 5.0, None)
    assert not windows.push(0, 9, 2.0, 2.0, 2.0, 2.0, 5.0, None)
    assert windows.count[0] == 1
    np.testing.assert_array_equal(windows.buf, before)


def test_push_first_bar_uses_prev_close_for_its_return() -> None:
    windows = FeatureWindows(("A",), 1, FEATURES)
    windows.push(0, 1, 100.0, 100.0, 100.0, 110.0, 1.0, 100.0)
    raw = windows.buf[0, 0, DEFAULT_FEATURES.index("log_return")]
    assert raw == pytest.approx(np.log(1.1), rel=1e-6)


@pytest.mark.parametrize(
    ("o", "h", "lo", "c", "v"),
    [
        (100.0, 100.0, 5e-324, 5e-324, 1.0),  # close / open underflows to 0: log is -inf
        (1.0, 1.0, 1.0, 1.0, float("inf")),
        (1.0, float("nan"), 1.0, 1.0, 1.0),
        (1e308, 1e308, 1e-10, 1e308, 1.0),  # high / low overflows
    ],
)
def test_push_when_a_feature_would_not_be_finite_refuses_the_bar_and_changes_nothing(
    o: float, h: float, lo: float, c: float, v: float
) -> None:
    windows = FeatureWindows(("A",), 2, FEATURES)
    assert windows.push(0, 1, 100.0, 100.0, 100.0, 100.0, 5.0, None)
    before = windows.buf.copy()
    assert windows.push(0, 2, o, h, lo, c, v, None) is Push.NON_FINITE
    assert (windows.count[0], windows.last_ts[0], windows.last_close[0]) == (1, 1, 100.0)
    np.testing.assert_array_equal(windows.buf, before)
    assert windows.push(0, 2, 101.0, 101.0, 100.0, 100.5, 5.0, None) is Push.ADDED


any_float = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e308, -1.0])


@given(o=any_float, h=any_float, lo=any_float, c=any_float, v=any_float, pc=any_float)
def test_scalar_features_when_inputs_are_degenerate_never_raise_and_equal_the_vector_form(
    o: float, h: float, lo: float, c: float, v: float, pc: float
) -> None:
    """Where a log is undefined both forms give numpy's inf or nan; neither raises."""
    row = np.array(feature_row_fn(DEFAULT_FEATURES)(o, h, lo, c, v, pc), dtype=np.float64)
    previous = pc if pc > 0.0 else 0.0  # the vector form's first bar has no previous close
    vector = feature_array(DEFAULT_FEATURES, np.array([[1.0, 1.0, 1.0, previous, 0.0], [o, h, lo, c, v]]))[1]
    with np.errstate(over="ignore"):
        expected = row.astype(np.float32)
    np.testing.assert_allclose(vector, expected, rtol=1e-6, equal_nan=True)
