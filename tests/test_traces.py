"""Trace files: exact round trip, atomic write, one-line errors on damaged files, summary figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from expertflow.errors import ExpertflowError
from expertflow.traces import TraceHeader, TraceSequence, TraceSet, read_traces, summarize

L, E, K = 3, 8, 2


def make_traces(n: int = 4, seed: int = 0) -> TraceSet:
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(n):
        p, g = int(rng.integers(1, 9)), int(rng.integers(0, 6))
        routing = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(p + g)])
        seqs.append(TraceSequence(rng.integers(0, 100, p), rng.integers(0, 100, g), routing, i // 2, i % 2))
    header = TraceHeader(model="tiny", num_layers=L, num_experts=E, top_k=K, dataset="alpaca", runs=2,
                         temperature=0.8, seed=3, max_new_tokens=5, vocab_size=100)
    return TraceSet(header, seqs)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    traces = make_traces()
    path = traces.write(tmp_path / "t.safetensors")
    back = read_traces(path)
    assert back.header == traces.header
    assert len(back.sequences) == len(traces.sequences)
    for a, b in zip(traces.sequences, back.sequences):
        np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
        np.testing.assert_array_equal(a.generated_ids, b.generated_ids)
        np.testing.assert_array_equal(a.routing, b.routing)
        assert b.routing.dtype == np.int16 and (a.prompt_index, a.run) == (b.prompt_index, b.run)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    make_traces(seed=1).write(path)
    make_traces(seed=2).write(path)
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
    np.testing.assert_array_equal(read_traces(path).sequences[0].routing, make_traces(seed=2).sequences[0].routing)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_trace", "missing"])
def test_damaged_file_gives_one_line_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "t.safetensors"
    make_traces().write(path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file at all" * 3)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "not_trace":
        from safetensors.numpy import save_file
        save_file({"x": np.zeros(3)}, str(path))
    else:
        path = tmp_path / "absent.safetensors"
    with pytest.raises(ExpertflowError) as info:
        read_traces(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_inconsistent_routing_is_rejected() -> None:
    with pytest.raises(ValueError, match="routing must be"):
        TraceSequence(np.arange(3), np.arange(2), np.zeros((4, L, K)))
    header = TraceHeader(model="m", num_layers=L, num_experts=E, top_k=K)
    with pytest.raises(ValueError, match="expert ids outside"):
        TraceSet(header, [TraceSequence(np.arange(1), np.arange(0), np.full((1, L, K), E))])


def test_summary_figures_on_a_hand_made_trace() -> None:
    header = TraceHeader(model="m", num_layers=1, num_experts=4, top_k=2)
    # Three tokens: {0,1}, {0,1}, {0,2}: expert 0 takes 3 of 6 assignments.
    routing = np.array([[[0, 1]], [[0, 1]], [[0, 2]]])
    s = summarize(TraceSet(header, [TraceSequence(np.arange(2), np.arange(1), routing)]))
    assert s.sequences == 1 and s.prompt_tokens == 2 and s.generated_tokens == 1
    assert s.top_share == [pytest.approx(0.5)]
    shares = np.array([3, 2, 1, 0]) / 6
    entropy = -(shares[:3] * np.log(shares[:3])).sum() / np.log(4)
    assert s.entropy == [pytest.approx(entropy)]
    # Overlap with the previous token: step 1 keeps both experts, step 2 keeps one of two.
    assert s.prev_token_overlap == [pytest.approx((1.0 + 0.5) / 2)]
    assert 0 < s.gini[0] < 1
