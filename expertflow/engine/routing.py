"""Recording the routing the engine actually executes: per forward, each MoE layer's selected experts.

Shape legend: T tokens of the forward (batch x positions, flattened as the MoE block sees them),
L MoE layers, K top_k.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


class RoutingRecorder:
    """Collects `top_k_index` (T, K) from every MoE layer during one forward while enabled."""

    def __init__(self) -> None:
        self._current: dict[int, torch.Tensor] = {}
        self.enabled = False

    def observe(self, layer: int, top_k_index: torch.Tensor) -> None:
        if self.enabled:
            self._current[layer] = top_k_index.detach().to("cpu", copy=True)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside, e.g. during a diagnostic rerun that is no step of the run."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def take(self) -> np.ndarray:
        """The last forward's routing as int16 (T, L, K), layers in ascending order; clears the buffer."""
        ordered = [self._current[layer] for layer in sorted(self._current)]
        self._current = {}
        return torch.stack(ordered, dim=1).numpy().astype(np.int16)
