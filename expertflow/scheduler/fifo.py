"""`fifo`: no regrouping; the unit's batches stay as the sequences arrived."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertflow.scheduler.base import Grouping, Scheduler


@dataclass
class FifoScheduler(Scheduler):
    name = "fifo"

    def _group(self, routing: np.ndarray, batch_size: int, unit: int) -> Grouping:
        return Grouping.identity(len(routing), batch_size)
