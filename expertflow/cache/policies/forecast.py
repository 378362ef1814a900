"""From per-token routing probabilities (arrays) to a forecast over keys, the form policies read.

Shape legend: N tokens of one forward (all sequences' new positions), L MoE layers, E experts, K top_k.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from expertflow.cache.policies.base import Forecast, Key

FLOOR = 0.01  # keys less likely than this are left out of a forecast (policies read absent as ~0)


def batch_forecast(probs: np.ndarray, layers: Sequence[int]) -> dict[Key, float]:
    """P(some token of the forward uses the key), from per-token probabilities (N, L, E), tokens
    taken as independent."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0 - 1e-12)
    used = -np.expm1(np.log1p(-probs).sum(axis=0))  # (L, E): 1 - prod(1 - p)
    rows, cols = np.nonzero(used >= FLOOR)
    return {(layers[i], int(e)): float(used[i, e]) for i, e in zip(rows.tolist(), cols.tolist())}


def restrict(forecast: Forecast, layers: Collection[int]) -> dict[Key, float]:
    """The forecast's keys of `layers` only: what a forward that runs just those layers can use."""
    return {key: p for key, p in forecast.items() if key[0] in layers}


def one_hot_routing(routing: np.ndarray, num_experts: int) -> np.ndarray:
    """Routing (N, L, K) expert ids -> (N, L, E) 0/1 probabilities: the oracle forecast.

    A NO_EXPERT (-1) entry (layer not passed, or token dropped for capacity) gets no expert."""
    out = np.zeros((*routing.shape[:2], num_experts + 1), dtype=np.float32)  # last column catches NO_EXPERT
    np.put_along_axis(out, np.where(routing < 0, num_experts, routing).astype(np.int64), 1.0, axis=2)
    return out[..., :num_experts]


