"""Background expert transfers: `readers` worker threads, one priority queue, a future per transfer.

Demand loads (a layer is waiting) go ahead of prefetches: a free reader always takes the most urgent queued
transfer. A layer that needs a transfer no reader has started runs the copy itself (`finish`), so a demand
load or a late prefetch costs no thread handoff (on a busy machine, waking a reader and being woken back costs
more than the copy). A transfer whose slot was handed to another expert before it started is skipped. Two
copies into the same slot never run at once: a slot can be reassigned while a copy into it is still running
(an in-flight prefetch may be evicted), so its next copy waits until that one has finished, and the last
assignment's bytes are the ones left in the slot. A failed copy fails its future, and the caller waiting on it
gets an `ExpertflowError`; if a reader itself stops, the worker stops and every waiter learns so within a poll
interval: no hangs.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

from expertflow.errors import ExpertflowError
from expertflow.cache.policies import Key

DEMAND, PREFETCH = 0, 1
_POLL_SECONDS = 0.2
_CLOSE_SECONDS = 5.0


@dataclass(eq=False)
class Transfer:
    key: Key
    slot: int
    generation: int  # the slot's assignment this transfer fills; stale once the slot is reassigned
    future: Future = field(default_factory=Future)


@dataclass(order=True)
class _Entry:
    priority: int
    order: int
    transfer: Transfer = field(compare=False)


class TransferWorker:
    """Runs `copy(key, slot)` for submitted transfers, demand first, on `readers` daemon threads at once."""

    def __init__(self, copy: Callable[[Key, int], object], is_current: Callable[[int, int], bool],
                 readers: int = 1) -> None:
        if readers < 1:
            raise ValueError(f"a transfer worker needs at least one reader thread, got {readers}")
        self._copy = copy
        self._is_current = is_current
        self._heap: list[_Entry] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._busy_slots: set[int] = set()  # slots a running copy is writing
        self._claiming = 0                  # callers of `finish` waiting for a busy slot
        self._closed = False
        self._stopped_by: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, name=f"expertflow-transfers-{i}", daemon=True)
                         for i in range(readers)]
        for thread in self._threads:
            thread.start()

    def submit(self, key: Key, slot: int, generation: int, priority: int) -> Transfer:
        transfer = Transfer(key, slot, generation)
        with self._cond:
            if self._closed or not self._running():
                raise ExpertflowError("the expert transfer worker is not running; reload the model")
            heapq.heappush(self._heap, _Entry(priority, next(self._order), transfer))
            self._cond.notify()
        return transfer

    def track(self, key: Key, slot: int, generation: int) -> Transfer:
        """A transfer the caller will run itself with `finish`: never queued, so no reader is woken for it."""
        if self._closed or not self._running():
            raise ExpertflowError("the expert transfer worker is not running; reload the model")
        return Transfer(key, slot, generation)

    def finish(self, transfer: Transfer) -> object:
        """A layer needs the transfer now: copy it on this thread unless a reader has started it (then wait)."""
        if self._claim(transfer):
            self._execute(transfer)
        return self.wait(transfer)

    def wait(self, transfer: Transfer) -> object:
        """The transfer's result; raises ExpertflowError if it failed or the worker stopped."""
        while True:
            try:
                return transfer.future.result(timeout=_POLL_SECONDS)
            except TimeoutError:
                if not self._running():
                    raise ExpertflowError(f"the expert transfer worker stopped ({self._stopped_by!r}) before "
                                          f"expert {transfer.key} arrived; reload the model") from self._stopped_by
            except CancelledError:
                raise RuntimeError(f"waited on a stale transfer of expert {transfer.key}") from None
            except Exception as exc:
                raise ExpertflowError(f"loading expert {transfer.key} failed: {exc}; check the model's "
                                      "safetensors files") from exc

    def close(self) -> None:
        """Finish the queued transfers, then stop every reader."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + _CLOSE_SECONDS
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _running(self) -> bool:
        return self._stopped_by is None and all(thread.is_alive() for thread in self._threads)

    def _next(self) -> Transfer | None:
        """The next transfer for a free reader, marked running; None once closed with nothing left to do."""
        with self._cond:
            while (transfer := self._take()) is None:
                if self._closed and not self._heap:
                    return None
                self._cond.wait()
            return transfer

    def _take(self) -> Transfer | None:
        """Pops the most urgent startable transfer (caller holds the lock); entries for a busy slot stay queued."""
        waiting: list[_Entry] = []
        found = None
        while self._heap and found is None:
            entry = heapq.heappop(self._heap)
            transfer = entry.transfer
            if transfer.future.done() or transfer.future.running():
                continue  # a layer's `finish` took it (copied or running it, or found it stale)
            if transfer.slot in self._busy_slots:
                waiting.append(entry)
            elif self._start(transfer):
                found = transfer
        for entry in waiting:
            heapq.heappush(self._heap, entry)
        return found

    def _claim(self, transfer: Transfer) -> bool:
        """Mark a transfer no reader has started as running on the calling thread, once no copy writes its
        slot; False if a reader has it, it is stale (cancelled), or the worker stopped (`wait` says so)."""
        with self._cond:
            self._claiming += 1
            try:
                while not (transfer.future.done() or transfer.future.running()):
                    if transfer.slot not in self._busy_slots:
                        return self._start(transfer)
                    if not self._running():
                        return False
                    self._cond.wait(timeout=_POLL_SECONDS)
                return False
            finally:
                self._claiming -= 1

    def _start(self, transfer: Transfer) -> bool:
        """Mark a queued or tracked transfer running (caller holds the lock); a stale one is cancelled."""
        if not self._is_current(transfer.slot, transfer.generation):
            transfer.future.cancel()
            return False
        transfer.future.set_running_or_notify_cancel()
        self._busy_slots.add(transfer.slot)
        return True

    def _run(self) -> None:
        try:
            while (transfer := self._next()) is not None:
                self._execute(transfer)
        except BaseException as exc:
            self._stopped_by = exc
            self._fail_pending()
            raise

    def _execute(self, transfer: Transfer) -> None:
        try:
            transfer.future.set_result(self._copy(transfer.key, transfer.slot))
        except Exception as exc:  # reaches the waiting caller through the future
            transfer.future.set_exception(exc)
        finally:
            with self._cond:
                self._busy_slots.discard(transfer.slot)
                if self._heap or self._claiming:  # a transfer behind this slot may start now (else wake nobody)
                    self._cond.notify_all()

    def _fail_pending(self) -> None:
        with self._cond:
            self._closed = True
            for entry in self._heap:
                future = entry.transfer.future
                if not (future.done() or future.running()):  # a running one is a layer's `finish` copying it
                    future.set_exception(RuntimeError("the transfer worker stopped"))
            self._heap.clear()
            self._cond.notify_all()
