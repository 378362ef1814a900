"""`swap`: similarity seeding, then pairwise-swap local search on the real objective (Eq. 2).

Shape legend: N sequences, D = L * E flattened (layer, expert) pairs, U batches of B.

Clustering by Hamming similarity is only a proxy: two paths can be close yet each add experts their
batch lacks. This scheduler starts from the best of the similarity and fifo groupings and applies the
best swap of two sequences between two batches while one lowers the summed distinct pairs. Swaps keep
batches equal by construction. A swap's gain is computed for all (i, j) at once from per-batch pair
counts (pair counted by how many members use it):

  removing i from batch a frees the pairs only i uses there:  uniq_a(i) = x_i & (count_a == 1)
  adding j to a (after i left) costs |x_j & (count_a == 0)| + |x_j & uniq_a(i)|
so delta_a(i, j) = |x_j & zero_a| + x_j . uniq_a(i) - |uniq_a(i)|, and a swap changes the objective by
delta_a(i, j) + delta_b(j, i): two small matrix products per batch pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertflow.scheduler.base import Grouping, Scheduler
from expertflow.scheduler.similarity import cluster


def swap_deltas(x: np.ndarray, counts: np.ndarray, a_rows: np.ndarray, b_rows: np.ndarray,
                a: int, b: int) -> np.ndarray:
    """Objective change (|a_rows|, |b_rows|) of swapping a_rows[i] (in batch a) with b_rows[j] (in b)."""
    xa, xb = x[a_rows], x[b_rows]                         # (B, D) float32 0/1
    uniq_a = xa * (counts[a] == 1)                        # (B, D)
    uniq_b = xb * (counts[b] == 1)
    delta_a = (xb @ (counts[a] == 0))[None, :] + uniq_a @ xb.T - uniq_a.sum(1)[:, None]
    delta_b = (xa @ (counts[b] == 0))[:, None] + xa @ uniq_b.T - uniq_b.sum(1)[None, :]
    return delta_a + delta_b


def best_swap(x: np.ndarray, counts: np.ndarray, labels: np.ndarray, unit: int) -> tuple[float, int, int]:
    """The most improving swap over all batch pairs: (delta, sequence i, sequence j); delta >= 0 if none."""
    members = [np.flatnonzero(labels == c) for c in range(unit)]
    best = (0.0, -1, -1)
    for a in range(unit):
        for b in range(a + 1, unit):
            deltas = swap_deltas(x, counts, members[a], members[b], a, b)
            flat = int(np.argmin(deltas))
            i, j = divmod(flat, deltas.shape[1])
            if deltas[i, j] < best[0] - 0.5:  # integer-valued; 0.5 absorbs float rounding
                best = (float(deltas[i, j]), int(members[a][i]), int(members[b][j]))
    return best


def local_search(x: np.ndarray, labels: np.ndarray, unit: int, max_swaps: int) -> np.ndarray:
    """x float32 (N, D) 0/1, labels (N,) -> labels after best-improvement swaps until none improves."""
    labels = labels.copy()
    counts = np.stack([x[labels == c].sum(0) for c in range(unit)])   # (U, D)
    for _ in range(max_swaps):
        delta, i, j = best_swap(x, counts, labels, unit)
        if i < 0:
            break
        a, b = labels[i], labels[j]
        counts[a] += x[j] - x[i]
        counts[b] += x[i] - x[j]
        labels[i], labels[j] = b, a
    return labels


def objective(x: np.ndarray, labels: np.ndarray, unit: int) -> int:
    return int(sum((x[labels == c].sum(0) > 0).sum() for c in range(unit)))


@dataclass
class SwapScheduler(Scheduler):
    name = "swap"
    max_iters: int = 10       # similarity clustering rounds for the seed
    max_swaps: int = 200      # bound on local-search steps (each strictly improves, so it also ends)

    def __post_init__(self) -> None:
        if self.max_iters < 1 or self.max_swaps < 0:
            raise ValueError(f"max_iters must be >= 1 and max_swaps >= 0, got {self.max_iters}, {self.max_swaps}")

    def _group(self, paths: np.ndarray, batch_size: int, unit: int) -> Grouping:
        flat = paths.reshape(len(paths), -1)
        x = flat.astype(np.float32)
        seeds = (cluster(flat, batch_size, unit, self.max_iters), np.arange(len(paths)) // batch_size)
        results = [local_search(x, s, unit, self.max_swaps) for s in seeds]
        best = min(results, key=lambda labels: objective(x, labels, unit))
        return Grouping.from_labels(best, unit)
