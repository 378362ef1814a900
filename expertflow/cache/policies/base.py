"""The cache-policy interface: decisions over `(layer, expert)` keys, never tensors.

A policy is told about hits, loads and evictions, and chooses what to evict; predictive policies also `plan`
prefetches from a forecast, hear each layer's real routing (`on_layer`) and may decline a prefetch (`admit`).
`begin_forward(layers)` names the layers a forward runs (an encoder-decoder's stacks run apart). Policies are
pure Python, so the live engine and the simulator drive the same objects. Design: docs/design/cache-planner.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from typing import ClassVar

from expertflow.errors import ExpertflowError

Key = tuple[int, int]  # (layer, expert)
Forecast = Mapping[Key, float]  # probability that the coming forward uses each key; absent keys ~ 0


class CachePolicy(ABC):
    """Eviction (and, for predictive policies, planning) over a fixed number of expert slots."""

    name: ClassVar[str]
    prefetches: ClassVar[bool] = False      # issues prefetches, so the live cache needs a transfer worker
    uses_forecast: ClassVar[bool] = False   # plans from a routing forecast (an RPP)
    needs_future: ClassVar[bool] = False    # offline: needs the whole access sequence (simulator only)
    settings_class: ClassVar[type | None] = None  # a dataclass of the policy's knobs, passed as `config=`

    def __init__(self, capacity: int, layers: Sequence[int], num_experts: int, top_k: int) -> None:
        self.capacity = capacity
        self.transfer_layers = 0.0  # layers of compute one transfer takes (0: unknown); see set_transfer_time
        self.layers = list(layers)
        self.num_experts = num_experts
        self.top_k = top_k
        self.begin_forward(self.layers)
        minimum = self.min_capacity(self.layers, num_experts, top_k)
        if capacity < minimum:
            raise ExpertflowError(
                f"a cache of {capacity} experts is below the minimum of {minimum} for policy {self.name!r} "
                f"({self.minimum_reason(self.layers, top_k)}); use --cache-experts {minimum} or more"
            )
        total = len(self.layers) * num_experts
        if capacity > total:
            raise ExpertflowError(f"a cache of {capacity} experts exceeds the model's {total} experts; use at most {total}")

    def set_transfer_time(self, layers: float) -> None:
        """How many layers of compute one expert transfer takes: modeled from the transfer ratio in the
        simulator, measured by the live cache. Policies that time their prefetches read `transfer_layers`."""
        self.transfer_layers = max(0.0, layers)

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

    def begin_forward(self, layers: Sequence[int]) -> None:
        """A forward over `layers` (in the order it runs them) starts; `plan` follows."""
        if not layers or not set(layers) <= set(self.layers):
            raise ValueError(f"a forward runs some of the MoE layers {self.layers}, got {list(layers)}")
        self.forward_layers = list(layers)
        self._position = {layer: i for i, layer in enumerate(self.forward_layers)}

    def plan(self, forecast: Forecast | None) -> list[Key]:
        """A forward is about to start: the keys to prefetch for it, most urgent first."""
        return []

    def on_layer(self, layer: int, used: Sequence[Key]) -> list[Key]:
        """`layer`'s real routing is known (before its experts run): keys to prefetch now, most urgent first."""
        return []

    def admit(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> bool:
        """Whether a prefetch of `key` is worth a slot now; a declined prefetch costs nothing."""
        return True

    @abstractmethod
    def on_hit(self, key: Key) -> None:
        """A resident expert was used."""

    @abstractmethod
    def on_load(self, key: Key) -> None:
        """An expert was brought into the cache (it will also be used if this was a demand load)."""

    @abstractmethod
    def on_evict(self, key: Key) -> None:
        """A resident expert left the cache."""

    def can_place(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> bool:
        """Whether a load of `key` now would find a slot: `victim` would name an unpinned resident or a free slot.

        A global pool has one whenever a slot is free or a resident is unpinned (`pinned` are residents);
        a policy whose layers own their slots overrides this."""
        return not full or len(pinned) < len(resident)

    @abstractmethod
    def victim(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> Key | None:
        """The resident to evict so that `key` can be loaded, or None to take a free slot.

        `full` says whether the pool has no free slot; `pinned` residents are in use and must stay."""

    def in_forward(self, layer: int) -> bool:
        """Whether the current forward runs `layer`."""
        return layer in self._position

    def position(self, layer: int) -> int:
        """The layer's place in the current forward (0 = its first MoE layer); the layer must be in it."""
        return self._position[layer]
