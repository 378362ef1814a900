"""`exhaustive`: every balanced partition enumerated once, its optimum equal to `exact`'s and brute force's on
0/1 paths, the minimum expected distinct pairs on probabilities, `swap` above the partition limit."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertflow.scheduler import SCHEDULERS, Grouping, expected_distinct, total_distinct
from expertflow.scheduler.exact import solve
from expertflow.scheduler.exhaustive import (ExhaustiveScheduler, Plan, balanced_masks, partition_count,
                                             subset_products)
from expertflow.scheduler.swap import SwapScheduler
from tests.test_scheduler import (_run, balanced_partitions, brute_force, random_probabilities, skewed_paths,
                                  synthetic_traces)

SHAPES = [(1, 1), (3, 1), (1, 4), (2, 2), (3, 2), (2, 3), (4, 2), (2, 4), (3, 3), (5, 2), (4, 3), (8, 2)]


def brute_force_expected(probs: np.ndarray, batch_size: int) -> float:
    return min(expected_distinct(probs, Grouping(tuple(p))) for p in balanced_partitions(len(probs), batch_size))


def assert_balanced(grouping: Grouping, batch_size: int, unit: int) -> None:
    assert [len(b) for b in grouping.batches] == [batch_size] * unit
    assert sorted(grouping.permutation.tolist()) == list(range(batch_size * unit))


# ---------------------------------------------------------------- the enumeration and the subset sums

@pytest.mark.parametrize("batch_size, unit", SHAPES)
def test_masks_hold_every_balanced_partition_once(batch_size, unit):
    n = batch_size * unit
    masks = balanced_masks(batch_size, unit)
    assert masks.shape == (partition_count(batch_size, unit), unit)
    full = (1 << n) - 1
    as_sets = set()
    for row in masks.tolist():
        assert all(m.bit_count() == batch_size for m in row)
        assert sum(row) == full and np.bitwise_or.reduce(row) == full          # disjoint and covering
        assert row[0] & 1                                                     # sequence 0 opens batch 0
        as_sets.add(frozenset(frozenset(i for i in range(n) if m >> i & 1) for m in row))
    assert len(as_sets) == len(masks)
    if n <= 12:
        reference = {frozenset(frozenset(b) for b in p) for p in balanced_partitions(n, batch_size)}
        assert as_sets == reference


@pytest.mark.parametrize("batch_size, unit", [(2, 2), (3, 2), (2, 3), (4, 2), (3, 3)])
def test_unused_sums_equal_plain_products(batch_size, unit):
    rng = np.random.default_rng(batch_size * 10 + unit)
    n = batch_size * unit
    q = 1.0 - random_probabilities(rng, (n, 7))
    plan = Plan.build(batch_size, unit)
    unused = plan.unused(q)
    for p, row in enumerate(plan.masks.tolist()):
        for c, m in enumerate(row):
            members = [i for i in range(n) if m >> i & 1]
            assert unused[plan.flat[p, c]] == pytest.approx(np.prod(q[members], axis=0).sum(), rel=1e-12)
    products = subset_products(q[:4])
    for s in range(16):
        assert np.allclose(products[s], np.prod(q[[i for i in range(4) if s >> i & 1]], axis=0))


def test_partition_counts_named_in_the_docs():
    assert [partition_count(b, u) for b, u in ((7, 2), (8, 2), (9, 2), (3, 3), (4, 3), (3, 4))] == [
        1716, 6435, 24310, 280, 5775, 15400]


# ---------------------------------------------------------------- exact on 0/1 paths

@settings(max_examples=60, deadline=None)
@given(batch_size=st.integers(1, 4), unit=st.integers(1, 3), layers=st.integers(1, 3),
       experts=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_equals_brute_force_and_exact_on_paths(batch_size, unit, layers, experts, seed):
    rng = np.random.default_rng(seed)
    paths = rng.random((batch_size * unit, layers, experts)) < rng.uniform(0.1, 0.9)
    grouping = SCHEDULERS["exhaustive"]().group(paths, batch_size, unit)
    assert_balanced(grouping, batch_size, unit)
    optimum = solve(paths, batch_size, unit, node_limit=1_000_000)[1]
    assert total_distinct(paths, grouping) == optimum == brute_force(paths, batch_size)
    for dtype in (np.float32, np.float64):
        assert SCHEDULERS["exhaustive"]().group(paths.astype(dtype), batch_size, unit, probabilities=True) == grouping


@pytest.mark.parametrize("batch_size, unit", [(8, 2), (6, 2), (4, 3), (3, 4), (2, 5)])
def test_equals_exact_on_skewed_routing(batch_size, unit):
    rng = np.random.default_rng(11)
    scheduler = ExhaustiveScheduler()
    for _ in range(6):
        paths = skewed_paths(rng, batch_size * unit, layers=8, experts=16)
        grouping = scheduler.group(paths, batch_size, unit)
        assert_balanced(grouping, batch_size, unit)
        assert total_distinct(paths, grouping) == solve(paths, batch_size, unit, node_limit=2_000_000)[1]


# ---------------------------------------------------------------- the minimum on probabilities

@settings(max_examples=60, deadline=None)
@given(batch_size=st.integers(1, 4), unit=st.integers(1, 3), layers=st.integers(1, 3),
       experts=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_minimises_expected_distinct_on_probabilities(batch_size, unit, layers, experts, seed):
    probs = random_probabilities(np.random.default_rng(seed), (batch_size * unit, layers, experts))
    grouping = SCHEDULERS["exhaustive"]().group(probs.astype(np.float32), batch_size, unit, probabilities=True)
    assert_balanced(grouping, batch_size, unit)
    probs32 = probs.astype(np.float32).astype(np.float64)
    cost = expected_distinct(probs32, grouping)
    assert cost == pytest.approx(brute_force_expected(probs32, batch_size), abs=1e-9)
    swap = SwapScheduler().group(probs32, batch_size, unit, probabilities=True)
    assert cost <= expected_distinct(probs32, swap) + 1e-9


def test_at_2x8_no_single_swap_improves_on_probabilities():
    # 2 x 8 is too large for the brute-force reference: compare with swap and with every single swap
    # of the chosen grouping (none may lower the expected cost).
    rng = np.random.default_rng(3)
    for _ in range(3):
        probs = random_probabilities(rng, (16, 4, 8))
        grouping = ExhaustiveScheduler().group(probs, 8, 2, probabilities=True)
        cost, labels = expected_distinct(probs, grouping), grouping.batch_of
        assert cost <= expected_distinct(probs, SwapScheduler().group(probs, 8, 2, probabilities=True)) + 1e-9
        for a, b in itertools.combinations(range(16), 2):
            if labels[a] != labels[b]:
                other = labels.copy()
                other[a], other[b] = labels[b], labels[a]
                assert expected_distinct(probs, Grouping.from_labels(other, 2)) >= cost - 1e-9


def test_nothing_to_tell_apart_keeps_arrival_order():
    # No sequence can use any pair: every grouping costs 0; the first partition enumerated is fifo's.
    for routing, probabilities in ((np.zeros((8, 2, 4)), True), (np.zeros((8, 2, 4), bool), False)):
        assert ExhaustiveScheduler().group(routing, 4, 2, probabilities=probabilities) == Grouping.identity(8, 4)


# ---------------------------------------------------------------- the limit, the settings, schedule-eval

def test_above_the_limit_it_is_swap():
    rng = np.random.default_rng(5)
    paths = skewed_paths(rng, 12)                           # 2 x 6: 462 partitions
    probs = random_probabilities(rng, (12, 4, 8))
    small = ExhaustiveScheduler(max_partitions=461)
    assert small.group(paths, 6, 2) == SwapScheduler().group(paths, 6, 2)
    assert small.group(probs, 6, 2, probabilities=True) == SwapScheduler().group(probs, 6, 2, probabilities=True)
    assert not small._plans                                 # nothing enumerated
    at_limit = ExhaustiveScheduler(max_partitions=462)
    assert total_distinct(paths, at_limit.group(paths, 6, 2)) == solve(paths, 6, 2, node_limit=1_000_000)[1]
    assert (6, 2) in at_limit._plans


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="max_partitions must be >= 1, got 0"):
        ExhaustiveScheduler(max_partitions=0)


def test_schedule_eval_reports_no_gap_on_true_routing(tmp_path, capsys):
    traces = tmp_path / "syn.trace"
    synthetic_traces(traces)
    rc, out, _ = _run(capsys, "schedule-eval", "--traces", str(traces), "--batch-size", "2,4",
                      "--schedule-unit", "2,3", "--schedulers", "fifo,swap,exhaustive", "--json")
    assert rc == 0
    rows = {(r["unit"], r["batch_size"], r["scheduler"]): r for r in json.loads(out.strip().splitlines()[-1])["rows"]}
    for unit, batch in ((2, 2), (2, 4), (3, 2), (3, 4)):
        exhaustive, swap = rows[(unit, batch, "exhaustive")], rows[(unit, batch, "swap")]
        assert exhaustive["exact_solved"] == exhaustive["exact_tried"] > 0
        assert exhaustive["gap_to_exact"] == 0.0
        assert exhaustive["distinct_per_batch"] <= swap["distinct_per_batch"]
