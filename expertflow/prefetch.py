"""Background expert transfers: one worker thread, a priority queue, a future per transfer.

Demand loads (a layer is waiting) go ahead of prefetches; a transfer whose slot was handed to another
expert before it started is skipped. A failed copy fails its future, and the caller waiting on it gets an
`ExpertflowError`; if the worker itself stops, every waiter learns so within a poll interval: no hangs.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

from expertflow.errors import ExpertflowError
from expertflow.policies import Key

DEMAND, PREFETCH = 0, 1
_POLL_SECONDS = 0.2


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
    """Runs `copy(key, slot)` for submitted transfers, demand first, in a daemon thread."""

    def __init__(self, copy: Callable[[Key, int], object], is_current: Callable[[int, int], bool]) -> None:
        self._copy = copy
        self._is_current = is_current
        self._heap: list[_Entry] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._stopped_by: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="expertflow-transfers", daemon=True)
        self._thread.start()

    def submit(self, key: Key, slot: int, generation: int, priority: int) -> Transfer:
        transfer = Transfer(key, slot, generation)
        self._push(transfer, priority)
        return transfer

    def expedite(self, transfer: Transfer) -> None:
        """A layer now waits for this transfer: move it ahead of the prefetches."""
        if not transfer.future.done():
            self._push(transfer, DEMAND)

    def wait(self, transfer: Transfer) -> object:
        """The transfer's result; raises ExpertflowError if it failed or the worker stopped."""
        while True:
            try:
                return transfer.future.result(timeout=_POLL_SECONDS)
            except TimeoutError:
                if not self._thread.is_alive():
                    raise ExpertflowError(f"the expert transfer worker stopped ({self._stopped_by!r}) before "
                                          f"expert {transfer.key} arrived; reload the model") from self._stopped_by
            except CancelledError:
                raise RuntimeError(f"waited on a stale transfer of expert {transfer.key}") from None
            except Exception as exc:
                raise ExpertflowError(f"loading expert {transfer.key} failed: {exc}; check the model's "
                                      "safetensors files") from exc

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _push(self, transfer: Transfer, priority: int) -> None:
        with self._cond:
            if self._closed or not self._thread.is_alive():
                raise ExpertflowError("the expert transfer worker is not running; reload the model")
            heapq.heappush(self._heap, _Entry(priority, next(self._order), transfer))
            self._cond.notify()

    def _next(self) -> Transfer | None:
        with self._cond:
            while not self._heap and not self._closed:
                self._cond.wait()
            return heapq.heappop(self._heap).transfer if self._heap else None

    def _run(self) -> None:
        try:
            while (transfer := self._next()) is not None:
                if transfer.future.done():
                    continue  # expedited copy of a transfer already done
                if not self._is_current(transfer.slot, transfer.generation):
                    transfer.future.cancel()
                    continue
                try:
                    transfer.future.set_result(self._copy(transfer.key, transfer.slot))
                except Exception as exc:  # reaches the waiting caller through the future
                    transfer.future.set_exception(exc)
        except BaseException as exc:
            self._stopped_by = exc
            raise
        finally:
            self._fail_pending()

    def _fail_pending(self) -> None:
        with self._cond:
            self._closed = True
            for entry in self._heap:
                if not entry.transfer.future.done():
                    entry.transfer.future.set_exception(RuntimeError("the transfer worker stopped"))
            self._heap.clear()
