"""Policies on an encoder-decoder model (Switch): each forward plans within the MoE layers it runs, and an
RPP drives `expertflow` on both stacks. Greedy tokens stay identical to transformers' `generate`; the
simulator and the live engine count the same loads; a decoder step's plan holds decoder keys only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import expertflow
from expertflow.cache.direct_io import SLOT_SLACK
from expertflow.cli import main
from expertflow.config import EngineConfig
from expertflow.loading import load
from expertflow.cache.policies import policy_class
from expertflow.cache.planner import CachePlanner
from expertflow.predictor.metrics import routing_mask
from expertflow.predictor.model import PredictorConfig, RoutingPathModel, save_model
from expertflow.predictor.runtime import RoutingPredictor
from expertflow.predictor.train import TrainConfig, _collate, _loss, train_predictor
from expertflow.cache.residency import Residency
from expertflow.engine.routing import RoutingRecorder
from expertflow.engine.seq2seq_runner import Seq2SeqRunner
from expertflow.simulator import Forward, SimConfig, batch_forwards, forward_layers, simulate
from expertflow.engine.steps import generate
from expertflow.traces import NO_EXPERT, TraceHeader, TraceSequence, TraceSet
from tests.test_policy_exactness import HashPredictor
from tests.test_switch import (EXPERTS, LAYERS, NEW_TOKENS, PROMPTS, _assert_matches, reference,  # noqa: F401
                               reference_generate, switch_dir)

ENCODER, DECODER = (0, 1), (2, 3)
TRAIN_PROMPTS = [[(7 * i + 3 * j) % 8000 + 2 for j in range(5 + i % 9)] for i in range(24)]


def _engine(model_dir: Path, recorder: RoutingRecorder, predictor=None, **config) -> Seq2SeqRunner:
    """The engine as from_pretrained assembles it, with the caller's recorder."""
    parts = load(EngineConfig(model=model_dir, **config), observer=recorder.observe)
    return Seq2SeqRunner(parts, recorder, predictor)


def _record(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> TraceSet:
    """Greedy routing traces of the model (all experts resident), as `expertflow trace` records them."""
    engine = _engine(model_dir, RoutingRecorder())
    out = generate(engine, prompts, max_new_tokens=new_tokens, record_routing=True)
    engine.parts.cache.close()
    header = TraceHeader(model="tiny-switch", num_layers=LAYERS, num_experts=EXPERTS, top_k=1, vocab_size=8192)
    return TraceSet(header, [TraceSequence(p, g, r, prompt_index=i)
                             for i, (p, g, r) in enumerate(zip(prompts, out.sequences, out.routing))])


@pytest.fixture(scope="module")
def trained(switch_dir, tmp_path_factory) -> tuple[RoutingPredictor, Path]:
    """A small RPP trained for a few epochs on Switch traces made here, and its saved directory."""
    traces = _record(switch_dir, TRAIN_PROMPTS, 6)
    config = PredictorConfig(vocab_size=8192, num_layers=LAYERS, num_experts=EXPERTS, top_k=1, d_model=32,
                             d_ff=64, num_heads=2, encoder_layers=1, decoder_layers=1, window=16)
    result = train_predictor([traces], config, TrainConfig(epochs=4, batch_size=4, warmup_steps=2, lr=5e-3,
                                                           val_fraction=0.0), progress=False)
    directory = save_model(result.model, tmp_path_factory.mktemp("rpp") / "rpp")
    return RoutingPredictor(result.model), directory


def _generate(model_dir: Path, predictor, prompts=PROMPTS, **config):
    engine = _engine(model_dir, RoutingRecorder(), predictor, **config)
    try:
        return generate(engine, prompts, max_new_tokens=NEW_TOKENS)
    finally:
        engine.parts.cache.close()


@pytest.mark.parametrize("store", ["host", "disk"])
@pytest.mark.parametrize("cache", [2, 5, 12])
def test_ring_matches_transformers(switch_dir, reference, store, cache):
    out = _generate(switch_dir, None, cache_experts=cache, policy="ring", store=store, transfer_ratio=1.0)
    _assert_matches(out, reference)
    assert out.stats.prefetch_loads > 0 and out.stats.peak_expert_bytes <= cache * (out.stats.expert_bytes + SLOT_SLACK)


@pytest.mark.parametrize("store", ["host", "disk"])
@pytest.mark.parametrize("cache", [1, 5, 12])
@pytest.mark.parametrize("rpp", ["trained", "wrong"])
def test_expertflow_with_a_predictor_matches_transformers(switch_dir, reference, trained, store, cache, rpp):
    predictor = trained[0] if rpp == "trained" else HashPredictor(LAYERS, EXPERTS)
    out = _generate(switch_dir, predictor, cache_experts=cache, policy="expertflow", store=store)
    _assert_matches(out, reference)
    assert out.stats.expert_loads == out.stats.prefetch_loads + out.stats.correction_loads
    if cache == 12:  # room to act on the forecast: the plan prefetched
        assert out.stats.prefetch_loads > 0


def test_generate_cli_with_a_predictor(switch_dir, trained, capsys):
    prompt = "Translate to Finnish: the house is small."
    rc = main(["generate", "--model", str(switch_dir), "--policy", "expertflow", "--predictor", str(trained[1]),
               "--cache-experts", "6", "--store", "disk", "--prompt", prompt, "--max-new-tokens", "6", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = expertflow.from_pretrained(switch_dir).encode(prompt)
    assert result["token_ids"] == reference_generate(switch_dir, [ids], 6)[0][0]
    assert result["expert_loads"] > 0


def test_bench_runs_expertflow_on_switch(switch_dir, trained, tmp_path):
    """The bench's expertflow system (an RPP) on an encoder-decoder model: same tokens as transformers."""
    from expertflow.bench.harness import run_bench
    from expertflow.bench.spec import BenchConfig, CacheSize

    config = BenchConfig(model=switch_dir, systems=["all-in-memory", "expertflow"], cache_sizes=[CacheSize("25%")],
                         batch_sizes=[2], out=tmp_path / "out", max_new_tokens=5, predictor=trained[1])
    doc = run_bench(config, [[5, 17, 33, 8], [70, 3, 9, 44, 2], [11, 12, 13, 14, 15, 16]])
    assert doc["same_tokens"] is True
    run = [r for r in doc["results"] if r["system"] == "expertflow"][0]
    assert run["cache_experts"] == 8 and run["expert_loads"] > 0


class ForwardLog(RoutingRecorder):
    """Keeps every forward's routing the engine takes, the decoder-start forward's too (traces drop it)."""

    def __init__(self) -> None:
        super().__init__()
        self.forwards: list[np.ndarray] = []  # per forward (tokens, its layers, K)

    def take(self) -> np.ndarray:
        taken = super().take()
        self.forwards.append(taken)
        return taken


def _experts(taken: np.ndarray, layers: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """A logged forward's (tokens, len(layers), K) routing -> per MoE layer of the model its unique experts."""
    used = {layer: sorted({int(e) for e in taken[:, i].ravel() if 0 <= e < EXPERTS}) for i, layer in enumerate(layers)}
    return tuple(tuple(used.get(layer, ())) for layer in range(LAYERS))


# Equal lengths: the live encoder also routes right-padding, which traces leave out.
EQUAL_PROMPTS = [[70, 3, 9, 44, 2, 19, 7], [21, 22, 23, 24, 25, 26, 27]]


@pytest.mark.parametrize("policy", ["lru", "ring", "pregated", "expertflow"])
@pytest.mark.parametrize("batch", [1, 2])
def test_simulator_counts_what_the_live_engine_counts(switch_dir, policy, batch):
    """The live run's forwards are the trace's plus the decoder-start forward (no trace row): replayed with
    the forward's layers and the same forecasts, the simulator counts exactly the live cache's figures.
    HashPredictor forecasts exactly (a trained RPP's incremental rows equal its full forward only up to
    float rounding, which could tip a threshold)."""
    prompts = EQUAL_PROMPTS[:batch]
    predictor = HashPredictor(LAYERS, EXPERTS) if policy == "expertflow" else None
    log = ForwardLog()
    engine = _engine(switch_dir, log, predictor, cache_experts=5, policy=policy, transfer_ratio=1.5)
    out = generate(engine, prompts, max_new_tokens=NEW_TOKENS, record_routing=True)
    engine.parts.cache.close()
    live = out.stats
    assert all(len(s) == NEW_TOKENS for s in out.sequences)  # no early eos: every forward is traced
    traces = TraceSet(TraceHeader(model="t", num_layers=LAYERS, num_experts=EXPERTS, top_k=1),
                      [TraceSequence(p, g, r) for p, g, r in zip(prompts, out.sequences, out.routing)])
    assert forward_layers(traces) == (ENCODER, DECODER)
    predictions = [predictor.per_token(list(s.token_ids)) for s in traces.sequences] if predictor else None
    traced = batch_forwards(traces, batch, predictions)
    assert [fw.layers for fw in traced] == [ENCODER] + [DECODER] * NEW_TOKENS
    logged = [_experts(log.forwards[0], ENCODER)] + [_experts(t, DECODER) for t in log.forwards[1:]]
    assert [fw.experts for fw in traced] == [logged[0], *logged[2:]]
    start = Forward(logged[1], None, prefill=False, layers=DECODER)
    sim = simulate([traced[0], start, *traced[1:]], range(LAYERS), EXPERTS, 1,
                   SimConfig(policy, 5, batch, transfer_ratio=1.5, count_prefill=True)).counters
    assert (sim.hits, sim.correction_loads, sim.loads, sim.prefetch_loads, sim.evictions,
            sim.wasted_prefetches) == (live.hits, live.correction_loads, live.expert_loads, live.prefetch_loads,
                                       live.evictions, live.wasted_prefetches)


def _planner(policy: str, capacity: int, experts: int = 4) -> CachePlanner:
    cls = policy_class(policy)
    return CachePlanner(Residency(capacity, cls(capacity, list(range(LAYERS)), experts, 1)), None)


def test_ring_plans_a_decoder_step_within_decoder_layers():
    planner = _planner("ring", 8)  # half = 4 = a whole layer of 4 experts
    issued = planner.begin_step(None, DECODER)
    assert [key for key, _ in issued] == [(2, 0), (2, 1), (2, 2), (2, 3)]  # not the encoder's layer 0
    planner.route(2, [(2, 1)])
    planner.residency.use((2, 1))
    assert [key for key, _ in planner.finish_layer(2)] == [(3, 0), (3, 1), (3, 2), (3, 3)]
    planner.route(3, [(3, 2)])
    planner.residency.use((3, 2))
    assert planner.finish_layer(3) == []  # the forward's last layer: nothing after it in this forward
    # The encode forward that follows fills layer 0; the decoder layer that runs last in the ring's order
    # (3, least used first) makes room, then layer 2.
    issued = planner.begin_step(None, ENCODER)
    assert [(key, p.evicted) for key, p in issued] == [((0, 0), (3, 0)), ((0, 1), (3, 1)), ((0, 2), (3, 3)),
                                                       ((0, 3), (3, 2))]


def test_forecast_keys_outside_the_forward_are_neither_planned_nor_prefetched():
    planner = _planner("expertflow", 8)
    forecast = {(0, 1): 0.9, (1, 2): 0.95, (2, 3): 0.6, (3, 0): 0.99, (3, 1): 0.2}
    issued = planner.begin_step(forecast, DECODER)
    assert [key for key, _ in issued] == [(2, 3), (3, 0)]  # the encoder's likely keys wait for the encoder
    beta = planner.policy.config.beta
    assert planner.policy.value((0, 1)) == 0.0 and planner.policy.value((3, 0)) == pytest.approx(0.99 * beta**2)
    issued = planner.begin_step(forecast, ENCODER)
    assert [key for key, _ in issued] == [(0, 1), (1, 2)] and planner.residency.counters.prefetch_loads == 4


def _use(planner: CachePlanner, layer: int, expert: int) -> None:
    planner.route(layer, [(layer, expert)])
    planner.residency.use((layer, expert))
    planner.finish_layer(layer)


def test_plec_values_other_stack_keys_below_the_forwards_own_and_evicts_them_first():
    planner = _planner("expertflow", 4)
    planner.begin_step(None)  # one forward over every layer: expert 0 of each, the same usage u = 1 - decay
    for layer in range(LAYERS):
        _use(planner, layer, 0)
    planner.begin_step(None, DECODER)
    policy = planner.policy
    beta, decay = policy.config.beta, policy.config.decay
    u = (1 - decay) * decay  # one forward of decay
    # Distances within the forward (2 layers, none run yet); the encoder's keys lie beyond it.
    assert [policy.value((layer, 0)) for layer in range(LAYERS)] == pytest.approx(
        [u * beta**7, u * beta**7, u * beta**3, u * beta**4])
    _use(planner, 2, 1)  # a miss in a full cache: the victim is an encoder key, not a decoder one
    assert (0, 0) not in planner.residency and {(1, 0), (2, 0), (3, 0), (2, 1)} == set(planner.residency.slot_of)


def _switch_shaped_forwards() -> list[Forward]:
    """An encode forward then two decoder steps, top-1 over 4 experts."""
    encode = Forward(((0,), (1,), (), ()), None, prefill=True, layers=ENCODER)
    decode = Forward(((), (), (0,), (1,)), None, prefill=False, layers=DECODER)
    return [encode, decode, decode]


def test_simulated_ring_on_a_switch_shaped_trace_loads_only_what_the_forwards_run():
    result = simulate(_switch_shaped_forwards(), range(LAYERS), 4, 1, SimConfig("ring", 8, 1, count_prefill=True))
    c = result.counters
    # Encode: layers 0 and 1 prefetched whole (8); step 1: layers 2 and 3 (8), evicting layer 1 then 0;
    # step 2: everything resident. No encoder layer is prefetched during a decoder step.
    assert (c.loads, c.prefetch_loads, c.correction_loads, c.hits, c.evictions) == (16, 16, 0, 6, 8)


def test_routing_mask_sets_no_expert_for_no_expert_entries():
    mask = routing_mask(np.array([[[2], [NO_EXPERT]], [[NO_EXPERT], [3]]]), 4)
    assert mask.astype(int).tolist() == [[[0, 0, 1, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 1]]]


def test_training_masks_layers_a_token_never_passed():
    """A prompt row's decoder layers and a generated row's encoder layers (-1) are out of the loss: not
    taught as expert E-1, not as "no expert"; the loss is the BCE over the routed (token, layer) pairs only."""
    routing = np.array([[[1], [2], [-1], [-1]], [[0], [-1], [-1], [-1]], [[-1], [-1], [3], [0]]], dtype=np.int16)
    ids, targets, valid, soft = _collate([(np.array([5, 6, 7]), routing, None)], EXPERTS)
    assert soft is None
    assert valid[0].tolist() == [[True, True, False, False], [True, False, False, False],
                                 [False, False, True, True]]
    assert targets[0, :, :, EXPERTS - 1].sum() == 0 and targets[0].sum() == 5
    torch.manual_seed(0)
    model = RoutingPathModel(PredictorConfig(vocab_size=16, num_layers=LAYERS, num_experts=EXPERTS, top_k=1,
                                             d_model=8, d_ff=16, num_heads=2, window=4, dropout=0.0)).eval()
    loss, hits, count, bce = _loss(model, [(np.array([5, 6, 7]), routing, None)], EXPERTS, TrainConfig())
    assert bce is loss
    logits = model(ids)[0]
    pairs = [(s, layer) for s in range(3) for layer in range(LAYERS) if valid[0, s, layer]]
    expected = torch.stack([F.binary_cross_entropy_with_logits(logits[s, layer], targets[0, s, layer])
                            for s, layer in pairs]).mean()
    torch.testing.assert_close(loss, expected)
    top = logits.argmax(-1)
    assert count == 5 and float(hits) == sum(float(targets[0, s, layer, top[s, layer]]) for s, layer in pairs)
