"""PLEC's lead follows how long a transfer takes: modeled from the simulator's transfer ratio, measured by
the live cache (transfer durations over a layer's compute), or fixed by the user."""

from __future__ import annotations

import time

import pytest
import torch

from expertflow.cache.expert_cache import ExpertCache
from expertflow.cache.planner import CachePlanner
from expertflow.cache.policies.plec import PLECConfig, PLECPolicy
from expertflow.cache.residency import Residency
from expertflow.cache.stores import ExpertStore
from expertflow.cache.timing import TransferClock

LAYERS = list(range(8))


@pytest.mark.parametrize("layers, lead", [(0.0, 1), (0.4, 1), (1.6, 2), (2.3, 2), (3.5, 4), (50.0, 8)])
def test_an_unset_lead_is_one_transfer_in_layers_rounded_between_1_and_the_forward(layers, lead):
    policy = PLECPolicy(16, LAYERS, 8, 2)
    policy.set_transfer_time(layers)
    assert policy.lead == lead


def test_a_configured_lead_wins_over_the_transfer_time():
    policy = PLECPolicy(16, LAYERS, 8, 2, config=PLECConfig(lead=1))
    policy.set_transfer_time(5.0)
    assert policy.lead == 1


def test_the_simulators_transfer_ratio_sets_the_transfer_time():
    for ratio, lead in ((None, 1), (15.0, 1), (0.5, 2), (0.25, 4)):
        policy = PLECPolicy(16, LAYERS, 8, 2)
        CachePlanner(Residency(16, policy), ratio)
        assert policy.lead == lead, ratio


def test_the_clock_takes_a_layers_compute_net_of_its_waits():
    ticks = iter([0.0, 0.050, 0.060])
    clock = TransferClock(now=lambda: next(ticks))
    assert clock.layers_per_transfer() == 0.0  # nothing timed yet
    clock.forward_start(waited=0.0)
    clock.layer_done(waited=0.040)  # 50 ms, of which 40 ms waiting for transfers: 10 ms of compute
    clock.transfer(0.020)
    assert clock.layers_per_transfer() == pytest.approx(2.0)
    clock.layer_done(waited=0.040)  # 10 ms, no new waits: the average stays 10 ms
    clock.transfer(0.030)           # 0.8 * 20 + 0.2 * 30 = 22 ms
    assert clock.layers_per_transfer() == pytest.approx(2.2)


class _SlowStore(ExpertStore):
    name, read_method = "slow", "sleeps per read"
    numel, dtype, expert_bytes, refs = 4, torch.float32, 16, {}

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def read_into(self, key, out):
        time.sleep(self.seconds)


@pytest.mark.parametrize("read_seconds, layer_seconds, expect_lead", [(0.03, 0.005, 6), (0.0, 0.01, 1)])
def test_the_live_cache_measures_the_lead(read_seconds, layer_seconds, expect_lead):
    policy = PLECPolicy(8, [0, 1], 8, 2)
    cache = ExpertCache(Residency(8, policy), _SlowStore(read_seconds), torch.device("cpu"), background=True)
    try:
        for step in range(3):
            cache.begin_step({})
            for layer in (0, 1):
                key = (layer, step)
                cache.route(layer, [key])
                cache.acquire(key)  # a miss each time: a demand copy, timed
                cache.release(key)
                time.sleep(layer_seconds)  # the layer's own compute
                cache.finish_layer(layer)
        cache.begin_step({})
        # Two layers in this forward: a measured lead of 6 is capped at the forward's 2.
        assert policy.transfer_layers > 1.5 if expect_lead > 1 else policy.transfer_layers < 0.5
        assert policy.lead == min(expect_lead, 2)
    finally:
        cache.close()
