"""Per-layer LRU (Cache-MoE / mixtral-offloading): each MoE layer owns a fixed share of the slots."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

from expertflow.cache.policies.base import CachePolicy, Key


def split_evenly(capacity: int, layers: Sequence[int]) -> dict[int, int]:
    """Slots per layer: an equal share each, the remainder to the first layers."""
    base, extra = divmod(capacity, len(layers))
    return {layer: base + (1 if i < extra else 0) for i, layer in enumerate(layers)}


def layer_can_place(layer_residents: Collection[Key], quota: int, pinned: Collection[Key]) -> bool:
    """A layer that owns `quota` slots has one for a new key: a share not yet used, or an unpinned resident."""
    return len(layer_residents) < quota or any(k not in pinned for k in layer_residents)


class LRUPolicy(CachePolicy):
    name = "lru"

    def __init__(self, capacity: int, layers: Sequence[int], num_experts: int, top_k: int) -> None:
        super().__init__(capacity, layers, num_experts, top_k)
        self.quota = split_evenly(capacity, self.layers)
        self._recency: dict[int, OrderedDict[Key, None]] = {layer: OrderedDict() for layer in self.layers}

    @classmethod
    def min_capacity(cls, layers: Sequence[int], num_experts: int, top_k: int) -> int:
        return top_k * len(layers)

    @classmethod
    def minimum_reason(cls, layers: Sequence[int], top_k: int) -> str:
        return f"each of {len(layers)} MoE layers owns its slots and needs top_k={top_k}"

    def on_hit(self, key: Key) -> None:
        self._recency[key[0]].move_to_end(key)

    def on_load(self, key: Key) -> None:
        self._recency[key[0]][key] = None

    def on_evict(self, key: Key) -> None:
        del self._recency[key[0]][key]

    def can_place(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> bool:
        return layer_can_place(self._recency[key[0]], self.quota[key[0]], pinned)

    def victim(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> Key | None:
        layer = self._recency[key[0]]
        if len(layer) < self.quota[key[0]]:
            return None
        return next(k for k in layer if k not in pinned)
