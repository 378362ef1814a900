"""PLEC's config (validated, defaults unchanged, every knob reaching the decisions) and its cache of resident
values, which must always equal a fresh `value` (checked at every decision on random forwards)."""

from __future__ import annotations

import numpy as np
import pytest

from expertflow.cache.planner import CachePlanner
from expertflow.cache.policies.plec import PLECConfig, PLECPolicy
from expertflow.cache.residency import Residency
from expertflow.simulator import Forward, replay_forward


def test_defaults_are_the_values_the_figures_were_measured_with():
    assert PLECConfig() == PLECConfig(threshold=0.5, spare_threshold=0.2, beta=0.97, decay=0.95, lead=None,
                                      refetch_discount=0.5)
    policy = PLECPolicy(4, [0, 1], 8, 2)
    assert policy.config == PLECConfig()
    policy.set_transfer_time(1 / 15)  # the simulator figures' transfer ratio: the lead they ran with, 1
    assert policy.lead == 1


@pytest.mark.parametrize(("field", "value", "message"), [
    ("threshold", 0.0, r"threshold .* must be in \(0, 1\], got 0.0"),
    ("threshold", 1.5, r"threshold .* must be in \(0, 1\], got 1.5"),
    ("spare_threshold", 0.0, r"spare_threshold .* must be in \(0, 1\], got 0.0"),
    ("spare_threshold", 1.5, r"spare_threshold .* must be in \(0, 1\], got 1.5"),
    ("beta", 0.0, r"beta .* must be in \(0, 1\], got 0.0"),
    ("beta", 1.01, r"beta .* must be in \(0, 1\], got 1.01"),
    ("decay", 1.0, r"decay .* must be in \[0, 1\), got 1.0"),
    ("decay", -0.1, r"decay .* must be in \[0, 1\), got -0.1"),
    ("refetch_discount", 0.0, r"refetch_discount .* must be in \(0, 1\], got 0.0"),
    ("refetch_discount", 1.5, r"refetch_discount .* must be in \(0, 1\], got 1.5"),
    ("lead", -1, r"lead .* must be an integer >= 0, got -1"),
    ("lead", 0.5, r"lead .* must be an integer >= 0, got 0.5"),
    ("lead", True, r"lead .* must be an integer >= 0, got True"),
])
def test_an_out_of_range_knob_says_what_is_wrong_and_what_is_right(field, value, message):
    with pytest.raises(ValueError, match=message):
        PLECConfig(**{field: value})


@pytest.mark.parametrize(("field", "value"), [("threshold", 1.0), ("spare_threshold", 1.0), ("beta", 1.0),
                                             ("decay", 0.0), ("lead", 0), ("refetch_discount", 1.0)])
def test_the_closed_ends_of_the_ranges_are_allowed(field, value):
    assert getattr(PLECConfig(**{field: value}), field) == value


def test_threshold_picks_what_the_plan_prefetches():
    forecast = {(0, 1): 0.9, (1, 2): 0.6, (1, 3): 0.3}
    assert PLECPolicy(4, [0, 1], 8, 1).plan(forecast) == [(0, 1), (1, 2)]
    assert PLECPolicy(4, [0, 1], 8, 1, PLECConfig(threshold=0.8)).plan(forecast) == [(0, 1)]


SPARE_FORECAST = {(0, 1): 0.9, (0, 2): 0.4, (0, 3): 0.3, (0, 4): 0.25, (0, 5): 0.1,
                  (1, 1): 0.6, (1, 2): 0.7, (1, 3): 0.55, (1, 4): 0.3}
CONFIDENT = [(0, 1), (1, 2), (1, 1), (1, 3)]


def _plan(layers_per_transfer: float, config: PLECConfig = PLECConfig()) -> list[tuple[int, int]]:
    policy = PLECPolicy(16, [0, 1], 8, 2, config)
    policy.set_transfer_time(layers_per_transfer)
    return policy.plan(SPARE_FORECAST)


def test_a_fast_link_also_prefetches_less_likely_keys_up_to_a_layers_room():
    # 3 transfers per layer: layer 0's one confident key leaves room for its two likeliest spare keys (0.25
    # is the third; 0.1 is below spare_threshold), layer 1's three leave none for (1, 4)
    assert _plan(1 / 3) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 1), (1, 3)]
    assert _plan(1 / 30)[:5] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2)]  # room for all, down to 0.2
    assert (1, 4) in _plan(1 / 30) and (0, 5) not in _plan(1 / 30)


@pytest.mark.parametrize("layers_per_transfer", [0.0, 0.8, 2.0])  # unknown, a bit more than a layer's room, a disk read
def test_a_link_without_room_to_spare_prefetches_the_confident_keys_only(layers_per_transfer):
    assert _plan(layers_per_transfer) == CONFIDENT


def test_a_spare_threshold_at_or_above_the_threshold_adds_nothing():
    assert _plan(1 / 30, PLECConfig(spare_threshold=0.5)) == CONFIDENT
    assert _plan(1 / 30, PLECConfig(threshold=0.3, spare_threshold=0.9)) == [
        (0, 1), (0, 2), (0, 3), (1, 2), (1, 1), (1, 3), (1, 4)]  # p >= threshold, no spare floor below it


def test_beta_and_decay_set_the_values():
    config = PLECConfig(beta=0.5, decay=0.75)
    policy = PLECPolicy(4, [0, 1, 2], 8, 1, config)
    policy.plan({(2, 0): 1.0})
    assert policy.value((2, 0)) == 0.5**3  # a sure use three layers ahead of "before the first layer"
    policy.on_layer(0, [(0, 1)])
    policy.on_hit((0, 1))
    assert policy.value((0, 1)) == pytest.approx((1 - 0.75) * 0.5**3)  # u = 1 - decay, next forward 3 away


@pytest.mark.parametrize(("layers_per_transfer", "discount", "worth"), [
    (1 / 30, 0.5, 0.5 * 0.25 * 0.5**3),  # 30 loads per layer: room to spare, so the later worth is scaled
    (1 / 30, 1.0, 0.25 * 0.5**3),
    (2.0, 0.5, 0.25 * 0.5**3),           # a disk read of 2 layers: no room, the later worth stands
    (0.0, 0.5, 0.25 * 0.5**3),           # unknown transfer time: no room
])
def test_refetch_discount_scales_a_residents_later_worth_where_the_link_has_room(layers_per_transfer, discount,
                                                                                  worth):
    policy = PLECPolicy(4, [0, 1, 2], 8, 1, PLECConfig(beta=0.5, decay=0.75, refetch_discount=discount))
    policy.set_transfer_time(layers_per_transfer)
    policy.plan({(2, 0): 1.0})
    policy.on_layer(0, [(0, 1)])
    policy.on_hit((0, 1))
    assert policy.value((0, 1)) == pytest.approx(worth)  # u = 1 - decay, its next use 3 layers away
    assert policy.value((2, 0)) == pytest.approx(0.5**2)  # this forward's forecast is not discounted


@pytest.mark.parametrize(("layers_per_transfer", "discount", "admitted"), [
    (1 / 30, 0.25, True),   # the finished layer's resident is worth 0.25 now: a 0.3 speculation takes its slot
    (1 / 30, 1.0, False),   # undiscounted it is worth 1.0
    (1.0, 0.25, False),     # one read per layer: layer 0's confident key fills its room, so (0, 0) keeps its worth
])
def test_on_a_fast_link_a_speculative_key_takes_a_finished_layers_slot(layers_per_transfer, discount, admitted):
    policy = PLECPolicy(1, [0, 1, 2], 4, 1, PLECConfig(beta=1.0, decay=0.0, spare_threshold=0.2,
                                                      refetch_discount=discount))
    policy.set_transfer_time(layers_per_transfer)
    policy.on_load((0, 0))
    policy.plan({(0, 0): 0.9, (2, 3): 0.3})
    policy.on_layer(0, [(0, 0)])
    policy.on_hit((0, 0))
    policy.on_layer(1, [])  # layer 0 ran: (0, 0) is worth u = 1 to the next forward; (2, 3) is next
    assert policy.admit((2, 3), {(0, 0)}, (), full=True) is admitted


@pytest.mark.parametrize(("lead", "admitted"), [(0, False), (1, True)])
def test_lead_holds_back_an_evicting_prefetch_until_its_layer_is_that_close(lead, admitted):
    policy = PLECPolicy(2, [0, 1, 2], 4, 1, PLECConfig(lead=lead))
    for key in ((0, 0), (0, 1)):
        policy.on_load(key)
    policy.plan({(2, 3): 0.9})
    policy.on_layer(1, [])  # layer 2 is one layer ahead; the residents are worth nothing
    assert policy.admit((2, 3), {(0, 0), (0, 1)}, (), full=True) is admitted


class _CheckedPLEC(PLECPolicy):
    """PLEC that checks, at every decision, that each cached resident value is the value computed afresh."""

    def _cheapest_resident(self, pinned):
        cheapest = super()._cheapest_resident(pinned)
        for key, value in self._values.items():
            assert key in self._resident and value == self.value(key), key
        self.checked += 1
        return cheapest


def _random_forwards(rng: np.random.Generator, layers: int, experts: int, top_k: int, count: int,
                     stacks: bool) -> list[tuple[list[list[int]], dict, tuple[int, ...]]]:
    """`count` forwards: per layer the experts used, a noisy forecast (likely for the used experts, and
    some others), and the layers that run (with `stacks`, an encoder forward then two decoder steps)."""
    forwards = []
    for i in range(count):
        runs = tuple(range(layers))
        if stacks:
            runs = runs[: layers // 2] if i % 3 == 0 else runs[layers // 2:]
        used = [[] for _ in range(layers)]
        forecast = {}
        for layer in runs:
            used[layer] = sorted(rng.choice(experts, size=int(rng.integers(1, 2 * top_k + 1)), replace=False).tolist())
            for e in rng.choice(experts, size=experts // 2, replace=False).tolist():
                forecast[(layer, e)] = float(rng.uniform(0.0, 0.7))
            for e in used[layer]:
                forecast[(layer, e)] = float(rng.uniform(0.3, 1.0))
        forwards.append((used, forecast, runs))
    return forwards


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("transfer_ratio", [None, 1.5])
@pytest.mark.parametrize("stacks", [False, True])
def test_cached_resident_values_always_equal_fresh_ones(seed, transfer_ratio, stacks):
    layers, experts, top_k, capacity = 4, 8, 2, 6
    rng = np.random.default_rng(seed)
    raw = _random_forwards(rng, layers, experts, top_k, 40, stacks)
    policy = _CheckedPLEC(capacity, list(range(layers)), experts, top_k)
    policy.checked = 0
    planner = CachePlanner(Residency(capacity, policy), transfer_ratio)
    for used, forecast, runs in raw:
        fw = Forward(tuple(tuple(e) for e in used), forecast, prefill=False, layers=runs if stacks else None)
        replay_forward(planner, fw, list(range(layers)))
    assert policy.checked > 100 and planner.residency.counters.evictions > 50


def test_a_forward_over_other_layers_revalues_the_residents():
    policy = _CheckedPLEC(2, [0, 1, 2, 3], 4, 1)
    policy.checked = 0
    planner = CachePlanner(Residency(2, policy), None)
    planner.begin_step(None)
    for layer in range(4):  # expert 0 of every layer through 2 slots: the residents' values get cached
        planner.route(layer, [(layer, 0)])
        planner.residency.use((layer, 0))
        planner.finish_layer(layer)
    policy.begin_forward([2, 3])  # positions move (a decoder step) without a plan
    planner.residency.use((3, 1))
    assert policy.checked == 3
