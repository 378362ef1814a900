"""The transfer worker: demand before prefetch, stale transfers skipped, failures raised in the caller."""

from __future__ import annotations

import threading

import pytest
import torch

from expertflow.cache import ExpertCache
from expertflow.errors import ExpertflowError
from expertflow.policies.plec import PLECPolicy
from expertflow.prefetch import DEMAND, PREFETCH, TransferWorker
from expertflow.residency import Residency


class _Gate:
    """A copy function that blocks until opened and records the order of copies."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.started = threading.Event()
        self.order: list[tuple[int, int]] = []

    def __call__(self, key, slot):
        self.started.set()
        self.open.wait(timeout=5)
        self.order.append(key)


def test_demand_transfers_jump_the_prefetch_queue():
    gate = _Gate()
    worker = TransferWorker(gate, lambda slot, generation: True)
    first = worker.submit((0, 0), 0, 1, PREFETCH)
    gate.started.wait(timeout=5)  # the worker holds the first transfer, blocked on the gate
    prefetches = [worker.submit((0, e), e, 1, PREFETCH) for e in (1, 2)]
    demand = worker.submit((1, 7), 3, 1, DEMAND)
    worker.expedite(prefetches[1])
    gate.open.set()
    for transfer in (first, *prefetches, demand):
        worker.wait(transfer)
    assert gate.order == [(0, 0), (1, 7), (0, 2), (0, 1)]
    worker.close()


def test_a_stale_transfer_is_skipped():
    gate = _Gate()
    gate.open.set()
    worker = TransferWorker(gate, lambda slot, generation: generation == 2)
    stale, current = worker.submit((0, 1), 0, 1, PREFETCH), worker.submit((0, 2), 0, 2, PREFETCH)
    worker.wait(current)
    assert stale.future.cancelled() and gate.order == [(0, 2)]
    worker.close()


def test_a_failing_copy_raises_in_the_waiting_caller():
    def copy(key, slot):
        raise OSError("disk gone")

    worker = TransferWorker(copy, lambda slot, generation: True)
    with pytest.raises(ExpertflowError, match="disk gone"):
        worker.wait(worker.submit((0, 1), 0, 1, DEMAND))
    worker.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
def test_a_dead_worker_fails_waiters_instead_of_hanging():
    started = threading.Event()

    def copy(key, slot):
        started.set()
        raise SystemExit  # not an Exception: it ends the worker thread itself

    worker = TransferWorker(copy, lambda slot, generation: True)
    blocked = worker.submit((0, 1), 0, 1, PREFETCH)
    queued = worker.submit((0, 2), 1, 1, PREFETCH)
    started.wait(timeout=5)
    with pytest.raises(ExpertflowError):
        worker.wait(queued)
    with pytest.raises(ExpertflowError):
        worker.wait(blocked)
    with pytest.raises(ExpertflowError, match="not running"):
        worker.submit((0, 3), 2, 1, DEMAND)


class _FailingStore:
    numel, dtype, expert_bytes, refs = 4, torch.float32, 16, {}

    def read_into(self, key, out):
        raise RuntimeError(f"cannot read expert {key}")


def test_live_cache_surfaces_a_failing_worker_in_the_layer():
    policy = PLECPolicy(4, [0, 1], 8, 2)
    cache = ExpertCache(Residency(4, policy), _FailingStore(), torch.device("cpu"), background=True)
    cache.begin_step({(0, 1): 0.9, (1, 2): 0.9})  # prefetches go to the worker and fail there
    cache.route(0, [(0, 1)])
    with pytest.raises(ExpertflowError, match="cannot read expert"):
        cache.acquire((0, 1))
    cache.close()
