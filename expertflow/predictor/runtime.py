"""`RoutingPredictor`: the trained RPP as the engine uses it, on plain token-id lists.

Shape legend: B sequences, S positions, L MoE layers, E experts.

Cost per decoding step: `predict_next` runs the network on each sequence's last `receptive_field`
tokens only ((encoder_layers + decoder_layers) * (window - 1) + 1; 253 for the default 2+2 layers,
window 64), so a step costs the same at position 300 as at position 3000, and equals the full-sequence
forward up to float rounding (see model.py on why).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from expertflow.predictor.model import PredictorConfig, RoutingPathModel, load_model


class RoutingPredictor:
    def __init__(self, model: RoutingPathModel, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = device

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "RoutingPredictor":
        return cls(load_model(directory), device)

    @property
    def config(self) -> PredictorConfig:
        return self.model.config

    @torch.inference_mode()
    def predict(self, token_ids: list[list[int]]) -> torch.Tensor:
        """Activation probabilities (B, S, L, E) for every position; S is the longest sequence and the
        positions past a shorter sequence's end are zeros (sequences are right-padded, and causality
        keeps the padding from touching real positions)."""
        if not token_ids or any(len(ids) == 0 for ids in token_ids):
            raise ValueError("predict needs at least one non-empty sequence")
        if max(max(ids) for ids in token_ids) >= self.config.vocab_size or min(min(ids) for ids in token_ids) < 0:
            raise ValueError(f"token ids must be in 0..{self.config.vocab_size - 1}")
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
