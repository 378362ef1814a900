"""The decoder-only model runner: a prefill of left-padded prompts, then one decode forward a token per row
with the model's KV cache; each forward tells the cache its forecast first, so prefetches run while the model
computes. The step loop (`loop.StepLoop`) drives it; tests check its tokens against transformers' `generate`.

Shape legend: B sequences, S positions, V vocabulary, L MoE layers, E experts, K top_k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from expertflow.adapters.kv_argument import KVArgument
from expertflow.engine.kv import KVBatch
from expertflow.cache.offloaded_experts import first_nonfinite_layer
from expertflow.loading import OffloadedModel
from expertflow.cache.policies import Forecast
from expertflow.cache.policies.forecast import batch_forecast
from expertflow.engine.routing import RoutingRecorder
from expertflow.stats import RunStats


@dataclass(frozen=True)
class GenerationOutput:
    """Generated ids per input (cut after the first eos, which is kept), optional routing, and the figures."""

    prompt_ids: list[list[int]]
    sequences: list[list[int]]
    stats: RunStats
    routing: list[np.ndarray] | None = None  # per input: int16 (prompt + generated tokens, L, K)
    last_logits: torch.Tensor | None = None  # (B, V) float32 logits of the last decoding step


class Predictor(Protocol):
    """What the engine needs of a routing predictor (expertflow.predictor.runtime.RoutingPredictor)."""

    def predict(self, token_ids: list[list[int]]) -> torch.Tensor: ...       # (B, S, L, E), zeros past ends

    # Incremental use with one state per sequence (sequences may be regrouped between steps):
    def start_rows(self, token_ids: list[list[int]]) -> tuple[list, torch.Tensor]: ...  # states, (B, L, E)

    def step_rows(self, states: list, tokens: list[int]) -> tuple[list, torch.Tensor]: ...  # states, (B, L, E)


class DecoderRunner:
    def __init__(self, parts: OffloadedModel, recorder: RoutingRecorder, predictor: Predictor | None = None) -> None:
        self.parts = parts
        self.model = parts.model
        self.recorder = recorder
        self.predictor = predictor
        self.device = next(parts.model.parameters()).device
        self.max_positions = getattr(parts.model.config, "max_position_embeddings", None)
        self.kv_argument = KVArgument.of(parts.model.forward)  # `cache` or `past_key_values`, by transformers release

    def left_pad(self, input_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, input_ids))
        ids = torch.full((len(input_ids), width), self.parts.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(input_ids), width), dtype=torch.long)
        for b, prompt in enumerate(input_ids):
            ids[b, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[b, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    def forecast(self, token_ids: list[list[int]], prefill: bool) -> Forecast | None:
        """The predictor's forecast of a prefill's routing over (layer, expert) keys (every position)."""
        if self.predictor is None or not token_ids or not self.parts.policy.uses_forecast:
            return None
        probs = self.predictor.predict(token_ids).flatten(0, 1)  # (B * S, L, E)
        return batch_forecast(probs.float().cpu().numpy(), self.parts.layers)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, kv, forecast: Forecast | None):
        """One model forward over the new positions `ids` (B, S); returns last-position logits (B, V) and KV.

        The cache plans from `forecast` first, so prefetches run while the model computes."""
        self.parts.cache.begin_step(forecast)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **self.kv_argument.inputs(kv),
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].to(dtype=torch.float32), self.kv_argument.output(out)

    @torch.inference_mode()
    def nonfinite_layer(self, prompt: list[int], generated: list[int]) -> int | None:
        """The MoE layer whose experts' output first went NaN/Inf over one sequence's tokens, rerun without a
        KV cache, or None. Only for a run that already failed: it checks, and syncs, every layer."""
        ids = torch.tensor([prompt + generated], device=self.device)
        with self.recorder.paused():  # the rerun is no step of the run
            return first_nonfinite_layer(self.model, lambda: self.forward(ids, torch.ones_like(ids), None, None))

    # ---- the runner's part of the step loop (`steps.BatchRunner`) ------------------------------
    plans_fed_rows = False  # a static batch's decode forward plans from the forecasts of its running rows

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, KVBatch, list[np.ndarray]]:
        """The prompts' forward, left-padded: last logits (B, V), the batch's KV, and each prompt's routing
        (its length, L, K)."""
        ids, mask = self.left_pad(prompts)
        logits, cache = self.forward(ids, mask, None, self.forecast(prompts, True))
        routing = self.recorder.take().reshape(len(prompts), ids.shape[1], *self._routing_shape())
        real = mask.bool().cpu().numpy()
        return logits, KVBatch(cache, mask), [routing[row][real[row]] for row in range(len(prompts))]

    def decode(self, tokens: list[int], kv: KVBatch, forecast: Forecast | None
               ) -> tuple[torch.Tensor, KVBatch, np.ndarray]:
        """One decode forward, a token a row: logits (B, V), the KV grown by one position, routing (B, L, K)."""
        mask = torch.cat([kv.mask, torch.ones(len(tokens), 1, dtype=kv.mask.dtype, device=kv.mask.device)], dim=1)
        ids = torch.tensor([[t] for t in tokens], device=self.device)
        logits, cache = self.forward(ids, mask, kv.cache, forecast)
        return logits, KVBatch(cache, mask), self.recorder.take().reshape(len(tokens), *self._routing_shape())

    def plan_forecast(self, probs: np.ndarray) -> Forecast:
        """The cache's forecast for a decode forward from its rows' (rows, L, E) probabilities."""
        return batch_forecast(probs, self.parts.layers)

    def _routing_shape(self) -> tuple[int, int]:
        return len(self.parts.layers), self.parts.adapter.top_k
