"""SE-MoE's ring: while layer l runs, layer l+1's experts are loaded into the other half of a two-layer ring.

No predictor: each layer's half holds min(E, capacity // 2) experts, so with room for a whole layer every
expert of the next layer is loaded; with less, the next layer's most used experts so far. Slots beyond
the two-layer ring keep older layers' experts. Eviction follows the ring: the layer that will run last
(the one that just finished) goes first, its least used expert first.

The ring is the current forward's layers: a decoder step of an encoder-decoder model looks ahead only
to decoder layers (its last layer has no next one; the coming forward's plan fills the first). Layers
the forward does not run are taken as the farthest from use and are evicted before any of its own,
the last of them first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

from expertflow.cache.policies.base import CachePolicy, Forecast, Key


class RingPolicy(CachePolicy):
    name = "ring"
    prefetches = True

    def __init__(self, capacity: int, layers: Sequence[int], num_experts: int, top_k: int) -> None:
        super().__init__(capacity, layers, num_experts, top_k)
        self.half = min(num_experts, capacity // 2)
        self.uses: Counter[Key] = Counter()
        self._resident: dict[int, set[Key]] = {layer: set() for layer in self.layers}
        self._running = len(self.layers) - 1  # position in the forward of the layer now running

    @classmethod
    def min_capacity(cls, layers: Sequence[int], num_experts: int, top_k: int) -> int:
        return 2 * top_k

    @classmethod
    def minimum_reason(cls, layers: Sequence[int], top_k: int) -> str:
        return f"its ring holds two layers of at least top_k={top_k} experts"

    def plan(self, forecast: Forecast | None) -> list[Key]:
        self._running = len(self.forward_layers) - 1
        return self._fill(self.forward_layers[0])

    def on_layer(self, layer: int, used: Sequence[Key]) -> list[Key]:
        self._running = self.position(layer)
        self.uses.update(used)
        if self._running + 1 == len(self.forward_layers):
            return []
        return self._fill(self.forward_layers[self._running + 1])

    def _fill(self, layer: int) -> list[Key]:
        """The layer's `half` most used experts so far (ties: lower id), most used first."""
        ranked = sorted(range(self.num_experts), key=lambda e: (-self.uses[(layer, e)], e))
        return [(layer, e) for e in ranked[: self.half]]

    def _by_distance(self) -> list[int]:
        """Layers from the one that runs last to the running one (the ring's eviction order): first those
        this forward does not run, then its own around the ring."""
        ring = self.forward_layers
        others = [layer for layer in reversed(self.layers) if not self.in_forward(layer)]
        n = len(ring)
        return [*others, *(ring[(self._running + d) % n] for d in range(n - 1, -1, -1))]

    def admit(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> bool:
        if not full:
            return True
        # The ring never pushes out the running layer or the next one to make room.
        order = self._by_distance()
        evictable = order[: len(order) - min(2, len(self.forward_layers))]
        return any(k not in pinned for layer in evictable for k in self._resident[layer])

    def on_hit(self, key: Key) -> None:
        return None

    def on_load(self, key: Key) -> None:
        self._resident[key[0]].add(key)

    def on_evict(self, key: Key) -> None:
        self._resident[key[0]].discard(key)

    def victim(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> Key | None:
        if not full:
            return None
        for layer in self._by_distance():
            free = [k for k in self._resident[layer] if k not in pinned]
            if free:
                return min(free, key=lambda k: (self.uses[k], k[1]))
        return None
