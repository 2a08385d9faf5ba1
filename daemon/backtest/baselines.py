"""Baseline strategies as engines, so a baseline runs through exactly the path the model does.

A baseline is an ``Engine`` whose logits come from a fixed rule over the same feature windows:
``always_buy`` calls buy on every full window; ``momentum`` calls the direction of the window's
last bar return (hold when it is flat). The backtest runs each through the daemon's runtime,
policy, gates and desk against the same simulated venue, so the model and its baselines differ
only in their calls.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from engines.base import EngineHealth, smallest_bucket
from engines.manifest import Manifest

FloatArray = npt.NDArray[np.float32]
Rule = Callable[[FloatArray, Manifest], FloatArray]  # [n, W, F] normalised windows -> [n, 3] logits

CONFIDENT = 4.0  # a logit gap that makes the rule's call the softmax's, with confidence ~0.95


def _always_buy(x: FloatArray, manifest: Manifest) -> FloatArray:
    out = np.zeros((len(x), 3), dtype=np.float32)
    out[:, 2] = CONFIDENT
    return out


def _momentum(x: FloatArray, manifest: Manifest) -> FloatArray:
    names = manifest.feature_names
    if "log_return" not in names:
        raise ValueError(f"momentum needs a log_return feature; the model has {list(names)}")
    k = names.index("log_return")
    norm = manifest.features[k].norm
    raw = x[:, -1, k] * np.float32(norm.std) + np.float32(norm.mean)  # undo the z-score
    direction = np.sign(raw).astype(np.int64)  # -1 sell, 0 hold, 1 buy
    out = np.zeros((len(x), 3), dtype=np.float32)
    out[np.arange(len(x)), direction + 1] = CONFIDENT
    return out


RULES: dict[str, Rule] = {"always buy": _always_buy, "momentum": _momentum}


class RuleEngine:
    """An engine that calls by a rule: no model file, no inference cost worth the name."""

    backend = "rule"

    def __init__(self, rule: str, manifest: Manifest, buckets: tuple[int, ...]) -> None:
        self.rule = RULES[rule]
        self.name = "primary"
        self.label = rule
        self.manifest = manifest
        self.buckets = buckets
        self._inputs = {b: np.zeros((b, manifest.window, manifest.n_features), dtype=np.float32) for b in buckets}
        self._count = 0

    def bucket_for(self, n: int) -> int:
        return smallest_bucket(self.buckets, n)

    def input_buffer(self, bucket: int) -> FloatArray:
        return self._inputs[bucket]

    def infer(self, bucket: int) -> FloatArray:
        self._count += 1
        return self.rule(self._inputs[bucket], self.manifest)

    def warm_up(self) -> None:
        pass

    def health(self) -> EngineHealth:
        return EngineHealth(True, f"rule {self.label}", self._count, 0)

    def close(self) -> None:
        pass
