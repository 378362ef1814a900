"""The routing predictor shipped with the embedded model: the default for forecasting policies on that model,
exact outputs with it, and real accuracy on prompts it was never trained on (alpaca records past 800)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import expertflow
from expertflow.config import EngineConfig
from expertflow.datasets import load_prompts
from expertflow.embedded import EMBEDDED_PREDICTOR_DIR
from expertflow.errors import ExpertflowError
from expertflow.predictor.baselines import TemporalBaseline
from expertflow.predictor.evaluate import EvalConfig, evaluate
from expertflow.predictor.runtime import RoutingPredictor
from expertflow.trace_collection import TracingConfig, collect_traces, encode_prompts
from tests.reference import reference_generate

PROMPTS = ["Describe a process of making crepes.", "Give three tips for staying healthy."]


def test_forecasting_policies_on_the_embedded_model_default_to_its_predictor(tiny_mixtral_dir):
    assert EngineConfig(cache_experts=64, policy="expertflow").predictor == EMBEDDED_PREDICTOR_DIR
    assert EngineConfig(cache_experts=64, policy="lru").predictor is None
    assert EngineConfig(model=tiny_mixtral_dir, cache_experts=8, policy="expertflow").predictor is None


def test_loading_a_predictor_checks_its_shape_against_the_model() -> None:
    assert RoutingPredictor.load(EMBEDDED_PREDICTOR_DIR, expect=(8, 32)).config.num_experts == 32
    message = (f"predictor {EMBEDDED_PREDICTOR_DIR} forecasts 8 layers x 32 experts but the model has 8 x 64; "
               "train one on this model's traces")
    with pytest.raises(ExpertflowError, match=f"^{re.escape(message)}$"):
        RoutingPredictor.load(EMBEDDED_PREDICTOR_DIR, expect=(8, 64))


def test_expertflow_on_the_embedded_model_is_exact_with_the_shipped_predictor(embedded_model_dir):
    m = expertflow.from_pretrained(cache_experts=26, policy="expertflow", store="disk")
    try:
        prompts = [m.encode(p) for p in PROMPTS]
        ours = m.generate(input_ids=prompts, max_new_tokens=12)
        assert ours.sequences == reference_generate(embedded_model_dir, prompts, 12, m.engine.parts.pad_token_id)[0]
        assert ours.stats.prefetch_hits > 0
    finally:
        m.close()


def test_the_shipped_predictor_beats_the_previous_step_on_held_out_prompts():
    m = expertflow.from_pretrained()
    config = TracingConfig(dataset="alpaca", max_new_tokens=16)
    prompts = load_prompts("alpaca", limit=8, skip=900)
    traces = collect_traces(m, encode_prompts(m.tokenizer, prompts, config.max_prompt_tokens), config)
    m.close()
    predictor = RoutingPredictor.load(EMBEDDED_PREDICTOR_DIR)
    L, E = traces.header.num_layers, traces.header.num_experts
    scorers = {"rpp": lambda seq, pos: predictor.predict_array(seq.token_ids)[pos],
               "tlp": TemporalBaseline(np.full((L, E), 1 / E)).scores}
    r = evaluate(traces, scorers, EvalConfig(batch_size=1))
    # Measured on 200 held-out alpaca prompts: RPP 0.911, TLP 0.389 at batch 1.
    assert r["rpp"]["b_acc"] > 0.85 and r["rpp"]["b_acc"] > r["tlp"]["b_acc"] + 0.3, (r["rpp"]["b_acc"], r["tlp"]["b_acc"])
