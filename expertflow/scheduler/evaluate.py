"""Trace replay for token schedulers: how many distinct experts each batch activates, per scheduler.

Shape legend: N = U * B sequences of a unit, G generated tokens of a sequence, L layers, E experts.

Sequences are cut into units of U * B in input order (as fifo batching would); step j of a unit is one
scheduling instance: the routing of each sequence's j-th generated token, for the steps where all the
unit's sequences still decode (a unit with finished sequences would need refilling, which is the
engine's business). Each scheduler groups every instance from its input routing (true; predicted =
the top-k of the predictor's probabilities; predicted-prob = the probabilities themselves, scheduled on
the expected distinct pairs); the grouping is always scored on the TRUE routing. The exact solver gives
the optimum where it can.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from expertflow.scheduler import SCHEDULERS, ExactLimitError, Grouping, Scheduler, total_distinct
from expertflow.scheduler.exact import solve
from expertflow.scheduler.exhaustive import partition_count
from expertflow.traces import TraceSet

# Per sequence, (G, L, E) routing of its generated tokens: bool paths, or float probabilities.
Paths = list[np.ndarray]


@dataclass(frozen=True)
class ScheduleEvalConfig:
    batch_sizes: tuple[int, ...] = (4, 8, 16)
    units: tuple[int, ...] = (2, 4)
    schedulers: tuple[str, ...] = ("fifo", "similarity", "swap")
    exact_nodes: int = 200_000            # branch-and-bound budget per instance
    exact_instances: int = 40             # instances per (B, U, routing) given to the exact solver
    exact_max_partitions: float = 1e9     # skip exact where the balanced partitions exceed this

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1 or not self.units or min(self.units) < 1:
            raise ValueError(f"batch sizes and units must be non-empty lists of integers >= 1, got "
                             f"{self.batch_sizes}, {self.units}")
        unknown = [s for s in self.schedulers if s not in SCHEDULERS or s == "exact"]
        if unknown or not self.schedulers:
            raise ValueError(f"unknown schedulers {unknown}; choose from "
                             f"{', '.join(s for s in SCHEDULERS if s != 'exact')} (exact is reported as the gap)")
        if self.exact_nodes < 1 or self.exact_instances < 0:
            raise ValueError(f"exact_nodes must be >= 1 and exact_instances >= 0, got "
                             f"{self.exact_nodes}, {self.exact_instances}")


@dataclass
class Row:
    """One (batch size, unit, routing source, scheduler) cell of the evaluation."""

    batch_size: int
    unit: int
    routing: str                      # "true", "predicted" or "predicted-prob": what the scheduler saw
    scheduler: str
    instances: int
    distinct_per_batch: float         # mean over batches, scored on the true routing
    reduction_vs_fifo: float          # 1 - distinct / fifo's distinct
    schedule_ms: float                # mean wall time of one group() call
    exact_tried: int = 0              # instances given to the exact solver
    exact_solved: int = 0             # of those, where it proved the optimum within its node budget
    gap_to_exact: float | None = None  # (cost - optimum) / optimum summed over solved instances, true routing


def generated_paths(traces: TraceSet) -> Paths:
    """True routing paths of every sequence's generated tokens."""
    E = traces.header.num_experts
    out = []
    for seq in traces.sequences:
        ids = seq.routing[len(seq.prompt_ids):].astype(np.int64)             # (G, L, K)
        mask = np.zeros((*ids.shape[:2], E), dtype=bool)
        np.put_along_axis(mask, ids, True, axis=-1)
        out.append(mask)
    return out


def instances(true: Paths, inputs: Paths, batch_size: int, unit: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(true (N, L, E), scheduler input (N, L, E)) for every full step of every full unit."""
    n = batch_size * unit
    out = []
    for start in range(0, len(true) - n + 1, n):
        members = range(start, start + n)
        steps = min(len(true[i]) for i in members)
        for j in range(steps):
            out.append((np.stack([true[i][j] for i in members]), np.stack([inputs[i][j] for i in members])))
    return out


def optimum(paths: np.ndarray, batch_size: int, unit: int, node_limit: int) -> int | None:
    try:
        return solve(paths, batch_size, unit, node_limit)[1]
    except ExactLimitError:
        return None


def true_optima(cases: list[tuple[np.ndarray, np.ndarray]], batch_size: int, unit: int,
                config: ScheduleEvalConfig) -> dict[int, int | None]:
    """Instance id -> optimum on the true routing (None: over the node budget), for a spread sample."""
    ids = _exact_sample(len(cases), batch_size, unit, config)
    return {i: optimum(cases[i][0], batch_size, unit, config.exact_nodes) for i in ids}


def evaluate_cell(cases: list[tuple[np.ndarray, np.ndarray]], batch_size: int, unit: int, routing: str,
                  optima: dict[int, int | None], config: ScheduleEvalConfig, probabilities: bool = False) -> list[Row]:
    """All schedulers on one (B, U, routing) set of instances; the first row is fifo."""
    solved = {i: c for i, c in optima.items() if c is not None}
    names = ["fifo", *(s for s in config.schedulers if s != "fifo")]
    rows = []
    for name in names:
        costs, seconds = _run(SCHEDULERS[name](), cases, batch_size, unit, probabilities)
        fifo = rows[0].distinct_per_batch if rows else None
        mean = float(np.mean(costs)) / unit
        gap = (sum(costs[i] for i in solved) / sum(solved.values()) - 1.0) if solved else None
        rows.append(Row(batch_size, unit, routing, name, len(cases), mean,
                        1.0 - mean / fifo if fifo else 0.0, 1e3 * seconds / max(len(cases), 1),
                        len(optima), len(solved), gap))
    return rows


def _run(scheduler: Scheduler, cases: list[tuple[np.ndarray, np.ndarray]], batch_size: int,
         unit: int, probabilities: bool) -> tuple[list[int], float]:
    costs, seconds = [], 0.0
    for true, seen in cases:
        start = time.perf_counter()
        grouping: Grouping = scheduler.group(seen, batch_size, unit, probabilities=probabilities)
        seconds += time.perf_counter() - start
        costs.append(total_distinct(true, grouping))
    return costs, seconds


def _exact_sample(count: int, batch_size: int, unit: int, config: ScheduleEvalConfig) -> list[int]:
    """Evenly spread instance ids for the exact solver, none where the unit is far too large."""
    if partition_count(batch_size, unit) > config.exact_max_partitions or config.exact_instances == 0:
        return []
    take = min(count, config.exact_instances)
    return sorted({int(i) for i in np.linspace(0, count - 1, take)}) if take else []


def evaluate(true: Paths, predicted: Paths | None, config: ScheduleEvalConfig,
             probabilities: Paths | None = None) -> list[Row]:
    """Rows per (U, B, routing, scheduler); a (U, B) with no full unit in the trace has no rows.
    predicted: bool paths (the predictor's top-k); probabilities: its float (G, L, E) per sequence."""
    rows = []
    sources: Sequence[tuple[str, Paths, bool]] = [("true", true, False)]
    sources += [("predicted", predicted, False)] if predicted else []
    sources += [("predicted-prob", probabilities, True)] if probabilities else []
    for unit in config.units:
        for batch_size in config.batch_sizes:
            if len(true) < batch_size * unit:
                continue
            optima = true_optima(instances(true, true, batch_size, unit), batch_size, unit, config)
            for routing, inputs, is_prob in sources:
                cases = instances(true, inputs, batch_size, unit)
                rows.extend(evaluate_cell(cases, batch_size, unit, routing, optima, config, is_prob))
    return rows
