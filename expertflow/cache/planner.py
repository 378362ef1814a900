"""`CachePlanner`: one forward through the cache, in the order both the live engine and the simulator follow.

`begin_step(forecast, layers)`, then per MoE layer of the forward `route(layer, keys)`, `use(key)` and
`release(key)` for each routed key, and `finish_layer(layer)`. All but `release` return the prefetches to issue
now; a miss at `use` is a demand load, ahead of every prefetch, and a layer's transfer window fits
`transfer_ratio` loads. Design: docs/design/cache-planner.md.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from expertflow.cache.policies.base import Forecast, Key
from expertflow.cache.residency import Residency, SlotAssignment

Issued = tuple[Key, SlotAssignment]
USE_AHEAD = 1  # keys of a layer used ahead of the running one where a transfer worker can read them


class CachePlanner:
    def __init__(self, residency: Residency, transfer_ratio: float | None, use_ahead: int = 0) -> None:
        if transfer_ratio is not None and transfer_ratio < 0:
            raise ValueError(f"transfer_ratio must be >= 0 (expert loads per layer compute), got {transfer_ratio}")
        if use_ahead < 0:
            raise ValueError(f"use_ahead counts a layer's keys used ahead of the running one, got {use_ahead}")
        self.residency = residency
        self.policy = residency.policy
        self.transfer_ratio = transfer_ratio
        self.use_ahead = use_ahead
        self._to_use: deque[Key] = deque()  # the running layer's routed keys not used yet, in use order
        self._held: set[Key] = set()         # used ahead (and pinned), not yet taken by their own `use`
        # The simulator's clock: a transfer takes 1 / ratio layer windows (no ratio: no time). The live cache
        # overrides this with measured times.
        self.policy.set_transfer_time(1.0 / transfer_ratio if transfer_ratio else 0.0)
        self._queue: deque[Key] = deque()
        self._room = 0.0
        self._ran = -1  # position of the last layer routed in this forward

    def begin_step(self, forecast: Forecast | None, layers: Sequence[int] | None = None) -> list[Issued]:
        """A forward over `layers` (default: every MoE layer) starts: queue the policy's plan and open
        the first layer's window."""
        self._ran = -1
        self._drop_held()
        self.residency.begin_forward()
        self.policy.begin_forward(self.policy.layers if layers is None else layers)
        self._queue = deque(self.policy.plan(forecast))
        return self._window()

    def route(self, layer: int, keys: Sequence[Key]) -> list[Issued]:
        """`layer`'s routing is known; returns the prefetches of an implicit begin_step, if one was needed."""
        issued: list[Issued] = []
        if not self.policy.in_forward(layer) or self.policy.position(layer) <= self._ran:
            issued = self.begin_step(None)  # a forward started without begin_step (e.g. a direct model call)
        self._ran = self.policy.position(layer)
        self._drop_held()
        self._to_use = deque(keys)
        self._correct(layer, keys)
        return issued

    def _correct(self, layer: int, keys: Sequence[Key]) -> None:
        """The paper's run-time correction, once a layer's routing is known: the policy marks the layer's
        mispredicted prefetches as the first to go and names keys worth fetching ahead (pre-gated's next layer),
        which go to the front of the queue; queued prefetches for layers that have run are dropped. A routed key
        that is not resident becomes a demand load at its `use`, ahead of every prefetch (`transfers.DEMAND`)."""
        ahead = self.policy.on_layer(layer, keys)
        still = [k for k in self._queue if self._ahead(k)]
        self._queue = deque(dict.fromkeys([*ahead, *still]))

    def use(self, key: Key) -> list[Issued]:
        """A demand use of `key` by the running layer, pinned until `release`, and the uses of the layer's
        next `use_ahead` keys (pinned too): the placements made now, `key`'s first unless it was used ahead."""
        made: list[Issued] = []
        if key in self._held:
            self._held.discard(key)
        else:
            made.append((key, self._use(key)))
        if key in self._to_use:
            self._to_use.remove(key)
        # A cache at its policy's minimum (a top-1 model: one slot per layer) may have no slot for a key
        # ahead while this one is pinned: then the key waits for its own turn.
        while self._to_use and len(self._held) < self.use_ahead and self.residency.can_take(self._to_use[0]):
            ahead = self._to_use.popleft()
            self._held.add(ahead)
            made.append((ahead, self._use(ahead)))
        return made

    def release(self, key: Key) -> None:
        self.residency.unpin(key)

    def _use(self, key: Key) -> SlotAssignment:
        placement = self.residency.use(key)
        self.residency.pin(key)
        return placement

    def _drop_held(self) -> None:
        """Keys used ahead that their layer never took (it stopped early): unpinned, their use stands."""
        for key in self._held:
            self.residency.unpin(key)
        self._held = set()
        self._to_use = deque()

    def finish_layer(self, layer: int) -> list[Issued]:
        """`layer`'s experts ran: open the window before the next layer (none after the forward's last)."""
        self._drop_held()
        if self.policy.position(layer) == len(self.policy.forward_layers) - 1:
            self.residency.end_forward()
            return []
        return self._window()

    def _ahead(self, key: Key) -> bool:
        """Whether this forward has still to run `key`'s layer."""
        return self.policy.in_forward(key[0]) and self.policy.position(key[0]) > self._ran

    def _window(self) -> list[Issued]:
        self._room = math.inf if self.transfer_ratio is None else self._room + self.transfer_ratio
        issued: list[Issued] = []
        kept: deque[Key] = deque()  # declined or out of room: retried in later windows, until too late
        while self._queue:
            key = self._queue.popleft()
            if not self._ahead(key) or key in self.residency:
                continue
            placement = self.residency.prefetch(key) if self._room >= 1 else None
            if placement is None:
                kept.append(key)
                continue
            issued.append((key, placement))
            self._room -= 1
        self._queue = kept
        if self._room >= 1 and self._room != math.inf:
            self._room -= math.floor(self._room)  # an idle channel does not bank time
        return issued
