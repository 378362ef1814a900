"""`RoutingPredictor`: the trained RPP as the engine uses it, on plain token-id lists.

Shape legend: B sequences, S positions, L MoE layers, E experts.

Two ways to use it during decoding, both equal to the full-sequence forward up to float rounding:
* `start(prompts)` once (one full-sequence forward over the prompts' tails, incremental.prefill), then
  `step(state, new_tokens)` per decoding step: one token through the network with cached keys/values of
  the last window-1 positions (incremental.py). Constant cost per step, the cheap path for the engine;
  `state.select(rows)` follows a regrouping of sequences.
* `predict_next(token_ids)`: stateless, reruns the network on each sequence's last `receptive_field`
  tokens ((encoder_layers + decoder_layers) * (window - 1) + 1; 253 for 2+2 layers, window 64).
  Bounded but much dearer per step; useful when no state is kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from expertflow.errors import ExpertflowError
from expertflow.predictor.incremental import StepState, prefill, step
from expertflow.predictor.model import PredictorConfig, RoutingPathModel, load_model


class RoutingPredictor:
    def __init__(self, model: RoutingPathModel, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = device

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu",
             expect: tuple[int, int] | None = None) -> "RoutingPredictor":
        """The predictor saved in `directory`; with `expect` (layers, experts) of the model it will forecast,
        refused unless it forecasts that shape."""
        model = load_model(directory)
        shape = (model.config.num_layers, model.config.num_experts)
        if expect is not None and shape != tuple(expect):
            raise ExpertflowError(f"predictor {directory} forecasts {shape[0]} layers x {shape[1]} experts but the "
                                  f"model has {expect[0]} x {expect[1]}; train one on this model's traces")
        return cls(model, device)

    @property
    def config(self) -> PredictorConfig:
        return self.model.config

    @torch.inference_mode()
    def predict(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Activation probabilities (B, S, L, E) for every position; S is the longest sequence and the
        positions past a shorter sequence's end are zeros (sequences are right-padded, and causality
        keeps the padding from touching real positions)."""
        self._check_sequences(token_ids, "predict")
        lengths = torch.tensor([len(ids) for ids in token_ids])
        batch = torch.zeros(len(token_ids), int(lengths.max()), dtype=torch.long)
        for i, ids in enumerate(token_ids):
            batch[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        probs = torch.sigmoid(self.model(batch.to(self.device))).cpu()               # (B, S, L, E)
        valid = torch.arange(batch.shape[1])[None, :] < lengths[:, None]             # (B, S)
        return probs * valid[:, :, None, None]

    def predict_next(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Probabilities (B, L, E) for each sequence's last token, from its receptive-field tail only."""
        rf = self.config.receptive_field
        tails = [list(ids[-rf:]) for ids in token_ids]
        probs = self.predict(tails)                                                   # (B, S, L, E)
        last = torch.tensor([len(t) - 1 for t in tails])
        return probs[torch.arange(len(tails)), last]

    def predict_array(self, token_ids: np.ndarray) -> np.ndarray:
        """One sequence (S,) -> (S, L, E) float32 probabilities."""
        return self.predict([token_ids.tolist()])[0].numpy()

    def start(self, token_ids: list[list[int]]) -> tuple[StepState, torch.Tensor]:
        """Feed whole prompts (ragged) in one forward; -> (state, probabilities (B, L, E) for each prompt's
        last token), the state and probabilities stepping each prompt token by token would give."""
        self._check_sequences(token_ids, "start")
        logits, state = prefill(self.model, token_ids)
        return state, torch.sigmoid(logits).cpu()  # planners read them on the host

    def step(self, state: StepState, tokens: list[int]) -> tuple[StepState, torch.Tensor]:
        """One decoding step: the new token of each sequence -> (state, probabilities (B, L, E))."""
        logits, state = step(self.model, state, self._checked(torch.as_tensor(tokens, dtype=torch.long)))
        return state, torch.sigmoid(logits).cpu()

    def start_rows(self, token_ids: list[list[int]]) -> tuple[list[StepState], torch.Tensor]:
        """`start`, with one state per sequence, for callers that regroup sequences between steps."""
        state, probs = self.start(token_ids)
        return [state.select([i]) for i in range(len(token_ids))], probs

    def step_rows(self, states: list[StepState], tokens: list[int]) -> tuple[list[StepState], torch.Tensor]:
        """`step` over sequences that each carry their own state (in any grouping): one batched forward."""
        state, probs = self.step(StepState.concat(states), tokens)
        return [state.select([i]) for i in range(len(states))], probs

    def _check_sequences(self, token_ids: list[list[int]], caller: str) -> None:
        if not token_ids or any(len(ids) == 0 for ids in token_ids):
            raise ValueError(f"{caller} needs at least one non-empty sequence")
        if max(max(ids) for ids in token_ids) >= self.config.vocab_size or min(min(ids) for ids in token_ids) < 0:
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}")

    def _checked(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.numel() and (int(tokens.max()) >= self.config.vocab_size or int(tokens.min()) < 0):
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        return tokens
