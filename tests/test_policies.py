"""Policies on hand-made and random accesses: LFU and Belady counts, the planner's transfer window, PLEC's
correction, and Belady's MIN never loading more than any other policy (property test)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertflow.cache.policies.belady import BeladyPolicy
from expertflow.cache.policies.lfu import LFUPolicy
from expertflow.cache.policies.lru import LRUPolicy
from expertflow.cache.planner import CachePlanner
from expertflow.cache.policies.plec import PLECPolicy
from expertflow.cache.policies.ring import RingPolicy
from expertflow.cache.residency import Residency
from expertflow.simulator import Forward, SimConfig, simulate
from expertflow.traces import TraceHeader, TraceSequence, TraceSet

ONLINE = ["lru", "lfu", "ring", "pregated", "expertflow"]


def test_belady_on_the_textbook_sequence():
    pages = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]
    policy = BeladyPolicy(3, [0], 8, 1)
    policy.set_future([(0, p) for p in pages])
    cache = Residency(3, policy)
    for p in pages:
        cache.use((0, p))
    assert cache.counters.correction_loads == 9  # the classic OPT answer for 3 frames


def test_lfu_evicts_the_least_used_of_the_layer():
    cache = Residency(2, LFUPolicy(2, [0], 8, 1))
    for e in (1, 1, 1, 2, 3, 2, 4):
        cache.use((0, e))
    # 1 (3 uses) stays; 2 then 3 then 2 again: 3 evicts 2 (1 use, older), 2 evicts 3, 4 evicts 2 (tie: older)
    assert set(cache.slot_of) == {(0, 1), (0, 4)}
    assert (cache.counters.correction_loads, cache.counters.evictions) == (5, 3)


def test_prefetches_are_judged_by_their_forward_and_reloads_are_counted():
    cache = Residency(2, LRUPolicy(2, [0], 8, 1))
    cache.begin_forward()
    cache.prefetch((0, 1))
    cache.prefetch((0, 2))
    cache.use((0, 1))       # prefetch hit
    cache.end_forward()     # (0, 2) unused: stale
    cache.begin_forward()
    cache.use((0, 2))       # an ordinary hit: its forward is over
    cache.prefetch((0, 3))  # evicts (0, 1), the least recent
    cache.prefetch((0, 4))  # evicts (0, 2)
    cache.use((0, 1))       # miss: evicts (0, 3) unused (wasted); (0, 1) left this forward (a re-load)
    cache.begin_forward()   # ends the forward: (0, 4) unused, stale
    c = cache.counters
    assert (c.hits, c.correction_loads, c.loads, c.prefetch_loads, c.evictions) == (2, 1, 5, 4, 3)
    assert (c.prefetch_hits, c.wasted_prefetches, c.stale_prefetches, c.reloads) == (1, 1, 2, 1)
    assert c.prefetch_loads == c.prefetch_hits + c.wasted_prefetches + c.stale_prefetches


def test_a_reload_is_a_load_within_the_last_few_forwards_of_the_eviction():
    from expertflow.cache.residency import RELOAD_FORWARDS

    cache = Residency(1, LRUPolicy(1, [0], 8, 1))
    cache.begin_forward()
    cache.use((0, 1))
    cache.use((0, 2))               # evicts (0, 1) in forward 1
    for _ in range(RELOAD_FORWARDS):
        cache.begin_forward()
    cache.use((0, 1))               # forward 1 + RELOAD_FORWARDS: still a re-load; evicts (0, 2)
    cache.begin_forward()
    cache.begin_forward()
    cache.use((0, 3))               # evicts (0, 1)
    for _ in range(RELOAD_FORWARDS + 1):
        cache.begin_forward()
    cache.use((0, 1))               # one forward too late: not a re-load
    assert (cache.counters.loads, cache.counters.reloads) == (5, 1)


def test_the_window_limits_prefetches_per_layer():
    policy = RingPolicy(16, [0, 1, 2], 8, 2)  # half = 8: each next layer wants all 8 experts
    planner = CachePlanner(Residency(16, policy), transfer_ratio=2.5)
    assert len(planner.begin_step(None)) == 2            # 2.5 loads of room: 2 issued, 0.5 carried
    planner.route(0, [(0, 0)])
    planner.residency.use((0, 0))
    issued = planner.finish_layer(0)
    assert len(issued) == 3 and all(key[0] == 1 for key, _ in issued)  # 0.5 + 2.5: three of layer 1's


def test_plec_prefetches_by_layer_then_probability_and_evicts_mispredictions_first():
    policy = PLECPolicy(3, [0, 1], 4, 1)
    cache = Residency(3, policy)
    planner = CachePlanner(cache, transfer_ratio=None)
    issued = planner.begin_step({(1, 3): 0.95, (0, 1): 0.6, (0, 2): 0.9, (1, 0): 0.1})
    assert [key for key, _ in issued] == [(0, 2), (0, 1), (1, 3)]  # (1, 0) is below the threshold
    planner.route(0, [(0, 1), (0, 0)])                              # (0, 2) was mispredicted
    cache.use((0, 0))                                               # correction: a demand load
    assert (0, 2) not in cache and cache.counters.wasted_prefetches == 1
    cache.use((0, 1))
    assert cache.counters.prefetch_hits == 1 and cache.counters.correction_loads == 1


def _filled_plec(capacity: int, layers: list[int], first: list[list[int]]) -> CachePlanner:
    """PLEC over 4 experts after one forecast-less forward that used `first[i]` at layer i (demand loads)."""
    planner = CachePlanner(Residency(capacity, PLECPolicy(capacity, layers, 4, 1)), transfer_ratio=None)
    planner.begin_step(None)
    for layer, experts in zip(layers, first):
        _run_layer(planner, layer, experts)
    return planner


def _run_layer(planner: CachePlanner, layer: int, experts: list[int]) -> list:
    planner.route(layer, [(layer, e) for e in experts])
    for e in experts:
        planner.residency.use((layer, e))
    return [(key, placement.evicted) for key, placement in planner.finish_layer(layer)]


def test_plec_prefetch_that_must_evict_waits_until_its_layer_is_next():
    planner = _filled_plec(2, [0, 1, 2], [[0], [0], []])    # full: (0, 0), (1, 0)
    assert planner.begin_step({(2, 1): 0.9}) == []          # layer 2 is 3 layers ahead: declined, kept
    assert _run_layer(planner, 0, [0]) == []                # 2 ahead: still waiting
    assert _run_layer(planner, 1, [0]) == [((2, 1), (1, 0))]  # next: in, over the layer that just ran
    assert planner.residency.counters.prefetch_loads == 1


def test_plec_evicts_its_own_mispredicted_prefetch_before_an_older_resident_the_forecast_named():
    planner = _filled_plec(3, [0, 1], [[0, 1], [0]])
    issued = planner.begin_step({(0, 0): 0.9, (0, 2): 0.9})  # (0, 0) resident already; (0, 2) prefetched
    assert [(key, p.evicted) for key, p in issued] == [((0, 2), (1, 0))]
    _run_layer(planner, 0, [1])                              # both mispredicted: only (0, 2) was this plan's
    _run_layer(planner, 1, [0])                              # demand load: (0, 2) goes first
    cache = planner.residency
    assert (0, 0) in cache and (0, 2) not in cache
    assert (cache.counters.wasted_prefetches, cache.counters.correction_loads) == (1, 3 + 1)  # 3 filled the cache


def test_a_forecast_of_the_coming_forward_alone_cannot_keep_the_expert_the_next_one_reuses():
    """One layer: forward 2 must evict 0 or 1, and forward 3 uses 0 again. Knowing only the coming forward, PLEC
    loads once more than Belady (which sees every later use)."""
    used = [(0, 1), (2,), (0,)]
    forwards = [Forward((experts,), {(0, e): 1.0 for e in experts}, prefill=False) for experts in used]
    run = simulate(forwards, [0], 4, 1, SimConfig("expertflow", 2, 1, None, count_prefill=True))
    belady = simulate(forwards, [0], 4, 1, SimConfig("belady", 2, 1, None, count_prefill=True))
    assert (run.counters.loads, belady.counters.loads, run.counters.hit_ratio) == (4, 3, 1.0)


def _random_forwards(rng: np.random.Generator, layers: int, experts: int, steps: int, width: int) -> list[Forward]:
    skew = rng.dirichlet(np.full(experts, 0.3), size=layers)  # skewed popularity, as real routing is
    forwards = []
    for _ in range(steps):
        used = tuple(tuple(sorted(set(rng.choice(experts, width, p=skew[l]).tolist()))) for l in range(layers))
        noisy = {(l, e): float(rng.uniform(0.3, 1.0)) for l in range(layers) for e in used[l]}
        noisy.update({(l, int(rng.integers(experts))): float(rng.uniform(0, 1)) for l in range(layers)})
        forwards.append(Forward(used, noisy, prefill=False))
    return forwards


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), capacity=st.integers(8, 24), width=st.integers(1, 5),
       ratio=st.sampled_from([None, 0.5, 2.0]))
def test_belady_loads_least_on_random_traces(seed, capacity, width, ratio):
    layers, experts = 4, 8
    forwards = _random_forwards(np.random.default_rng(seed), layers, experts, steps=30, width=width)
    loads = {name: simulate(forwards, range(layers), experts, 2, SimConfig(name, capacity, 1, ratio,
                                                                           count_prefill=True)).counters.loads
             for name in [*ONLINE, "belady"]}
    assert all(loads["belady"] <= loads[name] for name in ONLINE), loads


@pytest.fixture(scope="module")
def recorded_traces() -> TraceSet:
    """Greedy routing of the embedded model on real instructions, recorded by the engine."""
    import expertflow

    m = expertflow.from_pretrained()
    prompts = ["Give three tips for staying healthy.", "Describe the water cycle.",
               "Write a short poem about the sea.", "Explain why the sky is blue.", "List four primary colors.",
               "How do vaccines work?", "Summarize the plot of a fairy tale.", "What is machine learning?"]
    ids = [m.encode(p) for p in prompts]
    out = m.generate(input_ids=ids, max_new_tokens=24, record_routing=True)
    header = TraceHeader(model=m.name, num_layers=m.num_moe_layers, num_experts=m.num_experts, top_k=m.top_k)
    return TraceSet(header, [TraceSequence(p, g, r) for p, g, r in zip(ids, out.sequences, out.routing)])


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("cache", [26, 64])
def test_belady_loads_least_on_recorded_traces(recorded_traces, batch, cache):
    from expertflow.cache.policies.forecast import one_hot_routing
    from expertflow.simulator import batch_forwards

    h = recorded_traces.header
    predictions = [one_hot_routing(s.routing, h.num_experts) for s in recorded_traces.sequences]
    forwards = batch_forwards(recorded_traces, batch, predictions)
    loads = {name: simulate(forwards, range(h.num_layers), h.num_experts, h.top_k,
                            SimConfig(name, cache, batch, 4.0, count_prefill=True)).counters.loads
             for name in [*ONLINE, "belady"]}
    assert all(loads["belady"] <= loads[name] for name in ONLINE), loads


def test_belady_loads_of_a_use_log_count_from_a_warm_start():
    from expertflow.simulator import belady_loads

    a, b, c = (0, 1), (0, 2), (0, 3)
    uses = [c, a, b]
    # Cold: all three miss (two slots, three keys).
    assert belady_loads(uses, 2, [0], 8, 1) == 3
    # Warm {a, b}: c evicts b (next used after a), then b evicts c (never used again): 2 loads.
    assert belady_loads(uses, 2, [0], 8, 1, resident=[a, b]) == 2
    assert belady_loads([a, b, a, b], 2, [0], 8, 1, resident=[a, b]) == 0
    with pytest.raises(ValueError, match="do not fit 2 distinct slots"):
        belady_loads(uses, 2, [0], 8, 1, resident=[a, b, c])


@pytest.mark.parametrize("policy", ["lru", "expertflow"])
def test_a_live_runs_use_log_replays_to_its_own_loads_and_belady_loads_no_more(policy):
    """The log `record_uses` keeps is the engine's demand sequence: replayed through the same policy from
    the same (cold) cache it gives the live loads, and Belady's MIN over it never loads more."""
    import expertflow
    from expertflow.cache.policies import build_policy
    from expertflow.simulator import belady_loads

    m = expertflow.from_pretrained(cache_experts=26, policy=policy)
    try:
        resident, uses = m.cache.record_uses()
        out = m.generate(input_ids=[m.encode("Describe the water cycle.")], max_new_tokens=12)
        m.cache.stop_recording()
        live = out.stats.expert_loads
        p = m.cache.residency.policy
        floor = belady_loads(uses, 26, p.layers, p.num_experts, p.top_k, resident)
    finally:
        m.close()
    assert resident == [] and len(uses) == out.stats.hits + out.stats.correction_loads
    assert 0 < floor <= live
    if policy == "lru":  # a demand-paged policy: its loads are a function of the use sequence alone
        replay = Residency(26, build_policy("lru", 26, p.layers, p.num_experts, p.top_k))
        for key in uses:
            replay.use(key)
        assert replay.counters.loads == live
