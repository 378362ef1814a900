"""`swap`: similarity seeding, then pairwise-swap local search on the real objective (Eq. 2).

Shape legend: N sequences, D = L * E flattened (layer, expert) pairs, U batches of B.

Starts from the better of the similarity and fifo groupings and applies the best swap of two sequences between
two batches while one lowers the objective; batches stay equal by construction. `Misses` keeps products of
q = 1 - p as a count of certain members plus a log sum, so 0/1 paths stay exact. Design: docs/design/scheduler.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertflow.scheduler.base import Grouping, Scheduler
from expertflow.scheduler.similarity import cluster

# Smallest objective change that counts as an improvement: far above float rounding of the deltas,
# far below one expected pair; on 0/1 paths (integer deltas) the same as "improves by at least 1".
MIN_GAIN = 1e-9


@dataclass(frozen=True)
class Misses:
    """Per sequence and pair, the probability q = 1 - p that it leaves the pair unused, split for exact
    products: `certain` marks q == 0 (counted), `log_q` holds log q elsewhere (summed)."""

    q: np.ndarray          # (N, D) float64; float32 on 0/1 paths (exact there, and the products run faster)
    certain: np.ndarray    # (N, D) float64 0/1
    log_q: np.ndarray      # (N, D) float64, 0 where certain
    inv_q: np.ndarray      # (N, D) float64 exp(-log_q): takes a member out of a product (1 where certain)
    binary: bool           # every p is 0 or 1: a product of q is then its certainty test alone

    @classmethod
    def of(cls, flat: np.ndarray) -> "Misses":
        """flat (N, D): bool paths or float probabilities in [0, 1]."""
        q = 1.0 - flat.astype(np.float64)
        certain = q == 0.0
        kept_q = np.where(certain, 1.0, q)
        binary = bool((kept_q == 1.0).all())
        return cls(q.astype(np.float32) if binary else q, certain.astype(np.float64), np.log(kept_q),
                   1.0 / kept_q, binary)

    def rest(self, rows: np.ndarray, certain: np.ndarray, others: np.ndarray) -> np.ndarray:
        """(B, D) R(i) for the members `rows` of one batch with (D,) certain count and product of the
        uncertain q `others`: zero where another member is certain (its count exceeds i's own)."""
        if self.binary:
            return (certain == self.certain[rows]).astype(np.float32)
        out = others * self.inv_q[rows]
        cols = np.flatnonzero(certain)          # few on probabilities (p == 1 is rare): mask only those
        if len(cols):
            out[:, cols] *= certain[cols] == self.certain[np.ix_(rows, cols)]
        return out


def batch_factors(m: Misses, labels: np.ndarray, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """(U, D) count of certain members and (U, D) sum of log q, per batch."""
    certain = np.stack([m.certain[labels == c].sum(0) for c in range(unit)])
    log_q = np.stack([m.log_q[labels == c].sum(0) for c in range(unit)])
    return certain, log_q


def best_swap(m: Misses, labels: np.ndarray, certain: np.ndarray, log_q: np.ndarray,
              unit: int) -> tuple[float, int, int]:
    """The most improving swap over all batch pairs: (delta, sequence i, sequence j); i = -1 if none.
    certain, log_q: (U, D) factors of the grouping `labels`."""
    others = np.exp(log_q)                                                  # (U, D) product of uncertain q
    kept = ((certain == 0.0) * others).sum(1)                               # (U,) sum(Z_a)
    members = [np.flatnonzero(labels == c) for c in range(unit)]
    q = [m.q[rows] for rows in members]                                     # (B, D) per batch
    rest = [m.rest(rows, certain[c], others[c]) for c, rows in enumerate(members)]     # (B, D) per batch
    best = (0.0, -1, -1)
    for a in range(unit):
        for b in range(a + 1, unit):
            deltas = (kept[a] - rest[a] @ q[b].T) + (kept[b] - rest[b] @ q[a].T).T     # (B, B)
            i, j = divmod(int(np.argmin(deltas)), deltas.shape[1])
            if deltas[i, j] < best[0] - MIN_GAIN:
                best = (float(deltas[i, j]), int(members[a][i]), int(members[b][j]))
    return best


def local_search(m: Misses, labels: np.ndarray, unit: int, max_swaps: int) -> np.ndarray:
    """labels (N,) -> labels after best-improvement swaps until none improves."""
    labels = labels.copy()
    certain, log_q = batch_factors(m, labels, unit)
    for _ in range(max_swaps):
        _, i, j = best_swap(m, labels, certain, log_q, unit)
        if i < 0:
            break
        a, b = labels[i], labels[j]
        for batch, out, into in ((a, i, j), (b, j, i)):
            certain[batch] += m.certain[into] - m.certain[out]
            log_q[batch] += m.log_q[into] - m.log_q[out]
        labels[i], labels[j] = b, a
    return labels


def objective(m: Misses, labels: np.ndarray, unit: int) -> float:
    """Expected distinct pairs summed over batches (the distinct pairs, on 0/1 paths)."""
    certain, log_q = batch_factors(m, labels, unit)
    return float((1.0 - (certain == 0.0) * np.exp(log_q)).sum())


@dataclass
class SwapScheduler(Scheduler):
    name = "swap"
    max_iters: int = 10       # similarity clustering rounds for the seed
    max_swaps: int = 200      # bound on local-search steps (each strictly improves, so it also ends)

    def __post_init__(self) -> None:
        if self.max_iters < 1 or self.max_swaps < 0:
            raise ValueError(f"max_iters must be >= 1 and max_swaps >= 0, got {self.max_iters}, {self.max_swaps}")

    def _group(self, routing: np.ndarray, batch_size: int, unit: int) -> Grouping:
        flat = routing.reshape(len(routing), -1)
        m = Misses.of(flat)
        seeds = (cluster(flat, batch_size, unit, self.max_iters), np.arange(len(routing)) // batch_size)
        results = [local_search(m, s, unit, self.max_swaps) for s in seeds]
        best = min(results, key=lambda labels: objective(m, labels, unit))
        return Grouping.from_labels(best, unit)
