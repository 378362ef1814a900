"""B_acc, precision, recall (top-k and fixed budget) and the baselines on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest

from expertflow.predictor.baselines import (LookupBaseline, PopularityBaseline, SpatialBaseline, TemporalBaseline,
                                            build_tables)
from expertflow.predictor.evaluate import EvalConfig, batches, evaluate
from expertflow.predictor.metrics import MetricAccumulator, routing_mask, topk_mask
from expertflow.traces import TraceHeader, TraceSequence, TraceSet

# Two tokens, L=2 layers, E=4 experts, K=2. True sets: layer 0 {0,1} | {0,2}; layer 1 {2,3} | {2,3}.
TRUE = routing_mask(np.array([[[0, 1], [2, 3]], [[0, 2], [2, 3]]]), 4)
SCORES = np.array([
    [[0.9, 0.1, 0.0, 0.8], [0.0, 0.0, 0.9, 0.8]],   # token 0: top-2 {0,3} | {2,3}
    [[0.0, 0.7, 0.2, 0.6], [0.5, 0.6, 0.1, 0.0]],   # token 1: top-2 {1,3} | {0,1}
])


def test_batch_metrics_equal_hand_computed_values() -> None:
    acc = MetricAccumulator(num_layers=2, top_k=2, budget=2)
    acc.add(TRUE, SCORES)
    r = acc.result()
    # top-k OR-ed: layer 0 predicts {0,1,3} vs true {0,1,2}: 2 hits -> recall 2/3, precision 2/3.
    # layer 1 predicts {0,1,2,3} vs true {2,3}: recall 1, precision 1/2.
    assert r["per_layer"] == pytest.approx([2 / 3, 1.0])
    assert r["b_acc"] == r["recall"] == pytest.approx(5 / 6)
    assert r["precision"] == pytest.approx(7 / 12)
    assert r["f1"] == pytest.approx(2 * (7 / 12) * (5 / 6) / (7 / 12 + 5 / 6))
    # budget 2 on summed scores: layer 0 sums [0.9,0.8,0.2,1.4] -> {3,0}: recall 1/3, precision 1/2;
    # layer 1 sums [0.5,0.6,1.0,0.8] -> {2,3}: recall 1, precision 1.
    assert r["budget"]["recall"] == pytest.approx(2 / 3)
    assert r["budget"]["precision"] == pytest.approx(3 / 4)


def test_batches_are_averaged() -> None:
    acc = MetricAccumulator(num_layers=2, top_k=2, budget=2)
    acc.add(TRUE, SCORES)
    acc.add(TRUE[:1], TRUE[:1].astype(float))      # a perfect batch of one token
    r = acc.result()
    assert r["batches"] == 2
    assert r["b_acc"] == pytest.approx((5 / 6 + 1) / 2)
    assert r["precision"] == pytest.approx((7 / 12 + 1) / 2)


def test_topk_mask_breaks_ties_by_lower_expert_id() -> None:
    assert topk_mask(np.array([0.5, 1.0, 0.5, 0.5]), 2).tolist() == [True, True, False, False]


def make_sequence_traces() -> TraceSet:
    header = TraceHeader(model="m", num_layers=2, num_experts=4, top_k=2)
    routing = np.array([[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[0, 3], [1, 2]], [[0, 1], [2, 3]]])
    seq = TraceSequence(np.array([5, 6]), np.array([7, 6]), routing)
    return TraceSet(header, [seq])


def test_tlp_and_slp_read_the_right_neighbours() -> None:
    traces = make_sequence_traces()
    seq, prior = traces.sequences[0], np.zeros((2, 4))
    tlp = TemporalBaseline(prior).scores(seq, np.array([2]))        # previous token's routing (position 1)
    assert np.flatnonzero(tlp[0, 0]).tolist() == [1, 2] and np.flatnonzero(tlp[0, 1]).tolist() == [0, 3]
    slp = SpatialBaseline(prior).scores(seq, np.array([2]))
    # layer 1 <- same token's layer 0 {0,3}; layer 0 <- previous token's last layer {0,3}.
    assert np.flatnonzero(slp[0, 1]).tolist() == [0, 3] and np.flatnonzero(slp[0, 0]).tolist() == [0, 3]


def test_lookup_uses_pairs_then_tokens_then_popularity() -> None:
    traces = make_sequence_traces()
    tables = build_tables([traces], vocab_size=10)
    lookup = LookupBaseline(tables)
    seq = traces.sequences[0]
    # (6 -> 7) was seen at position 2: its experts are [0,3] | [1,2].
    s = lookup.scores(seq, np.array([2]))
    assert topk_mask(s, 2)[0].tolist() == routing_mask(np.array([[[0, 3], [1, 2]]]), 4)[0].tolist()
    unseen_pair = TraceSequence(np.array([7, 5]), np.array([], dtype=np.int32), np.zeros((2, 2, 2), np.int16))
    s = lookup.scores(unseen_pair, np.array([1]))                   # pair (7,5) unseen, token 5 seen at position 0
    assert topk_mask(s, 2)[0].tolist() == routing_mask(np.array([[[0, 1], [2, 3]]]), 4)[0].tolist()
    never = TraceSequence(np.array([7, 9]), np.array([], dtype=np.int32), np.zeros((2, 2, 2), np.int16))
    s = lookup.scores(never, np.array([1]))
    popular = topk_mask(tables.popularity, 2)
    assert topk_mask(s, 2)[0].tolist() == popular.tolist()
    assert tables.popularity.sum(-1) == pytest.approx([1.0, 1.0])



def test_lookup_tables_equal_dense_counts_with_no_expert_entries() -> None:
    """The tables count sparse (key, layer, expert) uses; a dense count per key with a stable sort (ties
    and never-used experts to the lower id) must give the same experts, NO_EXPERT entries included."""
    rng = np.random.default_rng(3)
    L, E, K, V = 3, 6, 2, 5
    header = TraceHeader(model="m", num_layers=L, num_experts=E, top_k=K)
    seqs = []
    for _ in range(12):
        n = int(rng.integers(2, 9))
        routing = np.stack([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(n)]).astype(np.int16)
        routing[rng.random(routing.shape) < 0.3] = -1                  # some places route nowhere
        ids = rng.integers(0, V, n)
        seqs.append(TraceSequence(ids[:1], ids[1:], routing))
    tables = build_tables([TraceSet(header, seqs)], vocab_size=V)

    def dense(key_of) -> dict[int, np.ndarray]:
        counts: dict[int, np.ndarray] = {}
        for s in seqs:
            for t in range(len(s.token_ids)):
                key = key_of(s.token_ids, t)
                if key is not None:
                    counts.setdefault(key, np.zeros((L, E), int))[:] += routing_mask(s.routing[t:t + 1], E)[0]
        return {k: np.argsort(-c, axis=-1, kind="stable")[:, :K] for k, c in counts.items()}

    pairs = dense(lambda ids, t: int(ids[t - 1]) * V + int(ids[t]) if t else None)
    assert tables.pair_keys.tolist() == sorted(pairs)
    assert all(np.array_equal(tables.pair_experts[i], pairs[k]) for i, k in enumerate(tables.pair_keys.tolist()))
    tokens = dense(lambda ids, t: int(ids[t]))
    for v in range(V):
        expected = tokens.get(v, np.full((L, K), -1))
        assert np.array_equal(tables.token_experts[v], expected), v
    uses = sum(routing_mask(s.routing, E).sum(0) for s in seqs)
    assert np.allclose(tables.popularity, uses / sum(len(s.token_ids) for s in seqs) / K)

def test_popularity_predicts_the_same_experts_for_everyone() -> None:
    prior = np.array([[0.1, 0.5, 0.3, 0.1], [0.4, 0.1, 0.1, 0.4]])
    s = PopularityBaseline(prior).scores(make_sequence_traces().sequences[0], np.array([2, 3]))
    assert s.shape == (2, 2, 4) and np.array_equal(s[0], s[1])


def test_batches_group_sequences_by_decoding_step() -> None:
    header = TraceHeader(model="m", num_layers=1, num_experts=4, top_k=1)
    seqs = [TraceSequence([1], list(range(g)), np.zeros((1 + g, 1, 1))) for g in (3, 1, 2)]
    got = batches(TraceSet(header, seqs), batch_size=3, seed=0)
    assert [sorted(step for _, step in b) for b in got] == [[0, 0, 0], [1, 1], [2]]
    singles = batches(TraceSet(header, seqs), batch_size=1, seed=0)
    assert len(singles) == 3 + 1 + 2 and all(len(b) == 1 for b in singles)


def test_evaluate_an_oracle_and_tlp_on_a_sequence() -> None:
    traces = make_sequence_traces()
    oracle = lambda seq, pos: routing_mask(seq.routing[pos], 4).astype(float)  # noqa: E731
    tlp = TemporalBaseline(np.zeros((2, 4))).scores
    r = evaluate(traces, {"oracle": oracle, "tlp": tlp}, EvalConfig(batch_size=1))
    assert r["oracle"]["b_acc"] == r["oracle"]["precision"] == 1.0
    # Generated positions 2 and 3. Position 2 is {0,3}|{1,2}, its predecessor {1,2}|{0,3}: no hits.
    # Position 3 is {0,1}|{2,3}, its predecessor {0,3}|{1,2}: one hit of two per layer.
    expected = np.mean([0.0, 1 / 2])
    assert r["tlp"]["b_acc"] == pytest.approx(expected)
