"""The trace simulator: batching as the engine runs, counts equal to the live engine's, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import expertflow
from expertflow.cli import main
from expertflow.errors import ExpertflowError
from expertflow.embedded import EMBEDDED_MODEL_NAME, EMBEDDED_PREDICTOR_DIR
from expertflow.cache.policies.forecast import one_hot_routing
from expertflow.simulator import SimConfig, batch_forwards, simulate
from expertflow.traces import TraceHeader, TraceSequence, TraceSet, read_traces
from tests.test_policy_exactness import HashPredictor

PROMPTS = [[70, 3, 9, 44, 2, 19, 7], [21, 22, 23, 24, 25, 26, 27]]  # equal lengths, no eos within 8 tokens


def _traces(prompts, out) -> TraceSet:
    header = TraceHeader(model="tiny", num_layers=3, num_experts=8, top_k=2)
    return TraceSet(header, [TraceSequence(p, g, r) for p, g, r in zip(prompts, out.sequences, out.routing)])


def test_forwards_group_sequences_as_the_engine_does():
    header = TraceHeader(model="t", num_layers=1, num_experts=4, top_k=1)
    seqs = [TraceSequence([1, 2], [3], np.array([[[0]], [[1]], [[2]]])),
            TraceSequence([4], [5, 6], np.array([[[3]], [[3]], [[1]]]))]
    forwards = batch_forwards(TraceSet(header, seqs), batch_size=2)
    assert [(f.prefill, f.experts) for f in forwards] == [(True, ((0, 1, 3),)), (False, ((2, 3),)), (False, ((1,),))]
    assert len(batch_forwards(TraceSet(header, seqs), batch_size=1)) == 2 + 3


@pytest.mark.parametrize("policy", ["lru", "lfu", "ring", "pregated", "expertflow"])
@pytest.mark.parametrize("batch", [1, 2])
def test_simulator_counts_what_the_live_engine_counts(tiny_mixtral_dir, policy, batch):
    prompts = PROMPTS[:batch]
    predictor = HashPredictor(3, 8)
    m = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=7, policy=policy, transfer_ratio=1.5,
                                   predictor=predictor if policy == "expertflow" else None)
    out = m.generate(input_ids=prompts, max_new_tokens=8, record_routing=True)
    m.close()
    live = m.stats
    traces = _traces(prompts, out)
    assert all(len(s.generated_ids) == 8 for s in traces.sequences)  # no early eos: every forward is traced
    predictions = [predictor.per_token(list(s.token_ids)) for s in traces.sequences]
    sim = simulate(batch_forwards(traces, batch, predictions), [0, 1, 2], 8, 2,
                   SimConfig(policy, 7, batch, transfer_ratio=1.5, count_prefill=True)).counters
    assert (sim.hits, sim.correction_loads, sim.loads, sim.prefetch_loads, sim.evictions) == (
        live.hits, live.correction_loads, live.expert_loads, live.prefetch_loads, live.evictions)
    assert (sim.prefetch_hits, sim.wasted_prefetches, sim.stale_prefetches, sim.reloads) == (
        live.prefetch_hits, live.wasted_prefetches, live.stale_prefetches, live.reloads)
    # every forward has ended: each prefetch was used by its forward, evicted unused, or left stale
    assert sim.prefetch_loads == sim.prefetch_hits + sim.wasted_prefetches + sim.stale_prefetches


def _synthetic_traces(path, seed=0, model="synthetic"):
    rng = np.random.default_rng(seed)
    header = TraceHeader(model=model, num_layers=8, num_experts=32, top_k=2, dataset="synthetic")
    seqs = []
    for _ in range(6):
        tokens = 12
        routing = np.stack([np.stack([rng.choice(32, 2, replace=False) for _ in range(8)]) for _ in range(tokens)])
        seqs.append(TraceSequence(rng.integers(0, 100, 6), rng.integers(0, 100, 6), routing))
    TraceSet(header, seqs).write(path)
    return path


def test_simulate_cli_prints_table_json_and_plot(tmp_path, capsys):
    traces = _synthetic_traces(tmp_path / "t.safetensors")
    plot = tmp_path / "hit.png"
    code = main(["simulate", "--traces", str(traces), "--policies", "lru,expertflow,belady",
                 "--cache-experts", "10%,64", "--batch-size", "1,4", "--predictor", "oracle",
                 "--transfer-ratio", "4", "--json", "--plot", str(plot)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    results = json.loads(lines[-1])["results"]
    assert len(results) == 3 * 2 * 2
    contract = {"policy", "cache_experts", "batch_size", "hit_ratio", "loads", "bytes_moved", "loads_vs_belady"}
    breakdown = {"correction_loads", "prefetch_loads", "prefetch_hits", "wasted_prefetches", "stale_prefetches",
                 "reloads"}
    old_names = {"demand_loads"}  # correction_loads's earlier name, still written for scripts that read it
    assert all(set(r) == contract | breakdown | old_names for r in results)
    assert all(r["loads"] == r["correction_loads"] + r["prefetch_loads"] for r in results)
    assert all(r["demand_loads"] == r["correction_loads"] for r in results)
    assert all(r["prefetch_loads"] == r["prefetch_hits"] + r["wasted_prefetches"] + r["stale_prefetches"]
               for r in results)
    assert all(r["prefetch_loads"] == 0 for r in results if r["policy"] in ("lru", "belady"))
    assert {r["cache_experts"] for r in results} == {26, 64}
    assert all(r["loads_vs_belady"] >= 1.0 for r in results)
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--policies", "lru,nope"], "unknown policy"),
    (["--policies", "expertflow"], "--predictor"),
    (["--cache-experts", "150%"], "percentage"),
    (["--batch-size", "0"], "positive"),
])
def test_simulate_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    traces = _synthetic_traces(tmp_path / "t.safetensors")
    assert main(["simulate", "--traces", str(traces), "--transfer-ratio", "2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_simulate_plans_from_the_shipped_predictor_on_traces_of_the_embedded_model(tmp_path, capsys):
    traces = _synthetic_traces(tmp_path / "t.safetensors", model=EMBEDDED_MODEL_NAME)
    args = ["simulate", "--traces", str(traces), "--policies", "expertflow", "--cache-experts", "64",
            "--transfer-ratio", "4", "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"predictor {EMBEDDED_PREDICTOR_DIR}" in " ".join(out.split())
    shipped = json.loads(out.strip().splitlines()[-1])["results"]
    assert main([*args, "--predictor", str(EMBEDDED_PREDICTOR_DIR)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"] == shipped


def test_policy_settings_replay_like_the_defaults_when_equal_and_count_when_not(tmp_path):
    traces = read_traces(_synthetic_traces(tmp_path / "t.safetensors"))
    forwards = batch_forwards(traces, 1, [one_hot_routing(s.routing, 32) * 0.4 for s in traces.sequences])
    layers = list(range(8))
    run = lambda knobs: simulate(forwards, layers, 32, 2,  # noqa: E731
                                 SimConfig("expertflow", 40, 1, transfer_ratio=4, policy_settings=knobs)).counters
    named = run(())
    assert run((("threshold", 0.5),)) == named
    assert named.prefetch_loads > 0  # forecasts of 0.4: spare prefetches, the link moves 4 per layer
    confident_only = run((("spare_threshold", 0.5),))
    assert confident_only.prefetch_loads == 0 < run((("spare_threshold", 0.5), ("threshold", 0.3))).prefetch_loads
    with pytest.raises(ExpertflowError, match="policy 'lru' has no settings"):
        simulate(forwards, layers, 32, 2, SimConfig("lru", 40, 1, policy_settings=(("threshold", 0.3),)))