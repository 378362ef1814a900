"""Every policy, with and without a forecast, keeps the live engine's greedy tokens identical to transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import expertflow
from expertflow.errors import ExpertflowError
from expertflow.cache.policies.forecast import one_hot_routing
from tests.devices import DEVICES
from tests.reference import reference_generate

PROMPTS = [[5, 17, 33, 8, 41, 60, 12], [70, 3, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
NEW_TOKENS = 10


class HashPredictor:
    """A deterministic predictor that knows nothing of the model: per token, two pseudo-random experts per
    layer at probability 0.9. For the engine it is a deliberately wrong RPP."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts

    def per_token(self, ids: list[int]) -> np.ndarray:  # (S,) -> (S, L, E)
        probs = np.full((len(ids), self.num_layers, self.num_experts), 0.02, dtype=np.float32)
        for s, t in enumerate(ids):
            for layer in range(self.num_layers):
                probs[s, layer, (3 * t + layer) % self.num_experts] = 0.9
                probs[s, layer, (5 * t + 2 * layer + 1) % self.num_experts] = 0.9
        return probs

    def predict(self, token_ids: list[list[int]]) -> torch.Tensor:
        width = max(map(len, token_ids))
        out = np.zeros((len(token_ids), width, self.num_layers, self.num_experts), dtype=np.float32)
        for b, ids in enumerate(token_ids):
            out[b, : len(ids)] = self.per_token(ids)
        return torch.from_numpy(out)

    def predict_next(self, token_ids: list[list[int]]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.per_token(ids)[-1] for ids in token_ids]))

    # Incremental use: a sequence's state is simply its token ids so far.
    def start_rows(self, token_ids: list[list[int]]) -> tuple[list, torch.Tensor]:
        return [list(ids) for ids in token_ids], self.predict_next(token_ids)

    def step_rows(self, states: list, tokens: list[int]) -> tuple[list, torch.Tensor]:
        states = [s + [t] for s, t in zip(states, tokens)]
        return states, self.predict_next(states)


class OraclePredictor(HashPredictor):
    """Knows the routing of a recorded run: the prefix of token ids -> that last token's true routing."""

    def __init__(self, num_layers: int, num_experts: int, prompts, out) -> None:
        super().__init__(num_layers, num_experts)
        self.truth: dict[tuple[int, ...], np.ndarray] = {}
        for prompt, generated, routing in zip(prompts, out.sequences, out.routing):
            ids = list(prompt) + list(generated)
            hot = one_hot_routing(routing, num_experts)
            for t in range(len(ids)):
                self.truth[tuple(ids[: t + 1])] = hot[t]

    def per_token(self, ids: list[int]) -> np.ndarray:
        return np.stack([self.truth[tuple(ids[: t + 1])] for t in range(len(ids))])


@pytest.fixture(scope="module")
def references(tiny_mixtral_dir):
    """transformers' greedy tokens on each device, computed on first use."""
    cache: dict[str, list[list[int]]] = {}

    def on(device: str) -> list[list[int]]:
        if device not in cache:
            cache[device] = reference_generate(tiny_mixtral_dir, PROMPTS, NEW_TOKENS, pad_token_id=1,
                                               device=device)[0]
        return cache[device]

    return on


@pytest.fixture(scope="module")
def reference(references):
    return references("cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["lru", "lfu", "ring", "pregated", "expertflow"])
@pytest.mark.parametrize("cache", [6, 12])
def test_every_policy_keeps_greedy_tokens_exact(tiny_mixtral_dir, references, policy, cache, device):
    """The exactness grid; on CUDA the default store is host RAM (pinned) and transfers use a side stream."""
    predictor = HashPredictor(3, 8) if policy == "expertflow" else None
    m = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=cache, policy=policy, predictor=predictor,
                                   transfer_ratio=2.0, device=device)
    try:
        assert m.generate(input_ids=PROMPTS, max_new_tokens=NEW_TOKENS).sequences == references(device)
        assert m.stats.expert_loads == m.stats.prefetch_loads + m.stats.correction_loads
    finally:
        m.close()


def test_wrong_predictor_is_exact_and_only_costs_loads(tiny_mixtral_dir, reference):
    recorded = expertflow.from_pretrained(tiny_mixtral_dir).generate(input_ids=PROMPTS, max_new_tokens=NEW_TOKENS,
                                                                     record_routing=True)
    runs = {}
    for name, predictor in (("oracle", OraclePredictor(3, 8, PROMPTS, recorded)), ("wrong", HashPredictor(3, 8))):
        m = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=12, policy="expertflow", predictor=predictor)
        # record_routing replays the last tokens too, so the oracle knows every forward's routing
        assert m.generate(input_ids=PROMPTS, max_new_tokens=NEW_TOKENS, record_routing=True).sequences == reference
        runs[name] = m.stats
        m.close()
    oracle, wrong = runs["oracle"], runs["wrong"]
    assert wrong.correction_loads > oracle.correction_loads
    assert wrong.wasted_prefetches > 0
    assert wrong.hit_ratio < oracle.hit_ratio


def test_expertflow_without_predictor_names_the_flag(tiny_mixtral_dir):
    with pytest.raises(ExpertflowError, match="--predictor"):
        expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=8, policy="expertflow")


def test_belady_is_simulator_only(tiny_mixtral_dir):
    with pytest.raises(ExpertflowError, match="simulate"):
        expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=8, policy="belady")


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "qwen2_moe"])
@pytest.mark.parametrize("policy", ["lfu", "ring", "pregated", "expertflow"])
def test_every_policy_is_exact_on_other_families(tiny_model_dirs, family, policy):
    model_dir = tiny_model_dirs[family]
    probe = expertflow.from_pretrained(model_dir)
    layers, experts = probe.num_moe_layers, probe.num_experts
    predictor = HashPredictor(layers, experts) if policy == "expertflow" else None
    m = expertflow.from_pretrained(model_dir, cache_experts=2 * layers + 1, policy=policy, predictor=predictor,
                                   transfer_ratio=2.0)
    try:
        out = m.generate(input_ids=PROMPTS, max_new_tokens=NEW_TOKENS)
        assert out.sequences == reference_generate(model_dir, PROMPTS, NEW_TOKENS,
                                                   pad_token_id=m.engine.parts.pad_token_id)[0]
    finally:
        m.close()
