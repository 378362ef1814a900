"""`all-resident` (alias `none`): every expert resident, loaded once up front: the all-in-memory reference."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from expertflow.cache.policies.base import CachePolicy, Key


class AllResidentPolicy(CachePolicy):
    name = "all-resident"

    @classmethod
    def min_capacity(cls, layers: Sequence[int], num_experts: int, top_k: int) -> int:
        return len(layers) * num_experts

    @classmethod
    def minimum_reason(cls, layers: Sequence[int], top_k: int) -> str:
        return "it keeps every expert resident; without a budget it is the default, with one choose lru"

    def initial_residents(self) -> list[Key]:
        return [(layer, e) for layer in self.layers for e in range(self.num_experts)]

    def on_hit(self, key: Key) -> None:
        return None

    def on_load(self, key: Key) -> None:
        return None

    def on_evict(self, key: Key) -> None:
        raise AssertionError("policy 'none' never evicts")

    def victim(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> Key | None:
        return None
