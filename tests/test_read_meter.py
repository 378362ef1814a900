"""The slow tier's busy time counts each moment a read runs once, however many run at once; the engine's
stats count one read per copy into the fast tier."""

from __future__ import annotations

import threading

import pytest

from expertflow.cache.timing import ReadFigures, ReadMeter


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_overlapping_reads_count_their_union_as_busy_and_each_duration_in_full():
    clock = _Clock()
    meter = ReadMeter(clock)
    first = meter.timed()
    first.__enter__()            # t=0: read A starts
    clock.t = 2.0
    second = meter.timed()
    second.__enter__()           # t=2: read B starts beside it
    clock.t = 5.0
    first.__exit__(None, None, None)   # A took 5 s
    clock.t = 6.0
    assert meter.figures() == ReadFigures(1, 5.0, 6.0)  # B still running: busy counts up to now
    clock.t = 7.0
    second.__exit__(None, None, None)  # B took 5 s; the device was busy 0-7
    clock.t = 10.0                     # idle 7-10
    with meter.timed():
        clock.t = 11.0                 # C: 10-11
    assert meter.figures() == ReadFigures(3, 11.0, 8.0)
    assert meter.figures().minus(ReadFigures(1, 5.0, 6.0)) == ReadFigures(2, 6.0, 2.0)


def test_a_failed_read_still_closes_its_interval():
    clock = _Clock()
    meter = ReadMeter(clock)
    with pytest.raises(OSError):
        with meter.timed():
            clock.t = 3.0
            raise OSError("short read")
    clock.t = 9.0
    assert meter.figures() == ReadFigures(1, 3.0, 3.0)


def test_threads_reading_at_once_leave_consistent_totals():
    meter = ReadMeter()
    barrier = threading.Barrier(4)

    def reads() -> None:
        barrier.wait()
        for _ in range(200):
            with meter.timed():
                pass

    threads = [threading.Thread(target=reads) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    figures = meter.figures()
    assert figures.reads == 800
    assert 0.0 <= figures.busy_seconds <= figures.read_seconds + 1e-9


@pytest.mark.parametrize("policy", ["lru", "expertflow"])
def test_a_runs_stats_count_one_read_per_copy_it_ran(embedded_model_dir, policy):
    from expertflow.api import ExpertflowModel
    from expertflow.config import EngineConfig
    from tests.test_policy_exactness import HashPredictor

    predictor = HashPredictor(8, 32) if policy == "expertflow" else None  # wrong: many evicted in flight
    model = ExpertflowModel(EngineConfig(model=embedded_model_dir, cache_experts=24, policy=policy, store="disk",
                                         page_cache=False), predictor)
    try:
        model.generate(input_ids=[[1, 306, 4966, 17]], max_new_tokens=6)
        stats = model.stats
    finally:
        model.close()
    if policy == "lru":  # demand loads only: each is read once, on the layer's thread, one at a time
        assert stats.transfer_reads == stats.expert_loads > 24
        assert stats.transfer_busy_seconds == pytest.approx(stats.transfer_read_seconds, rel=1e-6)
    else:  # a prefetch whose slot was handed on before any reader started it is never read
        assert 0 < stats.transfer_reads <= stats.expert_loads
        assert 0 < stats.transfer_busy_seconds <= stats.transfer_read_seconds + 1e-9
    assert stats.busy_ms_per_read == pytest.approx(1e3 * stats.transfer_busy_seconds / stats.transfer_reads)
