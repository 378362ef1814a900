"""The cache-policy interface: decisions over `(layer, expert)` keys, never tensors.

A policy is told about hits, loads and evictions, and chooses what to evict. It is pure Python so the
live engine and the trace simulator drive the very same objects and count the same loads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from typing import ClassVar

from expertflow.errors import ExpertflowError

Key = tuple[int, int]  # (layer, expert)


class CachePolicy(ABC):
    """Eviction (and, for predictive policies, planning) over a fixed number of expert slots."""

    name: ClassVar[str]

    def __init__(self, capacity: int, layers: Sequence[int], num_experts: int, top_k: int) -> None:
        self.capacity = capacity
        self.layers = list(layers)
        self.num_experts = num_experts
        self.top_k = top_k
        minimum = self.min_capacity(self.layers, num_experts, top_k)
        if capacity < minimum:
            raise ExpertflowError(
                f"a cache of {capacity} experts is below the minimum of {minimum} for policy {self.name!r} "
                f"({self.minimum_reason(self.layers, top_k)}); use --cache-experts {minimum} or more"
            )
        total = len(self.layers) * num_experts
        if capacity > total:
            raise ExpertflowError(f"a cache of {capacity} experts exceeds the model's {total} experts; use at most {total}")

    @classmethod
    def min_capacity(cls, layers: Sequence[int], num_experts: int, top_k: int) -> int:
        """Fewest slots that still run one layer's forward: one token's top-k experts."""
        return top_k

    @classmethod
    def minimum_reason(cls, layers: Sequence[int], top_k: int) -> str:
        return f"one token needs top_k={top_k} experts of a layer at once"

    def initial_residents(self) -> list[Key]:
        """Experts to load before the first forward (empty for demand-paged policies)."""
        return []

    @abstractmethod
    def on_hit(self, key: Key) -> None:
        """A resident expert was used."""

    @abstractmethod
    def on_load(self, key: Key) -> None:
        """An expert was brought into the cache (it will also be used if this was a demand load)."""

    @abstractmethod
    def on_evict(self, key: Key) -> None:
        """A resident expert left the cache."""

    @abstractmethod
    def victim(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> Key | None:
        """The resident to evict so that `key` can be loaded, or None to take a free slot.

        `full` says whether the pool has no free slot; `pinned` residents are in use and must stay."""
