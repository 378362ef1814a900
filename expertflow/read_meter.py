"""How much of a run the slow tier spent reading experts, counted from the reads themselves.

A cache's reads run on reader threads and on the model's thread, often several at once. Two figures tell
what the slow tier gave the run: `read_seconds`, each read's own duration summed (a read stretched by
others running beside it counts in full), and `busy_seconds`, the time at least one read was running (the
union of the reads' intervals). `busy_seconds / reads` is the run's own cost of one expert read at the
concurrency it ran with: the figure a bound on any policy's speed on this device should use, rather than
a single read timed before the run (this machine's disk speed drifts by a third within minutes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class ReadFigures:
    reads: int = 0
    read_seconds: float = 0.0
    busy_seconds: float = 0.0

    def minus(self, before: "ReadFigures") -> "ReadFigures":
        return ReadFigures(self.reads - before.reads, self.read_seconds - before.read_seconds,
                           self.busy_seconds - before.busy_seconds)


class ReadMeter:
    """Thread-safe: any thread wraps each read in `timed()`."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._reads = 0
        self._read_seconds = 0.0
        self._busy_seconds = 0.0
        self._running = 0
        self._busy_since = 0.0

    @contextmanager
    def timed(self) -> Iterator[None]:
        start = self._now()
        with self._lock:
            if self._running == 0:
                self._busy_since = start
            self._running += 1
        try:
            yield
        finally:
            end = self._now()
            with self._lock:
                self._running -= 1
                self._reads += 1
                self._read_seconds += end - start
                if self._running == 0:
                    self._busy_seconds += end - self._busy_since

    def figures(self) -> ReadFigures:
        """The totals so far; a busy interval still open counts up to now."""
        with self._lock:
            busy = self._busy_seconds + (self._now() - self._busy_since if self._running else 0.0)
            return ReadFigures(self._reads, self._read_seconds, busy)
