"""`similarity`: the paper's balanced K-means-style clustering over routing paths (section 3.3.2).

Shape legend: N sequences, D = L * E flattened (layer, expert) pairs, U clusters (batches) of B.

Similarity S_ij = 1 - d_ij / (L * E) with d_ij the Hamming distance of the two routing paths; on
activation probabilities, its expectation sum_d p_id + p_jd - 2 p_id p_jd (the same formula). Centroids
are medoids (the member with the highest mean similarity to its cluster), as the paper updates them;
assignment is greedy by similarity under a capacity of B per cluster, so batches stay equal. The paper
clusters two batches; U clusters generalise it to a unit of U batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertflow.scheduler.base import Grouping, Scheduler


def similarity_matrix(flat: np.ndarray) -> np.ndarray:
    """flat bool paths or float probabilities (N, D) -> S (N, N) = 1 - (expected) Hamming / D."""
    x = flat.astype(np.float32)
    ones = x.sum(1)
    hamming = ones[:, None] + ones[None, :] - 2.0 * (x @ x.T)
    return 1.0 - hamming / flat.shape[1]


def farthest_first(sim: np.ndarray, unit: int) -> list[int]:
    """Seeds: the least similar pair, then repeatedly the sequence least similar to its nearest seed.
    Deterministic (argmin picks the lowest index), so a schedule is reproducible."""
    if unit == 1:
        return [0]
    # On probabilities S_ii < 1 (an uncertain sequence is not sure to match itself), so the diagonal
    # is left out; on paths S_ii = 1 is the largest value and this changes nothing.
    off = sim + np.diag(np.full(len(sim), np.inf))
    i, j = np.unravel_index(np.argmin(off), off.shape)
    seeds = [int(i), int(j)]
    while len(seeds) < unit:
        nearest = sim[:, seeds].max(1)
        nearest[seeds] = np.inf
        seeds.append(int(np.argmin(nearest)))
    return seeds


def balanced_assign(affinity: np.ndarray, batch_size: int) -> np.ndarray:
    """affinity (N, U) -> labels (N,): the most similar (sequence, cluster) pairs first, each cluster
    taking at most B sequences, so every cluster ends with exactly B."""
    n, unit = affinity.shape
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(unit, batch_size)
    for flat in np.argsort(-affinity, axis=None, kind="stable"):
        seq, cluster = divmod(int(flat), unit)
        if labels[seq] < 0 and room[cluster] > 0:
            labels[seq] = cluster
            room[cluster] -= 1
    return labels


def medoids(sim: np.ndarray, labels: np.ndarray, unit: int) -> list[int]:
    """Per cluster, the member with the highest mean similarity to the cluster's members."""
    out = []
    for c in range(unit):
        members = np.flatnonzero(labels == c)
        out.append(int(members[np.argmax(sim[np.ix_(members, members)].mean(1))]))
    return out


def cluster(flat: np.ndarray, batch_size: int, unit: int, max_iters: int) -> np.ndarray:
    """flat bool paths or float probabilities (N, D) -> labels (N,) after at most max_iters assign/update rounds."""
    sim = similarity_matrix(flat)
    centroids = farthest_first(sim, unit)
    labels = balanced_assign(sim[:, centroids], batch_size)
    for _ in range(max_iters - 1):
        centroids = medoids(sim, labels, unit)
        new = balanced_assign(sim[:, centroids], batch_size)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


@dataclass
class SimilarityScheduler(Scheduler):
    name = "similarity"
    max_iters: int = 10

    def __post_init__(self) -> None:
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")

    def _group(self, routing: np.ndarray, batch_size: int, unit: int) -> Grouping:
        labels = cluster(routing.reshape(len(routing), -1), batch_size, unit, self.max_iters)
        return Grouping.from_labels(labels, unit)
