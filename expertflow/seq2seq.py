"""The encoder-decoder step loop (Switch Transformers): encode once, then greedy decode with the KV cache.

    encode:  one forward of the encoder over the right-padded prompts   (encoder MoE layers, once)
    decode:  one forward of the decoder per new token, from the decoder start token, with an
             EncoderDecoderCache (self-attention grows, cross-attention is computed once)   (decoder MoE layers)
    sample:  greedy by default (engine.Sampler)

Prompts are right-padded, as T5-style tokenizers pad: Switch's router fills each expert's capacity in
position order within a sequence, so padding after the prompt never takes capacity from its tokens.
Routing, when recorded, is per input an int16 (prompt + generated tokens, L, K) array over all MoE layers
(encoder's first): a prompt token's row holds its encoder routing, a generated token's row the decoder
routing of the forward that takes it as input, as engine.py records decoder-only models (so the last
token costs one more forward when recording, and the start token's forward has no row). Layers a token
never passes, and tokens the router dropped for capacity, hold -1.

Each forward tells the cache which MoE layers it runs (the encoder's, or the decoder's), so policies
plan and look ahead within them. With a routing predictor (RPP, trained on such traces: a prompt row's
targets are its encoder layers, a generated row's its decoder layers, -1 layers masked out), the
encode forward's forecast is the RPP over the prompt positions, restricted to encoder layers, and the
decoder forward that takes generated token g as input gets the RPP's incremental row for g's position,
restricted to decoder layers. The start-token forward gets no forecast: the start token is not a token
of the sequence, so the RPP has no trained row for it (the last prompt row's decoder columns were
masked out of training); it is demand-paged, like any forward without a forecast.

Shape legend: B sequences, S prompt positions, V vocabulary, L MoE layers, K top_k (1).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from expertflow.adapters.kv_argument import KVArgument
from expertflow.engine import GenerationOutput, Predictor, Sampler, StepForecaster, check_request, sample_step
from expertflow.errors import ExpertflowError
from expertflow.cache.offloaded_experts import first_nonfinite_layer
from expertflow.loading import OffloadedModel
from expertflow.cache.policies import Forecast
from expertflow.cache.policies.forecast import batch_forecast, restrict
from expertflow.routing import RoutingRecorder
from expertflow.stats import RunStats
from expertflow.traces import NO_EXPERT


class Seq2SeqEngine:
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

    @torch.inference_mode()
    def generate(self, input_ids: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 seed: int | None = None, record_routing: bool = False) -> GenerationOutput:
        check_request(input_ids, max_new_tokens, None)  # relative position buckets: no context limit
        sampler = Sampler(temperature, seed)
        eos = torch.tensor(self.parts.eos_token_ids, dtype=torch.long, device=self.device)
        ids, mask = self._right_pad(input_ids)
        batch = len(input_ids)
        generated: list[list[int]] = [[] for _ in range(batch)]
        steps: list[list[np.ndarray]] = [[] for _ in range(batch)]  # decoder routing per generated token
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        self.recorder.enabled = record_routing
        before = self.parts.cache.figures()
        start = time.perf_counter()

        encoded = self._encode(ids, mask, self._prompt_forecast(input_ids))
        if record_routing:  # (B, S, L_enc, K)
            encoder = self._take(self.encoder_layers, ids.numel()).reshape(*ids.shape, len(self.encoder_layers), -1)
        prefill_seconds = time.perf_counter() - start
        forecaster = self._forecaster(input_ids)
        token = torch.full((batch,), self.start_token_id, dtype=torch.long, device=self.device)
        logits, kv = self._decode(token, encoded, mask, None, None)
        if record_routing:
            self._take(self.decoder_layers, batch)  # the start token is no token of the sequence: no row
        for step in range(max_new_tokens):
            token = sample_step(sampler, logits, finished, generated, eos, self.parts.pad_token_id,
                                lambda b: self.nonfinite_layer(input_ids[b], generated[b]))
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            logits, kv = self._decode(token, encoded, mask, kv, self._step_forecast(forecaster, generated, step))
            if record_routing:
                self._keep_step(steps, generated, step)
        seconds = time.perf_counter() - start

        if record_routing:  # the last generated tokens have not been through the decoder yet
            last = torch.tensor([g[-1] for g in generated], device=self.device)
            step = max(map(len, generated)) - 1
            self._decode(last, encoded, mask, kv, self._step_forecast(forecaster, generated, step))
            self._keep_step(steps, generated, step)
        self.recorder.enabled = False

        stats = RunStats.between(before, self.parts.cache.figures(), new_tokens=sum(map(len, generated)),
                                 prompt_tokens=sum(map(len, input_ids)), seconds=seconds,
                                 prefill_seconds=prefill_seconds, resident_bytes=self.parts.resident_bytes)
        routing = ([self._routing_of(encoder[b, : len(p)], steps[b]) for b, p in enumerate(input_ids)]
                   if record_routing else None)
        return GenerationOutput(prompt_ids=[list(p) for p in input_ids], sequences=generated, stats=stats,
                                routing=routing, last_logits=logits)

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

    def _forecaster(self, input_ids: list[list[int]]) -> StepForecaster | None:
        """The RPP's incremental state per sequence, after its prompt (the rows before the first generated token)."""
        return None if self.predictor is None else StepForecaster(self.predictor, self.parts.layers, input_ids)

    def _step_forecast(self, forecaster: StepForecaster | None, generated: list[list[int]],
                       step: int) -> Forecast | None:
        """Forecast of the decoder forward that takes generated token `step` as input, for the sequences
        that have one (the others feed padding), restricted to the decoder's layers."""
        if forecaster is None:
            return None
        rows = [b for b, tokens in enumerate(generated) if len(tokens) > step]
        tokens = [tokens[step] if len(tokens) > step else self.parts.pad_token_id for tokens in generated]
        return restrict(forecaster.next(tokens, rows), self.decoder_layers)

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

    def _keep_step(self, steps: list[list[np.ndarray]], generated: list[list[int]], step: int) -> None:
        """Keep the decoder routing of each sequence's token `step`, which that forward took as input."""
        taken = self._take(self.decoder_layers, len(generated))  # (B, L_dec, K)
        for b, tokens in enumerate(generated):
            if step < len(tokens):
                steps[b].append(taken[b])

    def _routing_of(self, encoder: np.ndarray, steps: list[np.ndarray]) -> np.ndarray:
        """One input's (prompt + generated, L, K) routing over every MoE layer; see the module docstring."""
        column = {layer: i for i, layer in enumerate(self.parts.layers)}
        out = np.full((len(encoder) + len(steps), len(column), self.parts.adapter.top_k), NO_EXPERT, dtype=np.int16)
        out[: len(encoder), [column[layer] for layer in self.encoder_layers]] = encoder
        if steps:
            out[len(encoder):, [column[layer] for layer in self.decoder_layers]] = np.stack(steps)
        return out


def decoder_start_token_id(parts: OffloadedModel) -> int:
    """The decoder's first input: the generation config's, as transformers' generate takes it, else bos;
    T5-family checkpoints without either start from the pad token (what `_shift_right` documents)."""
    generation = parts.model.generation_config
    for candidate in (generation.decoder_start_token_id, generation.bos_token_id):
        if candidate is not None:
            return int(candidate[0] if isinstance(candidate, (list, tuple)) else candidate)
    return parts.pad_token_id
