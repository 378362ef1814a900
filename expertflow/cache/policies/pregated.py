"""Pre-gated MoE style: when layer l's routing is known, predict and prefetch layer l+1's experts only.

Variant: Pre-gated MoE gates the next layer from the current hidden state; routing traces hold no hidden
states, so this predictor reads what the traces do hold: layer l's selected experts. It learns online,
from every forward it sees (live or replayed, identically), how often each expert of layer l+1 follows
each expert of layer l, and prefetches as many of the most likely next-layer experts as layer l used.
Eviction is global LRU. The first layer of a forward has no previous layer, so it is demand-paged.
"Next layer" is within the forward: an encoder-decoder model's last encoder layer predicts nothing (the
decoder runs in other forwards) and a decoder step looks ahead only to decoder layers.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Collection, Sequence

from expertflow.cache.policies.base import CachePolicy, Forecast, Key


class PregatedPolicy(CachePolicy):
    name = "pregated"
    prefetches = True

    def __init__(self, capacity: int, layers: Sequence[int], num_experts: int, top_k: int) -> None:
        super().__init__(capacity, layers, num_experts, top_k)
        self._follows: Counter[tuple[int, int, int]] = Counter()  # (layer, e, e_next): forwards with both
        self._seen: Counter[Key] = Counter()                      # (layer, e): forwards that used it
        self._previous: tuple[int, list[int]] | None = None       # (position, experts) of the last layer
        self._recency: OrderedDict[Key, None] = OrderedDict()

    def plan(self, forecast: Forecast | None) -> list[Key]:
        self._previous = None
        return []

    def on_layer(self, layer: int, used: Sequence[Key]) -> list[Key]:
        position = self.position(layer)
        experts = [key[1] for key in used]
        if self._previous is not None and self._previous[0] == position - 1:
            self._learn(self.forward_layers[position - 1], self._previous[1], experts)
        self._previous = (position, experts)
        if position + 1 == len(self.forward_layers):
            return []
        return self._predict(layer, experts, self.forward_layers[position + 1])

    def _learn(self, layer: int, experts: list[int], following: list[int]) -> None:
        for e in experts:
            self._seen[(layer, e)] += 1
            for f in following:
                self._follows[(layer, e, f)] += 1

    def _predict(self, layer: int, experts: list[int], next_layer: int) -> list[Key]:
        likely: dict[int, float] = {}
        for f in range(self.num_experts):
            absent = 1.0  # P(f unused | each used e), combined as if independent
            for e in experts:
                seen = self._seen[(layer, e)]
                if seen:
                    absent *= 1.0 - self._follows[(layer, e, f)] / seen
            if absent < 1.0:
                likely[f] = 1.0 - absent
        ranked = sorted(likely, key=lambda f: (-likely[f], f))
        return [(next_layer, f) for f in ranked[: len(experts)]]

    def on_hit(self, key: Key) -> None:
        self._recency.move_to_end(key)

    def on_load(self, key: Key) -> None:
        self._recency[key] = None

    def on_evict(self, key: Key) -> None:
        del self._recency[key]

    def victim(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> Key | None:
        if not full:
            return None
        return next(k for k in self._recency if k not in pinned)
