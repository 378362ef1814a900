"""Cache bookkeeping and policies on hand-made access sequences, and the fast-tier budget."""

from __future__ import annotations

import pytest

import expertflow
from expertflow.errors import ExpertflowError
from expertflow.cache.policies import POLICIES
from expertflow.cache.policies.lru import LRUPolicy, split_evenly
from expertflow.cache.residency import Residency


def _lru(capacity: int, layers=(0, 1), experts: int = 8, top_k: int = 1) -> Residency:
    return Residency(capacity, LRUPolicy(capacity, list(layers), experts, top_k))


def test_lru_counts_on_a_hand_made_sequence():
    cache = _lru(4)  # two slots per layer
    # layer 0: 1 2 1 3 (evicts 2) 2 (evicts 1) 3 ; layer 1: 5 5 6 7 (evicts 5) 5 (evicts 6)
    accesses = [(0, 1), (1, 5), (0, 2), (1, 5), (0, 1), (1, 6), (0, 3), (1, 7), (0, 2), (1, 5), (0, 3)]
    hits = [cache.use(k).loaded is False for k in accesses]
    assert hits == [False, False, False, True, True, False, False, False, False, False, True]
    c = cache.counters
    assert (c.hits, c.correction_loads, c.loads, c.evictions) == (3, 8, 8, 4)
    assert set(cache.slot_of) == {(0, 2), (0, 3), (1, 7), (1, 5)}
    assert cache.slots_used_peak == 4


def test_lru_layers_never_take_each_others_slots():
    cache = _lru(4)
    for e in range(6):
        cache.use((0, e))
    assert sorted(k for k in cache.slot_of if k[0] == 0) == [(0, 4), (0, 5)]
    assert cache.counters.evictions == 4  # layer 1's two free slots were never used by layer 0


def test_lru_does_not_evict_a_pinned_expert():
    cache = _lru(2, layers=(0,))
    cache.use((0, 1))
    cache.pin((0, 1))
    cache.use((0, 2))
    cache.use((0, 3))  # LRU is (0, 1), but it is pinned: (0, 2) goes
    assert set(cache.slot_of) == {(0, 1), (0, 3)}


def test_split_evenly_gives_remainder_to_first_layers():
    assert split_evenly(10, [0, 1, 2, 3]) == {0: 3, 1: 3, 2: 2, 3: 2}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_budget_below_minimum_names_the_minimum(policy):
    minimum = POLICIES[policy].min_capacity([0, 1, 2], 8, 2)
    with pytest.raises(ExpertflowError, match=f"minimum of {minimum}"):
        POLICIES[policy](minimum - 1, [0, 1, 2], 8, 2)


@pytest.mark.parametrize("budget_experts", [6, 7, 13])
def test_measured_fast_tier_peak_stays_within_byte_budget(tiny_mixtral_dir, budget_experts):
    probe = expertflow.from_pretrained(tiny_mixtral_dir)
    expert_bytes = probe.cache.expert_bytes
    budget = budget_experts * expert_bytes + expert_bytes // 2  # not a whole number of experts
    m = expertflow.from_pretrained(tiny_mixtral_dir, cache_bytes=budget, store="disk")
    out = m.generate(input_ids=[[3, 5, 7, 9, 11, 13, 15, 17, 19, 21]] * 2, max_new_tokens=10)
    assert out.stats.cache_experts == budget_experts
    assert out.stats.expert_loads > 0
    assert 0 < out.stats.peak_expert_bytes <= budget
    assert out.stats.bytes_moved == out.stats.expert_loads * expert_bytes


def test_cache_bytes_accepts_human_sizes(tiny_mixtral_dir):
    probe = expertflow.from_pretrained(tiny_mixtral_dir)
    size_kib = probe.cache.expert_bytes * 10 // 1024
    m = expertflow.from_pretrained(tiny_mixtral_dir, cache_bytes=f"{size_kib}KiB")
    assert m.cache.residency.capacity == size_kib * 1024 // probe.cache.expert_bytes
