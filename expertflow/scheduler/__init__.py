"""Token scheduling (paper section 3.3): which waiting sequences share a batch, by name.

`SCHEDULERS` maps the CLI's `--scheduler` names to classes; every scheduler returns a `Grouping`
of the unit's N = U * B sequences into U batches of B, scored by `distinct_pairs`/`total_distinct`
(on predicted probabilities, in expectation: `expected_distinct`).
"""

from __future__ import annotations

from expertflow.errors import ExpertflowError
from expertflow.scheduler.base import (Grouping, Scheduler, check_unit, distinct_pairs, expected_distinct,
                                       routing_paths, routing_probabilities, total_distinct)
from expertflow.scheduler.exact import ExactLimitError, ExactScheduler
from expertflow.scheduler.exhaustive import ExhaustiveScheduler
from expertflow.scheduler.fifo import FifoScheduler
from expertflow.scheduler.similarity import SimilarityScheduler
from expertflow.scheduler.swap import SwapScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (FifoScheduler, SimilarityScheduler, SwapScheduler, ExhaustiveScheduler, ExactScheduler)
}
# The schedulers a server runs live, every step (exact's branch and bound is for offline evaluation). Here, not in
# expertflow.server, so that `expertflow serve --help` lists them without the serve extra installed.
SERVE_SCHEDULERS: tuple[str, ...] = tuple(name for name in SCHEDULERS if name != ExactScheduler.name)


def scheduler_class(name: str) -> type[Scheduler]:
    try:
        return SCHEDULERS[name]
    except KeyError:
        raise ExpertflowError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}") from None


__all__ = ["SCHEDULERS", "SERVE_SCHEDULERS", "ExactLimitError", "Grouping", "Scheduler", "check_unit", "distinct_pairs",
           "expected_distinct", "routing_paths", "routing_probabilities", "scheduler_class", "total_distinct"]
