"""The slow tier's two clocks, measured while the engine runs.

`TransferClock`: one expert transfer's time in layers of compute (exponential averages of both), handed to
the policy before each forward, since how far ahead a prefetch that evicts must be issued depends on the
hardware by orders of magnitude. `ReadMeter`: how much of a run the slow tier spent reading, from the reads
themselves: `read_seconds` (each read's own time, summed) and `busy_seconds` (the union of their intervals),
whose ratio to the reads is the run's own cost of one read at the concurrency it ran with.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_WEIGHT = 0.2  # of the newest sample in each average


class TransferClock:
    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._transfer: float | None = None
        self._layer: float | None = None
        self._mark: float | None = None          # when the previous layer ended (or the forward began)
        self._wait_at_mark = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA copies not yet timed

    def transfer(self, seconds: float) -> None:
        """One transfer took `seconds` (any thread)."""
        with self._lock:
            self._transfer = _average(self._transfer, seconds)

    def cuda_transfer(self, start: torch.cuda.Event, done: torch.cuda.Event) -> None:
        """A copy enqueued on a side stream between two timing events; timed once it has run."""
        with self._lock:
            self._pending.append((start, done))

    def forward_start(self, waited: float) -> None:
        """A forward begins; `waited` is the cache's running total of transfer-wait seconds."""
        self._collect_cuda()
        self._mark, self._wait_at_mark = self._now(), waited

    def layer_done(self, waited: float) -> None:
        """A layer's experts ran; its compute is the time since the previous mark minus its waits."""
        now = self._now()
        if self._mark is not None:
            compute = (now - self._mark) - (waited - self._wait_at_mark)
            if compute > 0:
                self._layer = _average(self._layer, compute)
        self._mark, self._wait_at_mark = now, waited

    def layers_per_transfer(self) -> float:
        """The measured ratio; 0 until both a transfer and a layer have been timed."""
        with self._lock:
            transfer = self._transfer
        return transfer / self._layer if transfer is not None and self._layer else 0.0

    def _collect_cuda(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for start, done in pending:
            if done.query():
                self.transfer(start.elapsed_time(done) / 1e3)
            else:
                with self._lock:
                    self._pending.append((start, done))


def _average(current: float | None, sample: float) -> float:
    return sample if current is None else (1 - _WEIGHT) * current + _WEIGHT * sample



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
