"""The step loop: prefill, then one token at a time with the model's KV cache, sampling as it goes.

Each step: predict (the RPP forecasts the coming forward's routing, when there is a predictor), plan and
prefetch (the cache's policy turns the forecast into background transfers), run, sample.
The engine owns its decode loop (rather than calling `model.generate`) because later stages regroup
sequences between steps; tests check its tokens against transformers' own `generate`.

Shape legend: B sequences, S positions, V vocabulary, L MoE layers, K top_k.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from expertflow.adapters.kv_argument import KVArgument
from expertflow.errors import ExpertflowError
from expertflow.cache.offloaded_experts import first_nonfinite_layer
from expertflow.loading import OffloadedModel
from expertflow.cache.policies import Forecast
from expertflow.cache.policies.forecast import batch_forecast
from expertflow.routing import RoutingRecorder
from expertflow.stats import RunStats


@dataclass(frozen=True)
class GenerationOutput:
    """Generated ids per input (cut after the first eos, which is kept), optional routing, and the figures."""

    prompt_ids: list[list[int]]
    sequences: list[list[int]]
    stats: RunStats
    routing: list[np.ndarray] | None = None  # per input: int16 (prompt + generated tokens, L, K)
    last_logits: torch.Tensor | None = None  # (B, V) float32 logits of the last decoding step


def check_temperature(temperature: float) -> None:
    """The one rule for a sampling temperature, whichever front end it came through (CLI, API, traces)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ExpertflowError(f"--temperature must be a finite number >= 0, got {temperature}")


class Sampler:
    """Greedy at temperature 0, otherwise softmax sampling from a seeded generator."""

    def __init__(self, temperature: float, seed: int | None) -> None:
        check_temperature(temperature)
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed if seed is not None else 0)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / self.temperature, dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1).to(logits.device)


# Row b of a forward whose logits went non-finite -> the MoE layer whose experts' output first did, or None.
NonFiniteLocator = Callable[[int], int | None]


def check_logits(logits: torch.Tensor, steps: list[int], locate: NonFiniteLocator | None = None,
                 done: torch.Tensor | None = None) -> None:
    """Stop on NaN/Inf logits (B, V) before they are sampled (their argmax is token 0, silently).

    `steps[b]`: the tokens row b has generated (0: these logits are its prefill's); rows set in `done` (B,)
    are not sampled, so not checked. One reduction and one sync per forward; `locate` runs only on failure."""
    finite = torch.isfinite(logits).all(dim=-1)  # (B,)
    if done is not None:
        finite |= done
    if bool(finite.all()):
        return
    row = int((~finite).nonzero()[0])
    where = "prefill" if steps[row] == 0 else f"decode step {steps[row]}"
    layer = locate(row) if locate is not None else None
    first = f" (first in the experts' output of MoE layer {layer})" if layer is not None else ""
    raise ExpertflowError(f"the model's logits are NaN/Inf at {where}{first}; its weights are corrupt or "
                          "overflow the dtype: check or re-download the checkpoint, or pass --dtype float32")


def sample_step(sampler: Sampler, logits: torch.Tensor, finished: torch.Tensor, generated: list[list[int]],
                eos: torch.Tensor, pad_token_id: int, locate: NonFiniteLocator | None = None) -> torch.Tensor:
    """Sample the batch's next tokens (B,), append them to the unfinished sequences, and mark those that
    reached eos in `finished` (in place); finished rows get padding. Non-finite logits stop the run
    (`check_logits`, with `locate` naming the layer)."""
    check_logits(logits, [len(g) for g in generated], locate, done=finished)
    token = torch.where(finished, pad_token_id, sampler(logits))
    for b in torch.nonzero(~finished).flatten().tolist():
        generated[b].append(int(token[b]))
    finished |= torch.isin(token, eos)
    return token


def check_request(input_ids: list[list[int]], max_new_tokens: int, max_positions: int | None) -> None:
    """One-line errors for requests no engine can run: an empty prompt, no new tokens, past the context."""
    if not input_ids or any(len(p) == 0 for p in input_ids):
        raise ExpertflowError("empty prompt: give at least one token of input")
    if max_new_tokens < 1:
        raise ExpertflowError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    longest = max(map(len, input_ids))
    if max_positions and longest + max_new_tokens > max_positions:
        raise ExpertflowError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's context of "
            f"{max_positions}; shorten the prompt or lower max_new_tokens"
        )


class Predictor(Protocol):
    """What the engine needs of a routing predictor (expertflow.predictor.runtime.RoutingPredictor)."""

    def predict(self, token_ids: list[list[int]]) -> torch.Tensor: ...       # (B, S, L, E), zeros past ends

    # Incremental use with one state per sequence (sequences may be regrouped between steps):
    def start_rows(self, token_ids: list[list[int]]) -> tuple[list, torch.Tensor]: ...  # states, (B, L, E)

    def step_rows(self, states: list, tokens: list[int]) -> tuple[list, torch.Tensor]: ...  # states, (B, L, E)


class Engine:
    def __init__(self, parts: OffloadedModel, recorder: RoutingRecorder, predictor: Predictor | None = None) -> None:
        self.parts = parts
        self.model = parts.model
        self.recorder = recorder
        self.predictor = predictor
        self.device = next(parts.model.parameters()).device
        self.max_positions = getattr(parts.model.config, "max_position_embeddings", None)
        self.kv_argument = KVArgument.of(parts.model.forward)  # `cache` or `past_key_values`, by transformers release

    @torch.inference_mode()
    def generate(self, input_ids: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 seed: int | None = None, record_routing: bool = False) -> GenerationOutput:
        check_request(input_ids, max_new_tokens, self.max_positions)
        sampler = Sampler(temperature, seed)
        eos = torch.tensor(self.parts.eos_token_ids, dtype=torch.long, device=self.device)
        ids, mask = self.left_pad(input_ids)
        batch = len(input_ids)
        routing: list[list[np.ndarray]] = [[] for _ in range(batch)]
        generated: list[list[int]] = [[] for _ in range(batch)]
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        self.recorder.enabled = record_routing
        before = self.parts.cache.figures()
        start = time.perf_counter()

        forecaster = self.forecaster(input_ids)
        logits, kv = self.forward(ids, mask, None, self.forecast(input_ids, prefill=True))
        if record_routing:
            self._keep_prompt_routing(routing, mask)
        prefill_seconds = time.perf_counter() - start
        for step in range(max_new_tokens):
            token = sample_step(sampler, logits, finished, generated, eos, self.parts.pad_token_id,
                                lambda b: self.nonfinite_layer(input_ids[b] + generated[b]))
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=self.device)], dim=1)
            forecast = forecaster.next(token.tolist(), (~finished).nonzero().flatten().tolist()) if forecaster else None
            logits, kv = self.forward(token[:, None], mask, kv, forecast)
            if record_routing:
                self._keep_step_routing(routing, generated, step)
        seconds = time.perf_counter() - start

        if record_routing:  # the last generated tokens have not been through the model yet
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=self.device)], dim=1)
            last = torch.tensor([g[-1] for g in generated], device=self.device)
            forecast = forecaster.next(last.tolist(), list(range(batch))) if forecaster else None
            self.forward(last[:, None], mask, kv, forecast)
            self._keep_step_routing(routing, generated, max(len(g) for g in generated) - 1)
        self.recorder.enabled = False

        stats = RunStats.between(before, self.parts.cache.figures(), new_tokens=sum(map(len, generated)),
                                 prompt_tokens=sum(map(len, input_ids)), seconds=seconds,
                                 prefill_seconds=prefill_seconds, resident_bytes=self.parts.resident_bytes)
        return GenerationOutput(
            prompt_ids=[list(p) for p in input_ids], sequences=generated, stats=stats,
            routing=[np.concatenate(r) for r in routing] if record_routing else None, last_logits=logits,
        )

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

    def forecaster(self, prompts: list[list[int]]) -> StepForecaster | None:
        """The RPP run alongside decoding, one incremental step per token; None when nothing plans from it."""
        if self.predictor is None or not self.parts.policy.uses_forecast:
            return None
        return StepForecaster(self.predictor, self.parts.layers, prompts)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, kv, forecast: Forecast | None):
        """One model forward over the new positions `ids` (B, S); returns last-position logits (B, V) and KV.

        The cache plans from `forecast` first, so prefetches run while the model computes."""
        self.parts.cache.begin_step(forecast)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **self.kv_argument.inputs(kv),
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].to(dtype=torch.float32), self.kv_argument.output(out)

    @torch.inference_mode()
    def nonfinite_layer(self, token_ids: list[int]) -> int | None:
        """The MoE layer whose experts' output first went NaN/Inf over one sequence's tokens, rerun without a
        KV cache, or None. Only for a run that already failed: it checks, and syncs, every layer."""
        ids = torch.tensor([token_ids], device=self.device)
        with self.recorder.paused():  # the rerun is no step of the run
            return first_nonfinite_layer(self.model, lambda: self.forward(ids, torch.ones_like(ids), None, None))

    def _keep_prompt_routing(self, routing: list[list[np.ndarray]], mask: torch.Tensor) -> None:
        batch, width = mask.shape
        taken = self.recorder.take().reshape(batch, width, *self._routing_shape())
        for b in range(batch):
            routing[b].append(taken[b][mask[b].bool().cpu().numpy()])

    def _keep_step_routing(self, routing: list[list[np.ndarray]], generated: list[list[int]], step: int) -> None:
        taken = self.recorder.take().reshape(len(generated), *self._routing_shape())
        for b, tokens in enumerate(generated):
            if step < len(tokens):
                routing[b].append(taken[b][None])

    def _routing_shape(self) -> tuple[int, int]:
        return len(self.parts.layers), self.parts.adapter.top_k


class StepForecaster:
    """Incremental RPP state for each sequence of a decode batch: each step costs one token per sequence,
    not a rerun over the context."""

    def __init__(self, predictor: Predictor, layers: list[int], prompts: list[list[int]]) -> None:
        self.predictor = predictor
        self.layers = layers
        self.states, _ = predictor.start_rows(prompts)

    def next(self, tokens: list[int], rows: list[int]) -> Forecast:
        """Forecast of the forward feeding `tokens[b]` for each running row b (finished rows feed padding)."""
        new, probs = self.predictor.step_rows([self.states[b] for b in rows], [tokens[b] for b in rows])
        for b, state in zip(rows, new):
            self.states[b] = state
        return batch_forecast(probs.float().cpu().numpy(), self.layers)
