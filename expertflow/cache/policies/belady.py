"""Belady's MIN: evict the resident whose next use is farthest in the future. Offline: the simulator
hands it the whole access sequence first; no online policy can load less for the same cache size.

It follows the sequence with a cursor: every use (hit or demand load) is the next access of the sequence.
A replay may start warm, from the residents a live run began with (`set_future(..., resident=...)`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from expertflow.errors import ExpertflowError
from expertflow.cache.policies.base import CachePolicy, Key

_NEVER = float("inf")


class BeladyPolicy(CachePolicy):
    name = "belady"
    needs_future = True

    def __init__(self, capacity: int, layers: Sequence[int], num_experts: int, top_k: int) -> None:
        super().__init__(capacity, layers, num_experts, top_k)
        self._accesses: list[Key] | None = None
        self._following: list[float] = []   # index of the next access of the same key, per access
        self._cursor = 0
        self._next_use: dict[Key, float] = {}
        self._warm: list[Key] = []          # residents before the first access, not yet loaded
        self._first_use: dict[Key, int] = {}

    def set_future(self, accesses: Sequence[Key], resident: Sequence[Key] = ()) -> None:
        """The complete sequence of demand uses this policy will see, in order, and the keys resident before
        the first of them (loaded through `initial_residents`)."""
        if len(set(resident)) != len(resident) or len(resident) > self.capacity:
            raise ValueError(f"belady: {len(resident)} initial residents do not fit {self.capacity} distinct slots")
        self._accesses = list(accesses)
        self._warm = list(resident)
        self._following = [_NEVER] * len(self._accesses)
        seen: dict[Key, int] = {}
        for i in range(len(self._accesses) - 1, -1, -1):
            key = self._accesses[i]
            self._following[i] = seen.get(key, _NEVER)
            seen[key] = i
        self._cursor = 0
        self._first_use = seen  # after the backward pass: each key's first access

    def initial_residents(self) -> list[Key]:
        return list(self._warm)

    def _advance(self, key: Key) -> None:
        if self._accesses is None:
            raise ExpertflowError("policy 'belady' needs the future access sequence; run it with expertflow simulate")
        if self._cursor >= len(self._accesses) or self._accesses[self._cursor] != key:
            raise RuntimeError(f"belady: use of {key} at access {self._cursor} does not follow the given sequence")
        self._next_use[key] = self._following[self._cursor]
        self._cursor += 1

    def on_hit(self, key: Key) -> None:
        self._advance(key)

    def on_load(self, key: Key) -> None:
        if key in self._warm:  # a warm resident, loaded before the sequence starts
            self._warm.remove(key)
            self._next_use[key] = self._first_use.get(key, _NEVER)
            return
        self._advance(key)

    def on_evict(self, key: Key) -> None:
        del self._next_use[key]

    def victim(self, key: Key, resident: Collection[Key], pinned: Collection[Key], full: bool) -> Key | None:
        if not full:
            return None
        return max((k for k in resident if k not in pinned), key=lambda k: self._next_use[k])
