"""A layer's next routed expert is used ahead of the running one where a transfer worker can read it: the
planner's order of uses and pins, and the live cache reading two misses of one layer at once."""

from __future__ import annotations

import threading

import pytest
import torch

from expertflow.cache.expert_cache import ExpertCache
from expertflow.cache.policies import POLICIES
from expertflow.cache.policies.lru import LRUPolicy
from expertflow.cache.planner import CachePlanner
from expertflow.cache.policies.plec import PLECPolicy
from expertflow.cache.residency import Residency
from expertflow.cache.stores import ExpertStore

LAYER = [(0, 5), (0, 6), (0, 7)]


def _planner(use_ahead: int, capacity: int = 8) -> CachePlanner:
    planner = CachePlanner(Residency(capacity, PLECPolicy(capacity, [0, 1], 8, 2)), None, use_ahead)
    planner.begin_step({})
    planner.route(0, LAYER)
    return planner


def test_each_use_also_uses_the_next_key_of_the_layer_and_pins_it():
    planner = _planner(use_ahead=1)
    residency = planner.residency
    made = planner.use((0, 5))
    assert [(k, p.loaded) for k, p in made] == [((0, 5), True), ((0, 6), True)]
    assert set(residency._pins) == {(0, 5), (0, 6)}
    planner.release((0, 5))
    assert [k for k, _ in planner.use((0, 6))] == [(0, 7)]  # (0, 6) was used ahead: not used again
    planner.release((0, 6))
    assert planner.use((0, 7)) == []
    planner.release((0, 7))
    assert not residency._pins
    assert (residency.counters.correction_loads, residency.counters.loads) == (3, 3)


def test_without_use_ahead_each_use_is_its_own():
    planner = _planner(use_ahead=0)
    assert [k for k, _ in planner.use((0, 5))] == [(0, 5)]
    assert set(planner.residency._pins) == {(0, 5)}


def test_a_layer_that_stops_early_leaves_no_pin_behind():
    planner = _planner(use_ahead=2)
    planner.use((0, 5))
    planner.release((0, 5))
    planner.finish_layer(0)
    assert not planner.residency._pins
    assert planner.residency.counters.correction_loads == 3  # uses ahead count as uses, like the engine's


def test_use_ahead_below_zero_is_refused():
    with pytest.raises(ValueError, match="use_ahead"):
        CachePlanner(Residency(4, LRUPolicy(4, [0], 8, 2)), None, -1)


class _TwoReads(ExpertStore):
    """Holds the read of (0, 5) until another thread has started reading (0, 6) (or 5 s pass)."""

    name, read_method = "two reads", "records the reading thread"
    numel, dtype, expert_bytes, refs = 4, torch.float32, 16, {}

    def __init__(self) -> None:
        self.reads: list[tuple[tuple[int, int], str]] = []
        self.second_started = threading.Event()

    def read_into(self, key, out):
        if key == (0, 6):
            self.second_started.set()
        else:
            self.second_started.wait(timeout=5)
        self.reads.append((key, threading.current_thread().name))


def test_two_misses_of_one_layer_are_read_at_once_one_by_a_reader():
    store = _TwoReads()
    cache = ExpertCache(Residency(4, PLECPolicy(4, [0, 1], 8, 2)), store, torch.device("cpu"), background=True)
    try:
        cache.begin_step({})
        cache.route(0, LAYER[:2])
        for key in LAYER[:2]:
            cache.acquire(key)
            cache.release(key)
    finally:
        cache.close()
    me = threading.current_thread().name
    assert store.second_started.is_set()
    assert sorted(store.reads) == [((0, 5), me), ((0, 6), "expertflow-transfers-0")]
    assert cache.residency.counters.correction_loads == 2


def test_no_key_is_used_ahead_when_every_slot_is_pinned():
    planner = _planner(use_ahead=1, capacity=2)
    residency = planner.residency
    residency.use((1, 0))
    residency.pin((1, 0))  # another key holds one of the two slots
    assert [k for k, _ in planner.use((0, 5))] == [(0, 5)]  # (0, 6) would need a slot no one may give up
    planner.release((0, 5))
    assert [k for k, _ in planner.use((0, 6))] == [(0, 6)]  # its own turn: it evicts (0, 5)
    assert set(residency.slot_of) == {(1, 0), (0, 6)}


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_a_layer_that_owns_its_slots_has_no_room_while_its_own_are_pinned(policy):
    """Free slots of another layer's share are no room for this layer: the policy answers, not the pool."""
    residency = Residency(4, POLICIES[policy](4, [0, 1], 8, 2))
    for key in [(0, 1), (0, 2)]:
        residency.use(key)
        residency.pin(key)
    assert not residency.can_take((0, 3))  # layer 0's two slots are pinned; layer 1's two are free
    assert residency.can_take((1, 3))
    assert residency.can_take((0, 1))  # resident
    residency.unpin((0, 2))
    assert residency.can_take((0, 3))


def test_a_global_pool_has_room_while_any_resident_is_unpinned():
    residency = Residency(2, PLECPolicy(2, [0, 1], 8, 2))
    residency.use((0, 1))
    residency.pin((0, 1))
    assert residency.can_take((1, 3))  # a free slot
    residency.use((1, 3))
    assert residency.can_take((0, 4))  # (1, 3) is unpinned
    residency.pin((1, 3))
    assert not residency.can_take((0, 4))
