"""Per-layer LFU: each MoE layer owns a fixed share of the slots; the least used expert of the layer goes.

Use counts persist across evictions (perfect LFU), so an expert popular over the whole run is kept even
after a short absence; ties go to the least recently used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

from expertflow.cache.policies.base import CachePolicy, Key
from expertflow.cache.policies.lru import LRUPolicy, layer_can_place, split_evenly


class LFUPolicy(CachePolicy):
    name = "lfu"
    min_capacity = LRUPolicy.min_capacity
    minimum_reason = LRUPolicy.minimum_reason

    def __init__(self, capacity: int, layers: Sequence[int], num_experts: int, top_k: int) -> None:
        super().__init__(capacity, layers, num_experts, top_k)
        self.quota = split_evenly(capacity, self.layers)
        self.uses: Counter[Key] = Counter()
        self._last_use: dict[Key, int] = {}
        self._clock = 0
        self._resident: dict[int, set[Key]] = {layer: set() for layer in self.layers}

    def _touch(self, key: Key) -> None:
        self._clock += 1
        self.uses[key] += 1
        self._last_use[key] = self._clock

    def on_hit(self, key: Key) -> None:
        self._touch(key)

    def on_load(self, key: Key) -> None:
        self._resident[key[0]].add(key)
        self._touch(key)

    def on_evict(self, key: Key) -> None:
        self._resident[key[0]].discard(key)

    def can_place(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> bool:
        return layer_can_place(self._resident[key[0]], self.quota[key[0]], pinned)

    def victim(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> Key | None:
        layer = self._resident[key[0]]
        if len(layer) < self.quota[key[0]]:
            return None
        return min((k for k in layer if k not in pinned), key=lambda k: (self.uses[k], self._last_use[k]))
