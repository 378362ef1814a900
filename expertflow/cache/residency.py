"""Which expert sits in which fast-tier slot, and the counters: pure Python, shared by engine and simulator.

The live cache wraps this with tensors and copies; the trace simulator uses it as is. Both therefore
count hits, correction loads, loads and evictions the same way for the same accesses and policy. The planner tells
it where forwards begin and end (`begin_forward`, `end_forward`), so a prefetch is judged by the forward
it was fetched for and a re-load is dated in forwards.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from expertflow.cache.policies import CachePolicy, Key

RELOAD_FORWARDS = 4  # a load of a key evicted in this forward or the 4 before it counts as a re-load


@dataclass
class CacheCounters:
    """Hit ratio = hits / (hits + correction_loads) over demand uses; loads count every transfer into the fast tier.

    A correction load is a miss: a used expert that was not resident, loaded when its layer ran (the paper's
    run-time correction of a forecast), so loads = correction_loads + prefetch_loads. Every prefetch is judged by the
    forward it was fetched for: a prefetch hit if that forward used it, wasted if it was evicted before any
    use, stale if the forward ended with it resident and unused (a later use is an ordinary hit). So once
    its forward has ended, prefetch_loads = prefetch_hits + wasted_prefetches + stale_prefetches (policy
    `none`'s initial loads aside). A re-load is any load (demand or prefetch) of a key evicted within the
    last RELOAD_FORWARDS forwards: the loads an eviction choice cost soon after.
    """

    hits: int = 0
    correction_loads: int = 0
    loads: int = 0
    prefetch_loads: int = 0
    evictions: int = 0
    prefetch_hits: int = 0
    wasted_prefetches: int = 0
    stale_prefetches: int = 0
    reloads: int = 0

    @property
    def uses(self) -> int:
        return self.hits + self.correction_loads

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.uses if self.uses else 1.0

    def minus(self, before: "CacheCounters") -> "CacheCounters":
        return CacheCounters(**{f: getattr(self, f) - getattr(before, f) for f in self.__dataclass_fields__})

    def copy(self) -> "CacheCounters":
        return CacheCounters(**vars(self))


@dataclass(frozen=True)
class SlotAssignment:
    """Result of bringing a key into the cache: its slot, whether it had to be loaded, what it displaced."""

    slot: int
    loaded: bool
    evicted: Key | None


class Residency:
    """Slot bookkeeping for a fixed pool of `capacity` expert slots under one policy."""

    def __init__(self, capacity: int, policy: CachePolicy) -> None:
        self.capacity = capacity
        self.policy = policy
        self.slot_of: dict[Key, int] = {}
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._pins: Counter[Key] = Counter()
        self._unused_prefetches: set[Key] = set()   # prefetched for the running forward, not yet used
        self._evicted_at: dict[Key, int] = {}         # forward of each key's last eviction
        self._forward = 0
        self.counters = CacheCounters()
        self.slots_used_peak = 0
        self._use_log: list[Key] | None = None

    def record_uses(self) -> tuple[list[Key], list[Key]]:
        """Start logging demand uses: (the keys resident now, the list each later use is appended to), so a
        run can be replayed offline from the state it started in (Belady's MIN over the same accesses)."""
        self._use_log = []
        return list(self.slot_of), self._use_log

    def stop_recording(self) -> None:
        self._use_log = None

    def __contains__(self, key: Key) -> bool:
        return key in self.slot_of

    def use(self, key: Key) -> SlotAssignment:
        """A demand use of `key` by a running layer: a hit, or a miss that loads it now (a correction load)."""
        if self._use_log is not None:
            self._use_log.append(key)
        if key in self.slot_of:
            self.counters.hits += 1
            if key in self._unused_prefetches:
                self._unused_prefetches.discard(key)
                self.counters.prefetch_hits += 1
            self.policy.on_hit(key)
            return SlotAssignment(self.slot_of[key], loaded=False, evicted=None)
        self.counters.correction_loads += 1
        return self._load(key)

    def prefetch(self, key: Key) -> SlotAssignment | None:
        """Bring `key` in ahead of its use (no hit or miss is counted until it is used).

        None when the policy declines: nothing resident is worth less than the prefetch."""
        if key in self.slot_of:
            return SlotAssignment(self.slot_of[key], loaded=False, evicted=None)
        if not self.policy.admit(key, self.slot_of.keys(), self._pins.keys(), full=not self._free):
            return None
        placement = self._load(key)
        self.counters.prefetch_loads += 1
        self._unused_prefetches.add(key)
        return placement

    def preload(self, key: Key) -> SlotAssignment:
        """Load one of the policy's initial residents (a load, but no speculation to judge)."""
        placement = self._load(key)
        self.counters.prefetch_loads += 1
        return placement

    def begin_forward(self) -> None:
        """A forward starts (ending the previous one if nobody did)."""
        self.end_forward()
        self._forward += 1

    def end_forward(self) -> None:
        """The running forward is over: its prefetches it did not use are stale."""
        self.counters.stale_prefetches += len(self._unused_prefetches)
        self._unused_prefetches.clear()

    def can_take(self, key: Key) -> bool:
        """Whether a use of `key` now would find it a slot: resident, or a slot its policy would give it."""
        return key in self.slot_of or self.policy.can_place(key, self.slot_of.keys(), self._pins.keys(),
                                                              full=not self._free)

    def pin(self, key: Key) -> None:
        self._pins[key] += 1

    def unpin(self, key: Key) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def _load(self, key: Key) -> SlotAssignment:
        victim = self.policy.victim(key, self.slot_of.keys(), self._pins.keys(), full=not self._free)
        evicted = None
        if victim is not None:
            if victim not in self.slot_of or victim in self._pins:
                raise RuntimeError(f"policy {self.policy.name} chose {victim}, which is not evictable")
            slot = self.slot_of.pop(victim)
            self.policy.on_evict(victim)
            self.counters.evictions += 1
            self._evicted_at[victim] = self._forward
            if victim in self._unused_prefetches:
                self._unused_prefetches.discard(victim)
                self.counters.wasted_prefetches += 1
            evicted = victim
        elif self._free:
            slot = self._free.pop()
        else:
            raise RuntimeError(f"policy {self.policy.name} chose no victim but the cache is full")
        self.slot_of[key] = slot
        self.policy.on_load(key)
        self.counters.loads += 1
        if self._forward - self._evicted_at.get(key, -RELOAD_FORWARDS - 1) <= RELOAD_FORWARDS:
            self.counters.reloads += 1
        self.slots_used_peak = max(self.slots_used_peak, self.capacity - len(self._free))
        return SlotAssignment(slot, loaded=True, evicted=evicted)
