"""`exhaustive`: the scheduler's own objective minimised over every balanced partition, for small units.

Shape legend: N = U * B sequences, D = L * E flattened (layer, expert) pairs, P balanced partitions,
N = n_lo + n_hi (the sequences split in two halves for the subset products).
Up to `max_partitions` groupings it scores them all and returns the minimum (on 0/1 paths the optimum `exact`
proves); above the limit it hands the unit to `fallback` (`swap`). Design: docs/design/scheduler.md.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from expertflow.scheduler.base import Grouping, Scheduler
from expertflow.scheduler.swap import Misses, SwapScheduler


def partition_count(batch_size: int, unit: int) -> int:
    """(U * B)! / ((B!)^U * U!): how many distinct balanced groupings a unit has."""
    n = batch_size * unit
    return math.factorial(n) // (math.factorial(batch_size) ** unit * math.factorial(unit))


def balanced_masks(batch_size: int, unit: int) -> np.ndarray:
    """(P, U) int64: every balanced partition of N = U * B sequences once, batch c as a bit mask."""
    rows: list[tuple[int, ...]] = []

    def place(free: int, batches: tuple[int, ...]) -> None:
        if len(batches) == unit - 1:                 # the last batch takes what is left
            rows.append((*batches, free))
            return
        first = free & -free
        others = [1 << i for i in range(free.bit_length()) if free >> i & 1 and 1 << i != first]
        for mates in itertools.combinations(others, batch_size - 1):
            members = first + sum(mates)
            place(free - members, (*batches, members))

    place((1 << (batch_size * unit)) - 1, ())
    return np.array(rows, dtype=np.int64)


def subset_products(q: np.ndarray) -> np.ndarray:
    """q (n, D) -> (2^n, D): row s is the product of the q_i with bit i set in s (row 0: ones)."""
    out = np.empty((1 << len(q), q.shape[1]), dtype=q.dtype)
    out[0] = 1.0
    for i, row in enumerate(q):
        np.multiply(out[:1 << i], row, out=out[1 << i:2 << i])
    return out


def popcounts(count: int) -> np.ndarray:
    """(count,) number of set bits of 0..count-1 (count a power of two)."""
    bits = np.zeros(count, dtype=np.int64)
    step = 1
    while step < count:
        bits[step:2 * step] = bits[:step] + 1
        step *= 2
    return bits


@dataclass(frozen=True)
class Plan:
    """Index tables of one (B, U), built once: where each B-subset's unused-pairs sum lands in the flat
    vector of `unused`, and which B-subsets make each partition."""

    n: int                                      # sequences of the unit, U * B
    n_lo: int                                   # of them in the first half
    blocks: tuple[tuple[np.ndarray, np.ndarray], ...]   # per popcount split: (lo masks, hi masks) of its rows, cols
    flat: np.ndarray                            # (P, U) index of each partition's batches into `unused`
    masks: np.ndarray                           # (P, U) the batches as bit masks over the N sequences

    @classmethod
    def build(cls, batch_size: int, unit: int) -> "Plan":
        n = batch_size * unit
        n_lo = n // 2
        size_lo, size_hi = popcounts(1 << n_lo), popcounts(1 << (n - n_lo))
        blocks, where, offset = [], {}, 0
        for k in range(max(0, batch_size - (n - n_lo)), min(n_lo, batch_size) + 1):
            rows, cols = np.flatnonzero(size_lo == k), np.flatnonzero(size_hi == batch_size - k)
            blocks.append((rows, cols))
            for r, lo in enumerate(rows.tolist()):
                for c, hi in enumerate(cols.tolist()):
                    where[lo | hi << n_lo] = offset + r * len(cols) + c
            offset += len(rows) * len(cols)
        masks = balanced_masks(batch_size, unit)
        flat = np.array([where[m] for m in masks.ravel().tolist()], dtype=np.int64).reshape(masks.shape)
        return cls(n, n_lo, tuple(blocks), flat, masks)

    def unused(self, q: np.ndarray) -> np.ndarray:
        """q (N, D) -> (C(N, B),) sum_d prod_{i in S} q_id of every B-subset S, in `flat`'s order."""
        lo, hi = subset_products(q[:self.n_lo]), subset_products(q[self.n_lo:])
        return np.concatenate([(lo[rows] @ hi[cols].T).ravel() for rows, cols in self.blocks])

    def labels(self, p: int) -> np.ndarray:
        """(N,) batch label per sequence of partition p."""
        batches = self.masks[p].tolist()
        return np.array([next(c for c, m in enumerate(batches) if m >> i & 1) for i in range(self.n)])


@dataclass
class ExhaustiveScheduler(Scheduler):
    name = "exhaustive"
    max_partitions: int = 25_000          # 2 x 9 has 24,310; units with more go to `fallback`
    fallback: SwapScheduler = field(default_factory=SwapScheduler)
    _plans: dict[tuple[int, int], Plan] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_partitions < 1:
            raise ValueError(f"max_partitions must be >= 1, got {self.max_partitions}")

    def enumerates(self, batch_size: int, unit: int) -> bool:
        """Whether a unit of U batches of B is enumerated (else it goes to `fallback`)."""
        return partition_count(batch_size, unit) <= self.max_partitions

    def _group(self, routing: np.ndarray, batch_size: int, unit: int) -> Grouping:
        if not self.enumerates(batch_size, unit):
            return self.fallback._group(routing, batch_size, unit)
        plan = self.plan(batch_size, unit)
        q = Misses.of(routing.reshape(len(routing), -1)).q                        # (N, D)
        q = q[:, (q < 1.0).any(0)]     # a pair no sequence can use costs 0 in every partition: drop it
        unused = plan.unused(q)[plan.flat].sum(1)                                 # (P,)
        best = int(np.argmax(unused))                  # cost U * D - unused: the first of any ties
        return Grouping.from_labels(plan.labels(best), unit)

    def plan(self, batch_size: int, unit: int) -> Plan:
        """The index tables of (B, U), built on first use."""
        if (batch_size, unit) not in self._plans:
            self._plans[(batch_size, unit)] = Plan.build(batch_size, unit)
        return self._plans[(batch_size, unit)]
