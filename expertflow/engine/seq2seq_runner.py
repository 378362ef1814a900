"""The encoder-decoder model runner (Switch Transformers), driven by the same step loop as decoder-only models.

prefill: one encoder forward over the right-padded prompts (as T5-style tokenizers pad: Switch fills each
expert's capacity in position order, so padding never takes a prompt token's place), then the decoder's
start-token forward; decode: one decoder forward a token per row, with an EncoderDecoderCache. Each forward
tells the cache which stack's MoE layers it runs. Recorded routing is a row per token over every MoE layer: a
prompt token's encoder routing, a generated token's decoder routing (the start token has none); the other
stack's layers and dropped tokens hold -1. Forecasts (an RPP trained on such traces) are restricted to the
forward's stack; the start-token forward has none, as the RPP has no trained row for it.

Shape legend: B sequences, S prompt positions, V vocabulary, L MoE layers, K top_k (1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from expertflow.adapters.kv_argument import KVArgument
from expertflow.engine.runner import Predictor
from expertflow.errors import ExpertflowError
from expertflow.cache.offloaded_experts import first_nonfinite_layer
from expertflow.loading import OffloadedModel
from expertflow.cache.policies import Forecast
from expertflow.cache.policies.forecast import batch_forecast, restrict
from expertflow.engine.routing import RoutingRecorder
from expertflow.traces import NO_EXPERT


class Seq2SeqRunner:
    def __init__(self, parts: OffloadedModel, recorder: RoutingRecorder, predictor: Predictor | None = None) -> None:
        self.parts = parts
        self.model = parts.model
        self.kv_argument = KVArgument.of(parts.model.forward)  # `cache` or `past_key_values`, by transformers release
        self.recorder = recorder
        self.device = next(parts.model.parameters()).device
        stacks = {stack.name: list(stack.moe_layers) for stack in parts.adapter.stacks(parts.model)}
        if set(stacks) != {"encoder", "decoder"}:
            raise ExpertflowError(f"{parts.name} is not an encoder-decoder model; run it with the decoder engine")
        self.encoder_layers, self.decoder_layers = stacks["encoder"], stacks["decoder"]
        self.start_token_id = decoder_start_token_id(parts)
        # Forecasts only when the policy plans from them: the RPP's cost buys nothing otherwise.
        self.predictor = predictor if parts.policy.uses_forecast else None

    # ---- the runner's part of the step loop (`steps.BatchRunner`) ------------------------------
    max_positions = None    # relative position buckets: no context limit
    plans_fed_rows = True   # a decoder forward plans from the forecasts of the rows that feed a generated token

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, EncoderDecoderState, list[np.ndarray]]:
        """Encode the right-padded prompts, then the decoder's start-token forward: its logits (B, V), the state
        the decoder steps from, and each prompt's routing (its length, L, K; encoder layers set)."""
        ids, mask = self._right_pad(prompts)
        encoded = self._encode(ids, mask, self._prompt_forecast(prompts))
        encoder = self._take(self.encoder_layers, ids.numel()).reshape(*ids.shape, len(self.encoder_layers), -1)
        token = torch.full((len(prompts),), self.start_token_id, dtype=torch.long, device=self.device)
        logits, kv = self._decode(token, encoded, mask, None, None)  # the start token has no forecast (see above)
        self._take(self.decoder_layers, len(prompts))  # and no row: it is no token of the sequence
        rows = [self._full_rows(encoder[b, : len(p)], self.encoder_layers) for b, p in enumerate(prompts)]
        return logits, EncoderDecoderState(encoded, mask, kv), rows

    def decode(self, tokens: list[int], state: EncoderDecoderState, forecast: Forecast | None
               ) -> tuple[torch.Tensor, EncoderDecoderState, np.ndarray]:
        """One decoder forward, a token a row: logits (B, V), the state, routing (B, L, K; decoder layers set)."""
        token = torch.tensor(tokens, dtype=torch.long, device=self.device)
        logits, kv = self._decode(token, state.encoded, state.mask, state.kv, forecast)
        routing = self._full_rows(self._take(self.decoder_layers, len(tokens)), self.decoder_layers)
        return logits, EncoderDecoderState(state.encoded, state.mask, kv), routing

    def plan_forecast(self, probs: np.ndarray) -> Forecast:
        """A decoder forward's forecast from its rows' (rows, L, E) probabilities, restricted to the decoder."""
        return restrict(batch_forecast(probs, self.parts.layers), self.decoder_layers)

    def _right_pad(self, input_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, input_ids))
        ids = torch.full((len(input_ids), width), self.parts.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(input_ids), width), dtype=torch.long)
        for b, prompt in enumerate(input_ids):
            ids[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            mask[b, : len(prompt)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _prompt_forecast(self, input_ids: list[list[int]]) -> Forecast | None:
        """The RPP over every prompt position, restricted to the encoder's layers."""
        if self.predictor is None:
            return None
        probs = self.predictor.predict(input_ids).flatten(0, 1)  # (B * S, L, E); zeros past a prompt's end
        return restrict(batch_forecast(probs.float().cpu().numpy(), self.parts.layers), self.encoder_layers)

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor, forecast: Forecast | None):
        """The encoder's output (last_hidden_state (B, S, H)); its MoE layers are one forward through the cache."""
        self.parts.cache.begin_step(forecast, self.encoder_layers)
        return self.model.get_encoder()(input_ids=ids, attention_mask=mask)

    def _decode(self, token: torch.Tensor, encoded, mask: torch.Tensor, kv, forecast: Forecast | None):
        """One decoder forward on the newest tokens (B,); returns logits (B, V) float32 and the KV cache."""
        self.parts.cache.begin_step(forecast, self.decoder_layers)
        out = self.model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=token[:, None],
                         **self.kv_argument.inputs(kv), use_cache=True)
        return out.logits[:, -1, :].to(dtype=torch.float32), self.kv_argument.output(out)

    @torch.inference_mode()
    def nonfinite_layer(self, prompt: list[int], generated: list[int]) -> int | None:
        """The MoE layer (encoder's first) whose experts' output first went NaN/Inf over one sequence, rerun
        without a KV cache, or None. Only for a run that already failed: it checks, and syncs, every layer."""
        ids = torch.tensor([prompt], device=self.device)
        mask = torch.ones_like(ids)
        decoder_ids = torch.tensor([[self.start_token_id, *generated]], device=self.device)

        def rerun() -> None:
            encoded = self._encode(ids, mask, None)
            self.parts.cache.begin_step(None, self.decoder_layers)
            self.model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=False)

        with self.recorder.paused():  # the rerun is no step of the run
            return first_nonfinite_layer(self.model, rerun)

    def _take(self, layers: list[int], tokens: int) -> np.ndarray:
        """The last forward's routing (tokens, len(layers), K), dropped tokens as NO_EXPERT."""
        if not layers:
            return np.zeros((tokens, 0, self.parts.adapter.top_k), dtype=np.int16)
        taken = self.recorder.take()
        taken[taken >= self.parts.adapter.num_experts] = NO_EXPERT
        return taken

    def _full_rows(self, taken: np.ndarray, layers: list[int]) -> np.ndarray:
        """Rows (n, L_stack, K) of one stack's layers as rows over every MoE layer, the other stack's NO_EXPERT."""
        column = {layer: i for i, layer in enumerate(self.parts.layers)}
        out = np.full((len(taken), len(column), self.parts.adapter.top_k), NO_EXPERT, dtype=np.int16)
        if layers:
            out[:, [column[layer] for layer in layers]] = taken
        return out


@dataclass
class EncoderDecoderState:
    """What a batch's decoder steps from: the encoder's output, the prompts' mask, the decoder's KV cache."""

    encoded: object     # the encoder's output (last_hidden_state (B, S, H))
    mask: torch.Tensor  # (B, S)
    kv: object          # an EncoderDecoderCache


def decoder_start_token_id(parts: OffloadedModel) -> int:
    """The decoder's first input: the generation config's, as transformers' generate takes it, else bos;
    T5-family checkpoints without either start from the pad token (what `_shift_right` documents)."""
    generation = parts.model.generation_config
    for candidate in (generation.decoder_start_token_id, generation.bos_token_id):
        if candidate is not None:
            return int(candidate[0] if isinstance(candidate, (list, tuple)) else candidate)
    return parts.pad_token_id
