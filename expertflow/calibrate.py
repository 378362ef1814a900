"""What a trace replay (`simulator`, pure Python) needs from the model and torch: forecasts for the traces, the
size of one expert, and the measured transfer ratio."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from expertflow.adapters import adapter_for
from expertflow.api import from_pretrained
from expertflow.cache.policies.forecast import one_hot_routing
from expertflow.config import EngineConfig
from expertflow.loading import read_config
from expertflow.predictor.runtime import RoutingPredictor
from expertflow.traces import TraceSet

_PROMPT = "Give three tips for staying healthy."


def _config(model: Path | None) -> EngineConfig:
    return EngineConfig(model=model) if model is not None else EngineConfig()


def expert_bytes(model: Path | None) -> int:
    """Bytes of one expert of the traced model in float32."""
    adapter = adapter_for(read_config(_config(model)))
    return adapter.layout.nbytes(torch.float32)


def predictions_for(traces: TraceSet, predictor: str) -> list[np.ndarray]:
    """Per sequence (T, L, E) routing probabilities: the RPP's; 'oracle': the true routing; 'tlp': the
    previous token's routing (temporal locality, the paper's TLP baseline; the first token gets none)."""
    h = traces.header
    if predictor == "oracle":
        return [one_hot_routing(s.routing, h.num_experts) for s in traces.sequences]
    if predictor == "tlp":
        return [np.concatenate([np.zeros((1, h.num_layers, h.num_experts), np.float32),
                                one_hot_routing(s.routing, h.num_experts)[:-1]]) for s in traces.sequences]
    rpp = RoutingPredictor.load(predictor, expect=(h.num_layers, h.num_experts))
    return [rpp.predict_array(s.token_ids) for s in traces.sequences]


def measure_transfer_ratio(model: Path | None, new_tokens: int = 16) -> float:
    """How many expert copies (slow tier -> fast tier) fit in one layer's decode compute, on this machine."""
    lm = from_pretrained(model)  # all experts resident: the compute alone
    ids = lm.encode(_PROMPT)
    lm.generate(input_ids=[ids], max_new_tokens=4)  # warm-up
    stats = lm.generate(input_ids=[ids], max_new_tokens=new_tokens).stats
    layer_seconds = (stats.seconds - stats.prefill_seconds) / max(stats.new_tokens - 1, 1) / lm.num_moe_layers
    store = lm.cache.store
    buffer = torch.empty(store.numel, dtype=store.dtype)
    keys = store.keys
    start = time.perf_counter()
    for key in keys:
        store.read_into(key, buffer)
    copy_seconds = (time.perf_counter() - start) / len(keys)
    return layer_seconds / copy_seconds
