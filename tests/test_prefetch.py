"""The transfer worker: demand before prefetch, stale transfers skipped, failures raised in the caller;
with several readers, copies really overlap, a slot is never written by two at once, and offloaded greedy
tokens stay exact."""

from __future__ import annotations

import threading

import pytest
import torch

from expertflow.api import ExpertflowModel
from expertflow.cache.expert_cache import ExpertCache
from expertflow.cli import build_parser, main
from expertflow.cli.options import engine_config
from expertflow.config import EngineConfig
from expertflow.errors import ExpertflowError
from expertflow.cache.policies.plec import PLECPolicy
from expertflow.cache.transfers import DEMAND, PREFETCH, TransferWorker
from expertflow.cache.residency import Residency
from expertflow.cache.stores import ExpertStore
from tests.reference import reference_generate
from tests.test_policy_exactness import HashPredictor


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


def _held_reader():
    """A one-reader worker whose reader is held (until gate.open) on a first prefetch of (0, 0) -> (worker, gate,
    copies: (key, copying thread) in copy order, that first transfer)."""
    gate, copies = _Gate(), []

    def copy(key, slot):
        if key == (0, 0):
            gate(key, slot)
        copies.append((key, threading.current_thread().name))

    worker = TransferWorker(copy, lambda slot, generation: True)
    first = worker.submit((0, 0), 0, 1, PREFETCH)
    gate.started.wait(timeout=5)
    return worker, gate, copies, first


def test_demand_transfers_jump_the_prefetch_queue():
    # A queued demand (an initial resident) goes before queued prefetches; a layer's demand load (tracked,
    # never queued) goes before both, copied by `finish` on the layer's thread while the reader is busy.
    worker, gate, copies, first = _held_reader()
    prefetches = [worker.submit((0, e), e, 1, PREFETCH) for e in (1, 2)]
    demand = worker.submit((1, 7), 3, 1, DEMAND)
    worker.finish(worker.track((2, 5), 4, 1))  # returns while the reader is still blocked
    gate.open.set()
    for transfer in (first, *prefetches, demand):
        worker.wait(transfer)
    worker.close()
    layer, reader = threading.current_thread().name, "expertflow-transfers-0"
    assert copies == [((2, 5), layer), ((0, 0), reader), ((1, 7), reader), ((0, 1), reader), ((0, 2), reader)]


@pytest.mark.parametrize("readers", [1, 4])
def test_a_stale_transfer_is_skipped(readers):
    gate = _Gate()
    gate.open.set()
    worker = TransferWorker(gate, lambda slot, generation: generation == 2, readers)
    stale, current = worker.submit((0, 1), 0, 1, PREFETCH), worker.submit((0, 2), 0, 2, PREFETCH)
    worker.wait(current)
    assert stale.future.cancelled() and gate.order == [(0, 2)]
    worker.close()


@pytest.mark.parametrize("readers", [1, 4])
def test_a_failing_copy_raises_in_the_waiting_caller(readers):
    def copy(key, slot):
        if key == (0, 1):
            raise OSError("disk gone")

    worker = TransferWorker(copy, lambda slot, generation: True, readers)
    with pytest.raises(ExpertflowError, match="disk gone"):
        worker.wait(worker.submit((0, 1), 0, 1, DEMAND))
    assert worker.wait(worker.submit((0, 2), 1, 1, DEMAND)) is None  # one failed copy leaves the worker running
    worker.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
@pytest.mark.parametrize("readers", [1, 4])
def test_a_dead_worker_fails_waiters_instead_of_hanging(readers):
    started = threading.Event()

    def copy(key, slot):
        started.set()
        raise SystemExit  # not an Exception: it ends the worker thread itself

    worker = TransferWorker(copy, lambda slot, generation: True, readers)
    blocked = worker.submit((0, 1), 0, 1, PREFETCH)
    queued = worker.submit((0, 2), 1, 1, PREFETCH)
    started.wait(timeout=5)
    with pytest.raises(ExpertflowError):
        worker.wait(queued)
    with pytest.raises(ExpertflowError):
        worker.wait(blocked)
    with pytest.raises(ExpertflowError, match="not running"):
        worker.submit((0, 3), 2, 1, DEMAND)


class _FailingStore(ExpertStore):
    name, read_method = "failing", "raises"
    numel, dtype, expert_bytes, refs = 4, torch.float32, 16, {}

    def __init__(self) -> None:
        pass

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


class _Readers:
    """A copy function whose copies block, each until its key is released, and that logs starts and ends."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.released: set[tuple[int, int]] = set()
        self.log: list[tuple[str, tuple[int, int]]] = []
        self.threads: dict[tuple[int, int], str] = {}  # the thread that started each key's copy (the last)
        self.running = 0
        self.most_running = 0

    def __call__(self, key, slot):
        with self.cond:
            self.log.append(("start", key))
            self.threads[key] = threading.current_thread().name
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: key in self.released, timeout=5), f"{key} never released"
            self.running -= 1
            self.log.append(("end", key))

    def release(self, *keys) -> None:
        with self.cond:
            self.released.update(keys)
            self.cond.notify_all()

    def await_starts(self, count: int) -> list[tuple[int, int]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.started) >= count, timeout=5), self.log
            return self.started

    @property
    def started(self) -> list[tuple[int, int]]:
        return [key for event, key in self.log if event == "start"]


def test_four_readers_run_four_copies_at_once():
    barrier = threading.Barrier(4, timeout=5)  # breaks, failing every copy, unless 4 copies are in flight together

    def copy(key, slot):
        barrier.wait()

    worker = TransferWorker(copy, lambda slot, generation: True, readers=4)
    transfers = [worker.submit((0, e), e, 1, PREFETCH) for e in range(8)]
    for transfer in transfers:
        worker.wait(transfer)
    worker.close()


def test_a_demand_takes_the_next_free_reader_when_all_are_busy():
    readers = _Readers()
    worker = TransferWorker(readers, lambda slot, generation: True, readers=4)
    busy = [worker.submit((0, e), e, 1, PREFETCH) for e in range(4)]
    readers.await_starts(4)
    queued = [worker.submit((1, e), 4 + e, 1, PREFETCH) for e in range(2)]
    demand = worker.submit((2, 9), 6, 1, DEMAND)
    readers.release((0, 2))  # one reader frees up: the demand, submitted last, goes first
    assert readers.await_starts(5)[4] == (2, 9)
    readers.release((2, 9), (0, 0), (0, 1), (0, 3), (1, 0), (1, 1))
    for transfer in (*busy, *queued, demand):
        worker.wait(transfer)
    assert readers.started[5:] == [(1, 0), (1, 1)] and readers.most_running == 4
    worker.close()


def test_a_reassigned_slot_is_written_by_one_copy_at_a_time():
    readers = _Readers()
    current = {0: 1, 1: 1}
    worker = TransferWorker(readers, lambda slot, generation: current[slot] == generation, readers=4)
    old = worker.submit((0, 1), 0, 1, PREFETCH)
    readers.await_starts(1)
    current[0] = 2  # slot 0 is reassigned while the old copy into it still runs
    new = worker.submit((0, 2), 0, 2, DEMAND)
    other = worker.submit((0, 3), 1, 1, PREFETCH)
    assert readers.await_starts(2)[1] == (0, 3)  # a free reader passed over the new copy: its slot is busy
    readers.release((0, 1), (0, 2), (0, 3))
    for transfer in (old, new, other):
        worker.wait(transfer)
    assert readers.log.index(("end", (0, 1))) < readers.log.index(("start", (0, 2)))
    worker.close()


@pytest.mark.parametrize("readers", [1, 4])
def test_a_transfer_is_copied_once_whoever_takes_it(readers):
    copies = _Readers()
    worker = TransferWorker(copies, lambda slot, generation: True, readers)
    busy = [worker.submit((0, e), e, 1, PREFETCH) for e in range(readers)]
    copies.await_starts(readers)  # every reader is busy
    taken = worker.submit((1, 0), readers, 1, PREFETCH)
    marker = worker.submit((1, 1), readers + 1, 1, PREFETCH)  # queued behind `taken`
    copies.release((1, 0))
    worker.finish(taken)  # the layer copies it; its queue entry stays behind
    copies.release(*(transfer.key for transfer in busy), (1, 1))
    worker.wait(marker)  # a reader reached the marker, so it passed over the entry `finish` took
    for transfer in (taken, *busy):
        worker.finish(transfer)  # copied already: waited on, not copied again
    worker.close()
    assert sorted(copies.started) == sorted([*(transfer.key for transfer in busy), (1, 0), (1, 1)])
    assert copies.threads[(1, 0)] == threading.current_thread().name


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["serve"]])
def test_io_threads_flag_reaches_the_engine_config(command):
    args = build_parser().parse_args([*command, "--io-threads", "4"])
    assert engine_config(args).io_threads == 4
    assert engine_config(build_parser().parse_args(command)).io_threads == 1


def test_io_threads_below_one_is_a_one_line_error(capsys):
    assert main(["generate", "--prompt", "hi", "--io-threads", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "expertflow: error: --io-threads must be at least 1 (expert reads run at once), got 0"


EXACT_PROMPTS = [[5, 17, 33, 8, 41, 60, 12], [70, 3, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
EXACT_TOKENS = 10


@pytest.fixture(scope="module")
def embedded_reference(embedded_model_dir):
    return reference_generate(embedded_model_dir, EXACT_PROMPTS, EXACT_TOKENS, pad_token_id=1)[0]


@pytest.mark.parametrize("io_threads", [1, 4])
@pytest.mark.parametrize("policy", ["lru", "expertflow"])
def test_greedy_tokens_exact_with_parallel_disk_reads(embedded_model_dir, embedded_reference, policy, io_threads):
    # A wrong forecast makes many prefetches that are evicted while in flight: the hard case for several readers.
    predictor = HashPredictor(8, 32) if policy == "expertflow" else None
    config = EngineConfig(model=embedded_model_dir, cache_experts=24, policy=policy, store="disk",
                          page_cache=False, io_threads=io_threads)
    m = ExpertflowModel(config, predictor)
    try:
        assert m.generate(input_ids=EXACT_PROMPTS, max_new_tokens=EXACT_TOKENS).sequences == embedded_reference
        assert m.stats.expert_loads > 24  # the cache really turned over
    finally:
        m.close()


def test_finish_copies_a_queued_transfer_on_the_callers_thread_once():
    worker, gate, threads, busy = _held_reader()
    queued = worker.submit((0, 1), 1, 1, PREFETCH)
    worker.finish(queued)  # no reader is free: the caller copies it instead of waiting
    gate.open.set()
    worker.wait(busy)
    worker.close()
    assert threads == [((0, 1), threading.current_thread().name), ((0, 0), "expertflow-transfers-0")]


def test_finish_waits_for_a_running_copy_and_for_a_busy_slot():
    readers = _Readers()
    current = {0: 1}
    worker = TransferWorker(readers, lambda slot, generation: current[slot] == generation, readers=2)
    running = worker.submit((0, 1), 0, 1, PREFETCH)
    readers.await_starts(1)
    current[0] = 2  # slot 0 reassigned while its old copy runs: the demand copy waits for that one
    demand = worker.track((0, 2), 0, 2)
    readers.release((0, 2))
    done = threading.Thread(target=worker.finish, args=(demand,))
    done.start()
    assert readers.await_starts(1) == [(0, 1)]  # the demand has not started: its slot is busy
    readers.release((0, 1))
    done.join(timeout=5)
    worker.finish(running)  # already copied by a reader: nothing is copied again
    assert readers.started == [(0, 1), (0, 2)]
    assert readers.log.index(("end", (0, 1))) < readers.log.index(("start", (0, 2)))
    worker.close()


class _ThreadStore(ExpertStore):
    name, read_method = "thread", "records the reading thread"
    numel, dtype, expert_bytes, refs = 4, torch.float32, 16, {}

    def __init__(self) -> None:
        self.reads: list[tuple[tuple[int, int], str]] = []

    def read_into(self, key, out):
        self.reads.append((key, threading.current_thread().name))


def test_live_cache_copies_a_demand_load_on_the_layers_thread():
    store = _ThreadStore()
    cache = ExpertCache(Residency(4, PLECPolicy(4, [0, 1], 8, 2)), store, torch.device("cpu"), background=True)
    cache.begin_step({})
    cache.route(0, [(0, 5)])
    cache.acquire((0, 5))  # a miss: a demand load
    cache.release((0, 5))
    cache.close()
    assert store.reads == [((0, 5), threading.current_thread().name)]
