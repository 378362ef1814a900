"""Predictive Locality-aware Expert Caching (PLEC, paper 3.4): the `plec` policy (alias `expertflow`).

Each resident holds its slot by a keep value, the discounted chance of its next use; the plan prefetches the
forward's likeliest experts (by layer, then probability), admits an evicting prefetch only when it out-values the
cheapest resident within `lead` layers, and drops mispredicted prefetches first. The value function and how the
paper's parts map onto it: docs/design/plec.md.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from expertflow.cache.policies.base import CachePolicy, Forecast, Key


@dataclass(frozen=True)
class PLECConfig:
    """PLEC's knobs; the engine and the simulator run `PLECConfig()`, these defaults."""

    threshold: float = 0.5  # forecast probability worth a prefetch
    spare_threshold: float = 0.2  # ... worth one where the link has room to spare in its layer (see `_spare`)
    beta: float = 0.97      # value discount per layer of distance to the use
    decay: float = 0.95     # per-forward decay of the usage average u (both tuned on replayed traces:
                            # docs/results/cache-policies.md)
    lead: int | None = None  # a prefetch that must evict waits until its layer is at most this many layers
                             # ahead; None: as many layers as one transfer takes (see `PLECPolicy.lead`)
    refetch_discount: float = 0.5  # a resident's worth to later forwards, scaled where the link has room to
                                   # spare in its layer: evicted, it is likely prefetched again in time (see `_later_value`)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"PLEC threshold is the forecast probability worth a prefetch and must be in (0, 1], "
                             f"got {self.threshold}")
        if not 0 < self.spare_threshold <= 1:
            raise ValueError(f"PLEC spare_threshold is the forecast probability worth a prefetch the link has room "
                             f"for and must be in (0, 1], got {self.spare_threshold}")
        if not 0 < self.beta <= 1:
            raise ValueError(f"PLEC beta is the value discount per layer of distance and must be in (0, 1], "
                             f"got {self.beta}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"PLEC decay is the per-forward decay of the usage average and must be in [0, 1), "
                             f"got {self.decay}")
        if not 0 < self.refetch_discount <= 1:
            raise ValueError(f"PLEC refetch_discount scales a resident's worth to later forwards where the link has "
                             f"room and must be in (0, 1], got {self.refetch_discount}")
        if self.lead is not None and (isinstance(self.lead, bool) or not isinstance(self.lead, int) or self.lead < 0):
            raise ValueError(f"PLEC lead counts layers ahead and must be an integer >= 0, got {self.lead!r} "
                             "(leave it unset to have it measured)")


class PLECPolicy(CachePolicy):
    name = "plec"
    prefetches = True
    uses_forecast = True
    settings_class = PLECConfig

    def __init__(self, capacity: int, layers: Sequence[int], num_experts: int, top_k: int,
                 config: PLECConfig = PLECConfig()) -> None:
        super().__init__(capacity, layers, num_experts, top_k)
        self.config = config
        self._forecast: dict[Key, float] = {}
        self._running = -1                         # position of the layer whose routing is known
        self._forward = 0
        self._usage: dict[Key, tuple[float, int]] = {}  # key -> (u, forward it was last updated)
        self._pending: set[Key] = set()            # routed to the running layer, not yet used
        self._prefetched: set[Key] = set()         # loaded by this forward's prefetches
        self._mispredicted: set[Key] = set()
        self._resident: set[Key] = set()
        self._cheapest: tuple[float, Key] | None = None  # cached min over unpinned residents
        self._values: dict[Key, float] = {}        # residents' `value`, until a state it reads changes
        self._roomy: frozenset[int] = frozenset()   # layers whose confident prefetches leave the link room

    def begin_forward(self, layers: Sequence[int]) -> None:
        super().begin_forward(layers)
        self._values = {}  # distances count the new forward's layers

    def plan(self, forecast: Forecast | None) -> list[Key]:
        self._forward += 1
        self._running = -1
        self._forecast = {k: p for k, p in (forecast or {}).items() if p > 0 and self.in_forward(k[0])}
        self._prefetched = set()
        wanted = [k for k, p in self._forecast.items() if p >= self.config.threshold]
        room = self._link_room(wanted)
        self._roomy = frozenset(layer for layer, free in room.items() if free > 0)
        wanted += self._spare(room)
        self._mispredicted -= set(wanted)
        self._cheapest = None
        self._values = {}
        return sorted(wanted, key=lambda k: (self.position(k[0]), -self._forecast[k], k[1]))

    def _link_room(self, confident: list[Key]) -> Counter[int]:
        """Per layer, the transfers the link has left in that layer's compute after its confident keys: a layer's
        compute moves 1 / transfer_layers experts, so a fast link (a host-RAM copy of a small expert: dozens
        per layer) has room, while a disk read of ~2 layers has none. Unknown transfer time (0: the live
        cache's first forward) has none either."""
        per_layer = 1.0 / self.transfer_layers if self.transfer_layers > 0 else 0.0
        room = Counter({layer: math.floor(per_layer) for layer in self.forward_layers})
        room.subtract(k[0] for k in confident)
        return room

    def _spare(self, room: Counter[int]) -> list[Key]:
        """Less likely keys (spare_threshold <= p < threshold), most likely first, as many per layer as the
        link has `room` for: a fast link speculates deeper for free, a disk's plan stays the confident keys."""
        floor = min(self.config.spare_threshold, self.config.threshold)
        room = room.copy()
        spare = sorted((k for k, p in self._forecast.items() if floor <= p < self.config.threshold),
                       key=lambda k: (-self._forecast[k], k))
        taken = []
        for key in spare:
            if room[key[0]] > 0:
                room[key[0]] -= 1
                taken.append(key)
        return taken

    def on_layer(self, layer: int, used: Sequence[Key]) -> list[Key]:
        self._running = self.position(layer)
        self._pending = set(used)
        for key in used:
            self._use(key)
        self._mispredicted |= {k for k in self._prefetched if k[0] == layer and k not in self._pending}
        self._mispredicted -= self._pending
        self._cheapest = None
        self._values = {}
        return []

    def _use(self, key: Key) -> None:
        self._usage[key] = (self._u(key) + (1.0 - self.config.decay), self._forward)

    def _u(self, key: Key) -> float:
        u, when = self._usage.get(key, (0.0, self._forward))
        return u * self.config.decay ** (self._forward - when)

    def value(self, key: Key) -> float:
        if key in self._pending:
            return 2.0
        if key in self._mispredicted:
            return 0.0
        steps = len(self.forward_layers)
        if not self.in_forward(key[0]):
            return self._later_value(key, steps - self._running + len(self.layers))
        distance = self.position(key[0]) - self._running
        later = self._later_value(key, distance + steps)
        if distance <= 0:
            return later
        p = self._forecast.get(key, 0.0)
        return p * self.config.beta**distance + (1.0 - p) * later

    def _later_value(self, key: Key, distance: int) -> float:
        """Discounted chance of the key's use in a later forward, `distance` layers away in the next one.

        Where the link has room in the key's layer, keeping the key is worth less than that chance: evicted, a
        key the forecast then rates likely is prefetched again in time, so keeping it saves a load, not a miss.
        Scaling by refetch_discount lets this forward's speculative keys take its slot (docs/results/
        cache-policies.md); a disk's 1-2 layers per read leave no room, so its plan is unchanged."""
        value = self._u(key) * self.config.beta**distance
        return value * self.config.refetch_discount if key[0] in self._roomy else value

    @property
    def lead(self) -> int:
        """How many layers ahead an evicting prefetch may go: the configured lead, else one transfer's time in
        layers, rounded, at least 1. Admitted just in time (1), a prefetch whose read takes two layers
        leaves its layer waiting for most of it; admitted earlier than needed, it evicts on less knowledge
        (a layer that has run frees slots of known worth). A 6 MiB disk read at batch 1 is ~2 layers here,
        a host-RAM copy a fraction of one, a PCIe copy of a large model's expert tens of layers."""
        if self.config.lead is not None:
            return self.config.lead
        return max(1, min(round(self.transfer_layers), len(self.forward_layers)))

    def admit(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> bool:
        if not full:
            return True
        if self.in_forward(key[0]) and self.position(key[0]) - self._running > self.lead:
            return False  # the planner retries it in a later window
        cheapest = self._cheapest_resident(pinned)
        return cheapest is not None and cheapest[0] < self.value(key)

    def _cheapest_resident(self, pinned: Collection[Key]) -> tuple[float, Key] | None:
        if self._cheapest is None:
            candidates = [(self._resident_value(k), k) for k in self._resident if k not in pinned]
            self._cheapest = min(candidates) if candidates else None
        return self._cheapest

    def _resident_value(self, key: Key) -> float:
        """`value(key)`, computed once while the key is resident, until `plan`, `on_layer` or `begin_forward`
        change every value or a hit or eviction of this key changes its own (nothing else `value` reads moves)."""
        value = self._values.get(key)
        if value is None:
            value = self._values[key] = self.value(key)
        return value

    def victim(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> Key | None:
        if not full:
            return None
        self._cheapest = None  # pins change between demand uses
        cheapest = self._cheapest_resident(pinned)
        return None if cheapest is None else cheapest[1]

    def on_hit(self, key: Key) -> None:
        self._pending.discard(key)
        self._values.pop(key, None)
        self._cheapest = None

    def on_load(self, key: Key) -> None:
        if key not in self._pending:  # not routed to the running layer: a prefetch
            self._prefetched.add(key)
        self._pending.discard(key)
        self._resident.add(key)
        self._cheapest = None

    def on_evict(self, key: Key) -> None:
        self._resident.discard(key)
        self._prefetched.discard(key)
        self._mispredicted.discard(key)
        self._values.pop(key, None)
        self._cheapest = None
