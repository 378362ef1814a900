"""The token-scheduler interface: routing paths in, a balanced grouping of sequences out.

Shape legend: N waiting sequences (one token each this step), L layers, E experts, K top_k,
B batch size, U batches per scheduling unit (N = U * B), D = L * E flattened (layer, expert) pairs.

A scheduler sees routing only: for each waiting sequence, which (layer, expert) pairs its next token
activates (true or predicted), as 0/1 paths or as the predictor's activation probabilities p_ile. It
never touches tensors of the model; the engine applies the returned `Grouping` to its KV caches. The
objective (paper Eq. 2) is the number of distinct (layer, expert) pairs each batch activates, summed
over the unit's batches; on probabilities it is its expectation, sum over (l, e) of
1 - prod_{i in batch} (1 - p_ile), which equals Eq. 2 on 0/1 inputs. `distinct_pairs` and
`expected_distinct` are the definitions that tests, benchmarks and the engine share.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


def routing_paths(routing: np.ndarray, num_experts: int | None = None) -> np.ndarray:
    """Boolean (N, L, E) paths from either boolean (N, L, E) paths or integer (N, L, K) expert ids."""
    routing = np.asarray(routing)
    if routing.ndim != 3 or routing.shape[0] == 0 or 0 in routing.shape:
        raise ValueError(f"routing must be a non-empty (N, L, E) bool or (N, L, K) int array, got shape "
                         f"{routing.shape}")
    if routing.dtype == np.bool_:
        if num_experts is not None and routing.shape[2] != num_experts:
            raise ValueError(f"bool routing paths have E={routing.shape[2]} experts but num_experts={num_experts}")
        return routing
    if not np.issubdtype(routing.dtype, np.integer):
        raise ValueError(f"routing must be bool paths (N, L, E) or integer expert ids (N, L, K), got dtype "
                         f"{routing.dtype}; take the top-k of predicted probabilities first, or pass "
                         f"probabilities=True to schedule on them")
    if num_experts is None or num_experts < 1:
        raise ValueError("integer expert ids (N, L, K) need num_experts >= 1 to build routing paths")
    if routing.min() < 0 or routing.max() >= num_experts:
        raise ValueError(f"expert ids must lie in 0..{num_experts - 1}, got {routing.min()}..{routing.max()}")
    paths = np.zeros((*routing.shape[:2], num_experts), dtype=bool)
    np.put_along_axis(paths, routing.astype(np.int64), True, axis=-1)
    return paths


def routing_probabilities(probs: np.ndarray) -> np.ndarray:
    """float64 (N, L, E) activation probabilities from float (or 0/1 bool) (N, L, E), checked to lie in [0, 1]."""
    probs = np.asarray(probs)
    if probs.ndim != 3 or 0 in probs.shape:
        raise ValueError(f"probabilities must be a non-empty (N, L, E) float array, got shape {probs.shape}")
    if probs.dtype != np.bool_ and not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probabilities must be floats (N, L, E), got dtype {probs.dtype}; pass expert ids "
                         f"without probabilities=True")
    probs = probs.astype(np.float64)
    if not np.isfinite(probs).all():
        raise ValueError("probabilities must be finite, got NaN or inf; check the predictor's output")
    if probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError(f"probabilities must lie in [0, 1], got {probs.min():g}..{probs.max():g}; pass the "
                         f"predictor's sigmoid outputs, not its logits")
    return probs


def check_unit(num_sequences: int, batch_size: int, unit: int) -> None:
    if batch_size < 1 or unit < 1:
        raise ValueError(f"batch_size and unit must be >= 1, got batch_size={batch_size}, unit={unit}")
    if num_sequences != batch_size * unit:
        raise ValueError(f"a unit of {unit} batches of {batch_size} needs {batch_size * unit} sequences, "
                         f"got {num_sequences}")


@dataclass(frozen=True)
class Grouping:
    """U batches of B sequence indices (indices into the waiting sequences, 0..N-1), each used once."""

    batches: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        batches = tuple(tuple(int(i) for i in b) for b in self.batches)
        object.__setattr__(self, "batches", batches)
        if not batches or not batches[0]:
            raise ValueError("a grouping needs at least one non-empty batch")
        sizes = {len(b) for b in batches}
        if len(sizes) != 1:
            raise ValueError(f"batches must have equal sizes, got {[len(b) for b in batches]}")
        flat = sorted(i for b in batches for i in b)
        if flat != list(range(len(flat))):
            raise ValueError(f"batches must hold each of sequences 0..{len(flat) - 1} exactly once, got {batches}")

    @classmethod
    def from_labels(cls, labels: Sequence[int] | np.ndarray, unit: int) -> "Grouping":
        """Batch label per sequence (N,) -> canonical grouping: members ascending, batches ordered by their
        first member, so equal partitions compare equal whatever the labels."""
        labels = np.asarray(labels)
        batches = [tuple(np.flatnonzero(labels == b).tolist()) for b in range(unit)]
        return cls(tuple(sorted(batches)))

    @classmethod
    def identity(cls, num_sequences: int, batch_size: int) -> "Grouping":
        """The fifo grouping: consecutive runs of B sequences in arrival order."""
        return cls(tuple(tuple(range(s, s + batch_size)) for s in range(0, num_sequences, batch_size)))

    @property
    def unit(self) -> int:
        return len(self.batches)

    @property
    def batch_size(self) -> int:
        return len(self.batches[0])

    @property
    def num_sequences(self) -> int:
        return self.unit * self.batch_size

    @property
    def permutation(self) -> np.ndarray:
        """(N,): new position p (batch p // B, row p % B) holds waiting sequence permutation[p]."""
        return np.array([i for b in self.batches for i in b], dtype=np.int64)

    @property
    def batch_of(self) -> np.ndarray:
        """(N,): the batch each waiting sequence goes to."""
        out = np.empty(self.num_sequences, dtype=np.int64)
        for b, members in enumerate(self.batches):
            out[list(members)] = b
        return out

    def canonical(self) -> "Grouping":
        return Grouping.from_labels(self.batch_of, self.unit)


def distinct_pairs(paths: np.ndarray, grouping: Grouping) -> np.ndarray:
    """(U,) distinct (layer, expert) pairs each batch activates; paths bool (N, L, E)."""
    if len(paths) != grouping.num_sequences:
        raise ValueError(f"grouping covers {grouping.num_sequences} sequences but paths hold {len(paths)}")
    return np.array([int(paths[list(b)].any(0).sum()) for b in grouping.batches], dtype=np.int64)


def total_distinct(paths: np.ndarray, grouping: Grouping) -> int:
    """The paper's Eq. 2 objective: distinct pairs summed over the unit's batches."""
    return int(distinct_pairs(paths, grouping).sum())


def expected_distinct(probs: np.ndarray, grouping: Grouping) -> float:
    """Eq. 2 in expectation over independent activations: sum over batches and (l, e) of
    1 - prod_{i in batch} (1 - p_ile); probs float (N, L, E) in [0, 1]. Equals `total_distinct` on 0/1 input."""
    probs = routing_probabilities(probs)
    if len(probs) != grouping.num_sequences:
        raise ValueError(f"grouping covers {grouping.num_sequences} sequences but probabilities hold {len(probs)}")
    return float(sum((1.0 - np.prod(1.0 - probs[list(b)], axis=0)).sum() for b in grouping.batches))


class Scheduler(ABC):
    """Groups the N = U * B sequences of one scheduling unit into U batches of B."""

    name: ClassVar[str]
    takes_probabilities: ClassVar[bool] = True   # False: needs 0/1 paths (give it the top-k instead)

    def group(self, routing: np.ndarray, batch_size: int, unit: int = 2, num_experts: int | None = None, *,
              probabilities: bool = False) -> Grouping:
        """routing: bool (N, L, E) paths, or int (N, L, K) expert ids with num_experts; with
        probabilities=True, float (N, L, E) activation probabilities (the objective is then its expectation)."""
        if probabilities and not self.takes_probabilities:
            raise ValueError(f"scheduler {self.name!r} needs 0/1 routing paths, not probabilities; take the "
                             f"top-k of the probabilities first")
        routing = routing_probabilities(routing) if probabilities else routing_paths(routing, num_experts)
        check_unit(len(routing), batch_size, unit)
        return self._group(routing, batch_size, unit)

    @abstractmethod
    def _group(self, routing: np.ndarray, batch_size: int, unit: int) -> Grouping:
        """routing: validated (N, L, E), bool paths or float64 probabilities in [0, 1]; N == batch_size * unit."""
