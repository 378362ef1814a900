"""The fast tier: a fixed pool of preallocated-on-first-use expert slots on the compute device.

Slot bookkeeping and counters live in `Residency` (pure Python, shared with the simulator); this class
adds the tensors: it owns the slot buffers and copies experts in from the slow-tier store. On CUDA the
copy runs on a side stream from pinned host memory and the compute stream waits only for that copy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from expertflow.policies import Key
from expertflow.residency import CacheCounters, Residency
from expertflow.store import ExpertStore


@dataclass(frozen=True)
class CacheFigures:
    """A snapshot of the cache's counters and sizes, in the units front ends print."""

    counters: CacheCounters
    capacity_experts: int
    expert_bytes: int
    peak_expert_bytes: int
    all_expert_bytes: int

    @property
    def bytes_moved(self) -> int:
        return self.counters.loads * self.expert_bytes


class ExpertCache:
    def __init__(self, residency: Residency, store: ExpertStore, device: torch.device) -> None:
        self.residency = residency
        self.store = store
        self.device = device
        self._slots: list[torch.Tensor | None] = [None] * residency.capacity
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.peak_bytes = 0
        for key in residency.policy.initial_residents():
            self._fill(key, self.residency.prefetch(key))

    @property
    def expert_bytes(self) -> int:
        return self.store.expert_bytes

    def acquire(self, key: Key) -> torch.Tensor:
        """The expert's flat weights in the fast tier, loading it on a miss; pinned until `release`."""
        with self._lock:
            placement = self.residency.use(key)
            self.residency.pin(key)
            if placement.loaded:
                self._fill(key, placement)
            return self._slots[placement.slot]

    def release(self, key: Key) -> None:
        with self._lock:
            self.residency.unpin(key)

    def _fill(self, key: Key, placement) -> None:
        slot = self._slots[placement.slot]
        if slot is None:
            slot = torch.empty(self.store.numel, dtype=self.store.dtype, device=self.device)
            self._slots[placement.slot] = slot
            self.peak_bytes = max(self.peak_bytes, self._allocated_bytes())
        if self._stream is None:
            self.store.read_into(key, slot)
            return
        compute = torch.cuda.current_stream(self.device)
        # The slot may still be read by kernels queued on the compute stream: wait for them first.
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            self.store.read_into(key, slot)
        compute.wait_stream(self._stream)

    def _allocated_bytes(self) -> int:
        return sum(1 for s in self._slots if s is not None) * self.expert_bytes

    def figures(self) -> CacheFigures:
        with self._lock:
            return CacheFigures(
                counters=self.residency.counters.copy(),
                capacity_experts=self.residency.capacity,
                expert_bytes=self.expert_bytes,
                peak_expert_bytes=self.peak_bytes,
                all_expert_bytes=len(self.store.refs) * self.expert_bytes,
            )
