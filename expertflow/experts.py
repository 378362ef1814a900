"""The offloaded experts module: a drop-in for a transformers MoE block's `experts`.

transformers 5 MoE blocks call `self.experts(hidden_states, top_k_index, top_k_weights)`. This module
has the same signature, fetches each routed expert from the fast-tier cache, and computes the experts
in the same order and with the same ops as transformers' eager loop, so outputs are bit-identical.
It tells the cache the layer's routing before acquiring (run-time correction, lookahead prefetches) and
when the layer is done (the next layer's transfer window opens).

Shape legend: T tokens, H hidden, K top_k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from expertflow.adapters import MoEAdapter
from expertflow.cache import ExpertCache

# Called with (layer, top_k_index (T, K)) before the layer's experts run; the engine records routing with it.
RoutingObserver = Callable[[int, torch.Tensor], None]


class OffloadedExperts(nn.Module):
    def __init__(self, layer: int, adapter: MoEAdapter, cache: ExpertCache,
                 observer: RoutingObserver | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = adapter.num_experts
        self._adapter = adapter
        self._cache = cache
        self._observer = observer

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K) once the adapter has normalised
        # the family's routing inputs (Switch passes a one-hot dispatch mask)
        top_k_index, top_k_weights = self._adapter.routing_inputs(top_k_index, top_k_weights)
        if self._observer is not None:
            self._observer(self.layer, top_k_index)
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_ids = [e for e in torch.unique(top_k_index).tolist() if 0 <= e < self.num_experts]
            by_expert = top_k_index.t()  # (K, T): torch.where over it yields (k, token) pairs in eager's order
        self._cache.route(self.layer, [(self.layer, e) for e in expert_ids])
        for expert in expert_ids:
            top_k_pos, token_idx = torch.where(by_expert == expert)
            flat = self._cache.acquire((self.layer, expert))
            try:
                out = self._adapter.expert_forward(hidden_states[token_idx], self._adapter.layout.views(flat))
            finally:
                self._cache.release((self.layer, expert))
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        self._cache.finish_layer(self.layer)
        return final_hidden_states
