"""PLEC's config: validated, defaults unchanged, every knob reaching the decisions."""

from __future__ import annotations

import pytest

from expertflow.policies.plec import PLECConfig, PLECPolicy


def test_defaults_are_the_values_the_figures_were_measured_with():
    assert PLECConfig() == PLECConfig(threshold=0.5, beta=0.9, decay=0.9, lead=1)
    assert PLECPolicy(4, [0, 1], 8, 2).config == PLECConfig()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("threshold", 0.0, r"threshold .* must be in \(0, 1\], got 0.0"),
    ("threshold", 1.5, r"threshold .* must be in \(0, 1\], got 1.5"),
    ("beta", 0.0, r"beta .* must be in \(0, 1\], got 0.0"),
    ("beta", 1.01, r"beta .* must be in \(0, 1\], got 1.01"),
    ("decay", 1.0, r"decay .* must be in \[0, 1\), got 1.0"),
    ("decay", -0.1, r"decay .* must be in \[0, 1\), got -0.1"),
    ("lead", -1, r"lead .* must be an integer >= 0, got -1"),
    ("lead", 0.5, r"lead .* must be an integer >= 0, got 0.5"),
    ("lead", True, r"lead .* must be an integer >= 0, got True"),
])
def test_an_out_of_range_knob_says_what_is_wrong_and_what_is_right(field, value, message):
    with pytest.raises(ValueError, match=message):
        PLECConfig(**{field: value})


@pytest.mark.parametrize(("field", "value"), [("threshold", 1.0), ("beta", 1.0), ("decay", 0.0), ("lead", 0)])
def test_the_closed_ends_of_the_ranges_are_allowed(field, value):
    assert getattr(PLECConfig(**{field: value}), field) == value


def test_threshold_picks_what_the_plan_prefetches():
    forecast = {(0, 1): 0.9, (1, 2): 0.6, (1, 3): 0.3}
    assert PLECPolicy(4, [0, 1], 8, 1).plan(forecast) == [(0, 1), (1, 2)]
    assert PLECPolicy(4, [0, 1], 8, 1, PLECConfig(threshold=0.8)).plan(forecast) == [(0, 1)]


def test_beta_and_decay_set_the_values():
    config = PLECConfig(beta=0.5, decay=0.75)
    policy = PLECPolicy(4, [0, 1, 2], 8, 1, config)
    policy.plan({(2, 0): 1.0})
    assert policy.value((2, 0)) == 0.5**3  # a sure use three layers ahead of "before the first layer"
    policy.on_layer(0, [(0, 1)])
    policy.on_hit((0, 1))
    assert policy.value((0, 1)) == pytest.approx((1 - 0.75) * 0.5**3)  # u = 1 - decay, next forward 3 away


@pytest.mark.parametrize(("lead", "admitted"), [(0, False), (1, True)])
def test_lead_holds_back_an_evicting_prefetch_until_its_layer_is_that_close(lead, admitted):
    policy = PLECPolicy(2, [0, 1, 2], 4, 1, PLECConfig(lead=lead))
    for key in ((0, 0), (0, 1)):
        policy.on_load(key)
    policy.plan({(2, 3): 0.9})
    policy.on_layer(1, [])  # layer 2 is one layer ahead; the residents are worth nothing
    assert policy.admit((2, 3), {(0, 0), (0, 1)}, (), full=True) is admitted
