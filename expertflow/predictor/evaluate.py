"""Evaluate routing predictors over generated tokens, batched as the engine batches them.

Shape legend: N sequences, G generated positions of a sequence, B batch size, L layers, E experts.

A batch is B sequences at the same decoding step: sequences are shuffled (fixed seed) so that runs of
one prompt do not share a batch, grouped B at a time, and step j of a group is the batch of the j-th
generated tokens of the group's sequences that have one. Every method scores every generated token
once (scores (G, L, E) per sequence); batches are then cut from those scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from expertflow.predictor.metrics import MetricAccumulator, routing_mask
from expertflow.traces import TraceSequence, TraceSet

# A scorer maps (sequence, positions (G,)) -> scores (G, L, E); higher means more likely active.
Scorer = Callable[[TraceSequence, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 1
    budget: int | None = None   # experts per layer for the fixed-budget metric; None: see default_budget
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be >= 1, got {self.budget}")


def generated_positions(seq: TraceSequence) -> np.ndarray:
    start = len(seq.prompt_ids)
    return np.arange(start, start + len(seq.generated_ids))


def batches(traces: TraceSet, batch_size: int, seed: int) -> list[list[tuple[int, int]]]:
    """Each batch as (sequence index, generated step) pairs."""
    order = np.random.default_rng(seed).permutation(len(traces.sequences))
    out = []
    for g in range(0, len(order), batch_size):
        group = order[g : g + batch_size]
        steps = max((len(traces.sequences[i].generated_ids) for i in group), default=0)
        for j in range(steps):
            batch = [(int(i), j) for i in group if len(traces.sequences[i].generated_ids) > j]
            out.append(batch)
    return out


def default_budget(traces: TraceSet, batch_list: list[list[tuple[int, int]]]) -> int:
    """Mean number of distinct experts per layer a batch truly uses, rounded: a budget that neither
    starves recall nor gifts it, the same number for every method."""
    E = traces.header.num_experts
    sizes = [routing_mask(np.stack([traces.sequences[i].routing[len(traces.sequences[i].prompt_ids) + j]
                                    for i, j in batch]), E).any(0).sum(-1).mean() for batch in batch_list]
    return max(1, int(round(float(np.mean(sizes))))) if sizes else traces.header.top_k


def evaluate(traces: TraceSet, scorers: Mapping[str, Scorer], config: EvalConfig) -> dict[str, dict]:
    h = traces.header
    batch_list = batches(traces, config.batch_size, config.seed)
    budget = config.budget or default_budget(traces, batch_list)
    truth = [routing_mask(s.routing[generated_positions(s)], h.num_experts) for s in traces.sequences]
    results = {}
    for name, scorer in scorers.items():
        scores = [scorer(s, generated_positions(s)) for s in traces.sequences]   # N x (G, L, E)
        acc = MetricAccumulator(h.num_layers, h.top_k, budget)
        for batch in batch_list:
            acc.add(np.stack([truth[i][j] for i, j in batch]), np.stack([scores[i][j] for i, j in batch]))
        results[name] = acc.result()
    return results
