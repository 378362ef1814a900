"""The offloaded experts module: a drop-in for a transformers MoE block's `experts`.

transformers 5 MoE blocks call `self.experts(hidden_states, top_k_index, top_k_weights)`. This module
has the same signature, fetches each routed expert from the fast-tier cache, and computes each expert with the
ops of transformers' experts; its outputs are then combined as the model's experts implementation combines them,
so outputs are bit-identical: transformers' default (grouped_mm, batched_mm) sums each token's K weighted outputs
in one reduction (fp32 accumulation for bf16), its eager loop adds them expert after expert (`index_add_`).
It tells the cache the layer's routing before acquiring (run-time correction, lookahead prefetches) and
when the layer is done (the next layer's transfer window opens).

Shape legend: T tokens, H hidden, K top_k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from expertflow.adapters import MoEAdapter
from expertflow.cache.expert_cache import ExpertCache

# Called with (layer, top_k_index (T, K)) before the layer's experts run; the engine records routing with it.
RoutingObserver = Callable[[int, torch.Tensor], None]

# How transformers' experts implementations combine a token's K outputs: one reduction, or added in expert order.
SUMMED_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")


class OffloadedExperts(nn.Module):
    def __init__(self, layer: int, adapter: MoEAdapter, cache: ExpertCache,
                 observer: RoutingObserver | None = None, implementation: str = "grouped_mm") -> None:
        super().__init__()
        self.layer = layer
        self.summed = implementation in SUMMED_IMPLEMENTATIONS  # else eager's expert-by-expert adds
        self.num_experts = adapter.num_experts
        self._adapter = adapter
        self._cache = cache
        self._observer = observer
        # Weight views of each expert placement this layer used, by its address: slots live as long as the
        # cache, and the views keep their storage alive, so an address names one place in one slot (a store
        # may place experts at a few offsets within a slot, see `ExpertStore.place`).
        self._views: dict[int, dict[str, torch.Tensor]] = {}

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded, {'summed' if self.summed else 'eager'}"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K) once the adapter has normalised
        # the family's routing inputs (Switch passes a one-hot dispatch mask)
        top_k_index, top_k_weights = self._adapter.routing_inputs(top_k_index, top_k_weights)
        if self._observer is not None:
            self._observer(self.layer, top_k_index)
        with torch.no_grad():
            one_token = self._one_token_routing(hidden_states, top_k_index)
            expert_ids = [e for e, _ in one_token] if one_token is not None else \
                [e for e in torch.unique(top_k_index).tolist() if 0 <= e < self.num_experts]
        self._cache.route(self.layer, [(self.layer, e) for e in expert_ids])
        if self.summed:
            final_hidden_states = self._run_summed(hidden_states, top_k_index, top_k_weights, expert_ids, one_token)
        else:
            final_hidden_states = torch.zeros_like(hidden_states)
            if one_token is not None:
                self._run_one_token(hidden_states, top_k_weights, one_token, final_hidden_states)
            else:
                self._run_tokens(hidden_states, top_k_index, top_k_weights, expert_ids, final_hidden_states)
        self._cache.finish_layer(self.layer)
        return final_hidden_states

    def _run_summed(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    expert_ids: list[int], one_token: list[tuple[int, int]] | None) -> torch.Tensor:
        """transformers' grouped_mm / batched_mm: each expert on its tokens, each (token, k) output weighted in its
        own row of a (T, K, H) buffer, then one sum over K. A slot no expert fills (a dropped token) stays zero."""
        T, K = top_k_index.shape
        weighted = hidden_states.new_zeros((T, K, hidden_states.shape[-1]),
                                           dtype=torch.promote_types(hidden_states.dtype, top_k_weights.dtype))
        if one_token is not None:  # one token: views instead of gathers, the same values through the same ops
            for expert, k in one_token:
                weighted[0, k] = self._expert(expert, hidden_states)[0] * top_k_weights[0, k]
        else:
            for expert in expert_ids:
                token_idx, top_k_pos = torch.where(top_k_index == expert)
                out = self._expert(expert, hidden_states[token_idx])
                weighted[token_idx, top_k_pos] = out * top_k_weights[token_idx, top_k_pos, None]
        return weighted.sum(dim=1).to(hidden_states.dtype)

    def _run_tokens(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    expert_ids: list[int], final_hidden_states: torch.Tensor) -> None:
        """transformers' eager loop: each expert on the tokens routed to it, in expert order."""
        by_expert = top_k_index.t()  # (K, T): torch.where over it yields (k, token) pairs in eager's order
        for expert in expert_ids:
            top_k_pos, token_idx = torch.where(by_expert == expert)
            out = self._expert(expert, hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))

    def _one_token_routing(self, hidden_states: torch.Tensor,
                           top_k_index: torch.Tensor) -> list[tuple[int, int]] | None:
        """(expert, k) pairs in expert order for a single token routed to distinct experts, else None.

        One decoding token is the common case at batch 1; its loop needs no index tensors (below)."""
        if hidden_states.shape[0] != 1 or not hidden_states.is_contiguous():
            return None
        row = top_k_index[0].tolist()
        routed = sorted((e, k) for k, e in enumerate(row) if 0 <= e < self.num_experts)
        return routed if len({e for e, _ in routed}) == len(routed) else None

    def _run_one_token(self, hidden_states: torch.Tensor, top_k_weights: torch.Tensor,
                       routed: list[tuple[int, int]], final_hidden_states: torch.Tensor) -> None:
        """The eager loop for T = 1 with views instead of gathers: the same values through the same ops
        (x is the token's row, the weight a (1, 1) view, index_add_ of one row an add), so the same bits."""
        for expert, k in routed:
            out = self._expert(expert, hidden_states) * top_k_weights[:, k : k + 1]
            same = out.dtype == final_hidden_states.dtype
            final_hidden_states.add_(out if same else out.to(final_hidden_states.dtype))

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens x (T, H), its weights held in the cache while it runs."""
        key = (self.layer, expert)
        flat = self._cache.acquire(key)
        try:
            views = self._views.get(flat.data_ptr())
            if views is None:
                views = self._views[flat.data_ptr()] = self._adapter.layout.views(flat)
            return self._adapter.expert_forward(x, views)
        finally:
            self._cache.release(key)


def first_nonfinite_layer(model: nn.Module, forward: Callable[[], object]) -> int | None:
    """Run `forward` watching every offloaded experts module's output: the layer of the first, in execution
    order, whose output held NaN or Inf, else None. For diagnosing a run that already failed: each check
    syncs, so the hooks exist only during this call and the decode loop never pays for them."""
    found: list[int] = []

    def watch(module: OffloadedExperts, _inputs, output: torch.Tensor) -> None:
        if not found and not bool(torch.isfinite(output).all()):
            found.append(module.layer)

    hooks = [m.register_forward_hook(watch) for m in model.modules() if isinstance(m, OffloadedExperts)]
    try:
        forward()
    finally:
        for hook in hooks:
            hook.remove()
    return found[0] if found else None
