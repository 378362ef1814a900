"""The fast tier: a fixed pool of preallocated-on-first-use expert slots on the compute device.

Slot bookkeeping and counters live in `Residency` and the per-forward order in `CachePlanner` (pure Python,
shared with the simulator); this class adds the tensors: it owns the slot buffers and copies experts in from
the slow-tier store. Policies that prefetch get a `TransferWorker`: copies run in the background (`io_threads`
at once) and a layer waits only for the experts it uses; demand copies jump the queue, and a layer copies an
expert it needs itself unless a reader has already started it, while the layer's next expert
is already queued for a reader (`CachePlanner.use`). On CUDA the copy runs on a side stream from
pinned host memory and the compute stream waits only for that copy; every reader thread enqueues on the same
side stream, so copies into a slot stay in the order the worker started them (the slow part, the disk read,
still runs in parallel on the host).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from expertflow.cache.policies import Forecast, Key
from expertflow.cache.planner import USE_AHEAD, CachePlanner, Issued
from expertflow.cache.transfers import DEMAND, PREFETCH, Transfer, TransferWorker
from expertflow.cache.timing import ReadFigures, ReadMeter
from expertflow.cache.residency import CacheCounters, Residency, SlotAssignment
from expertflow.cache.stores import ExpertStore
from expertflow.cache.timing import TransferClock


@dataclass(frozen=True)
class CacheFigures:
    """A snapshot of the cache's counters and sizes, in the units front ends print."""

    counters: CacheCounters
    capacity_experts: int
    expert_bytes: int
    peak_expert_bytes: int
    all_expert_bytes: int
    wait_seconds: float = 0.0  # time layers spent waiting for background transfers
    reads: ReadFigures = ReadFigures()  # the slow tier's reads (host side: on CUDA, up to the pinned copy)

    @property
    def bytes_moved(self) -> int:
        return self.counters.loads * self.expert_bytes


class ExpertCache:
    def __init__(self, residency: Residency, store: ExpertStore, device: torch.device,
                 transfer_ratio: float | None = None, background: bool = False, io_threads: int = 1) -> None:
        self.residency = residency
        # With a worker, a layer's next expert is used while this one is read or computed (see CachePlanner).
        self.planner = CachePlanner(residency, transfer_ratio, USE_AHEAD if background else 0)
        self.store = store
        self.device = device
        self.slot_bytes = store.slot_bytes(device)
        self._slots: list[torch.Tensor | None] = [None] * residency.capacity  # each slot's bytes (uint8)
        # The flat weights of the expert each slot was last given: a view into the slot's bytes where the
        # store chose to put it (`ExpertStore.place`: a disk store lines it up for a zero-copy read).
        self._flat: list[torch.Tensor | None] = [None] * residency.capacity
        self._generation = [0] * residency.capacity
        self._in_flight: dict[Key, Transfer] = {}
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._compute = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self._worker = TransferWorker(self._copy, self._is_current, io_threads) if background else None
        # Only prefetching policies time their transfers (PLEC's lead); an explicit transfer ratio is the
        # simulator's clock, kept as given.
        self._clock = TransferClock() if background and transfer_ratio is None else None
        self._reads = ReadMeter()
        self.peak_bytes = 0
        self.wait_seconds = 0.0
        for key in residency.policy.initial_residents():
            self._start(key, self.residency.preload(key), DEMAND)

    @property
    def expert_bytes(self) -> int:
        return self.store.expert_bytes

    def begin_step(self, forecast: Forecast | None, layers: Sequence[int] | None = None) -> None:
        """A forward over `layers` (default: every MoE layer) starts: the policy plans and the first
        window's prefetches go out."""
        with self._lock:
            if self._clock is not None:
                self._clock.forward_start(self.wait_seconds)
                self.residency.policy.set_transfer_time(self._clock.layers_per_transfer())
            self._issue(self.planner.begin_step(forecast, layers))

    def route(self, layer: int, keys: Sequence[Key]) -> None:
        with self._lock:
            self._issue(self.planner.route(layer, keys))

    def finish_layer(self, layer: int) -> None:
        with self._lock:
            if self._clock is not None:
                self._clock.layer_done(self.wait_seconds)
            self._issue(self.planner.finish_layer(layer))

    def acquire(self, key: Key) -> torch.Tensor:
        """The expert's flat weights in the fast tier, loading it on a miss; pinned until `release`."""
        with self._lock:
            for used, placement in self.planner.use(key):
                if placement.loaded:  # this key's copy runs on this thread in `_await`; a reader takes those ahead
                    self._start(used, placement, DEMAND, queued=used != key)
            transfer = self._in_flight.pop(key, None)
            slot = self._flat[self.residency.slot_of[key]]
        if transfer is not None:
            self._await(transfer)
        return slot

    def record_uses(self) -> tuple[list[Key], list[Key]]:
        """(the experts resident now, the list every later demand use is appended to): see `Residency`."""
        with self._lock:
            return self.residency.record_uses()

    def stop_recording(self) -> None:
        with self._lock:
            self.residency.stop_recording()

    def release(self, key: Key) -> None:
        with self._lock:
            self.planner.release(key)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()

    def _issue(self, issued: list[Issued]) -> None:
        for key, placement in issued:
            self._start(key, placement, PREFETCH)

    def _start(self, key: Key, placement: SlotAssignment, priority: int, queued: bool = True) -> None:
        """Fill `placement`'s slot with `key`: now without a worker, else as a queued transfer (or, not
        `queued`, one the caller runs itself when it awaits it)."""
        if placement.evicted is not None:
            self._in_flight.pop(placement.evicted, None)
        self._generation[placement.slot] += 1
        if self._slots[placement.slot] is None:
            self._slots[placement.slot] = torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
            self.peak_bytes = max(self.peak_bytes, self._allocated_bytes())
        self._flat[placement.slot] = self.store.place(key, self._slots[placement.slot])
        if self._worker is None:
            self._wait_event(self._copy(key, placement.slot))
            return
        generation = self._generation[placement.slot]
        self._in_flight[key] = (self._worker.submit(key, placement.slot, generation, priority) if queued
                                else self._worker.track(key, placement.slot, generation))

    def _await(self, transfer: Transfer) -> None:
        start = time.perf_counter()
        self._wait_event(self._worker.finish(transfer))
        self.wait_seconds += time.perf_counter() - start

    def _is_current(self, slot: int, generation: int) -> bool:
        return self._generation[slot] == generation

    @torch.inference_mode()  # slots made during generation are inference tensors; the worker thread must match
    def _copy(self, key: Key, slot_index: int) -> torch.cuda.Event | None:
        slot = self._flat[slot_index]
        if self._stream is None:
            start = time.perf_counter()
            with self._reads.timed():
                self.store.read_into(key, slot)
            if self._clock is not None:
                self._clock.transfer(time.perf_counter() - start)
            return None
        # The slot may still be read by kernels queued on the compute stream: wait for them first.
        self._stream.wait_stream(self._compute)
        with torch.cuda.stream(self._stream):
            began = torch.cuda.Event(enable_timing=self._clock is not None)
            began.record(self._stream)
            with self._reads.timed():
                self.store.read_into(key, slot)
            done = torch.cuda.Event(enable_timing=self._clock is not None)
            done.record(self._stream)
        if self._clock is not None:
            self._clock.cuda_transfer(began, done)
        return done

    def _wait_event(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _allocated_bytes(self) -> int:
        return sum(1 for s in self._slots if s is not None) * self.slot_bytes

    def figures(self) -> CacheFigures:
        with self._lock:
            return CacheFigures(
                counters=self.residency.counters.copy(),
                capacity_experts=self.residency.capacity,
                expert_bytes=self.expert_bytes,
                peak_expert_bytes=self.peak_bytes,
                all_expert_bytes=len(self.store.refs) * self.expert_bytes,
                wait_seconds=self.wait_seconds,
                reads=self._reads.figures(),
            )
