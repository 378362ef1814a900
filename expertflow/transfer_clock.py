"""How many layers of compute one expert transfer takes, measured while the engine runs.

A policy that prefetches has to know how far ahead to issue a transfer that evicts (PLEC's lead). That
depends on the hardware by orders of magnitude: a host-RAM copy of a small expert takes a fraction of a
layer, a page-cache-bypassing disk read of a 6 MiB expert about two layers of batch-1 decode here, a PCIe
copy of a large model's expert tens of layers on a GPU. The clock keeps exponential averages of a
transfer's duration and of a layer's compute (the time between consecutive layers' ends, minus what the
layer spent waiting for transfers), and their ratio is handed to the policy before each forward.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

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
