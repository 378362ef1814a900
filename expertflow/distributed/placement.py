"""Request placement across engine replicas: which replica runs a new request.

Routing-aware placement is the token scheduler's idea (group sequences with similar routing so a batch
activates fewer distinct experts) applied across replicas: a request goes to the replica whose running
batch activates the experts it is predicted to use, so each replica's expert cache holds a narrower working
set. A slack on the running-request counts keeps one replica from taking everything.

Pure Python over (layer, expert) keys, like the policies and schedulers; the server drives them (the offline
study that chose the defaults is retired: docs/results/README.md, "Retired studies").
Shape legend: S prompt tokens, L layers, E experts, K top_k.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable
from typing import ClassVar

import numpy as np

Key = tuple[int, int]          # (layer, expert)
RoutingPath = frozenset[Key]   # the (layer, expert) pairs a request activates (predicted)


def prompt_path(probs: np.ndarray, top_k: int, mode: str = "last") -> RoutingPath:
    """A request's routing path from predicted probabilities (S, L, E) over its prompt: the top-k per layer
    of the last token's forecast (`last`: what its first decode step needs), or the union of every
    position's top-k (`union`: what its prefill touches)."""
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[0] == 0:
        raise ValueError(f"probs must be (S, L, E) with S >= 1, got shape {probs.shape}")
    if mode not in ("last", "union"):
        raise ValueError(f"mode must be 'last' or 'union', got {mode!r}")
    rows = probs[-1:] if mode == "last" else probs
    top = np.argsort(-rows, axis=-1, kind="stable")[..., :top_k]                   # (S', L, K)
    layers = np.broadcast_to(np.arange(probs.shape[1])[None, :, None], top.shape)
    return frozenset(zip(layers.reshape(-1).tolist(), top.reshape(-1).tolist()))


def routing_path(routing: np.ndarray) -> RoutingPath:
    """The pairs that recorded routing (T, L, K) activates, entries < 0 (no expert) skipped."""
    routing = np.asarray(routing)
    tokens, layers, experts = np.nonzero(routing >= 0)
    return frozenset(zip(layers.tolist(), routing[tokens, layers, experts].tolist()))


class ReplicaSet:
    """What placement sees of each replica: its running requests and their (layer, expert) pairs, as
    counts so a finished request's pairs leave only when no other running request still uses them."""

    def __init__(self, num_replicas: int) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self._counts: list[Counter[Key]] = [Counter() for _ in range(num_replicas)]
        self._loads = [0] * num_replicas

    @property
    def num_replicas(self) -> int:
        return len(self._loads)

    def load(self, replica: int) -> int:
        return self._loads[replica]

    def working_set(self, replica: int) -> dict[Key, int]:
        return dict(self._counts[replica])

    def support(self, replica: int) -> Iterable[Key]:
        return self._counts[replica].keys()

    def add(self, replica: int, path: RoutingPath) -> None:
        self._counts[replica].update(path)
        self._loads[replica] += 1

    def remove(self, replica: int, path: RoutingPath) -> None:
        counts = self._counts[replica]
        if self._loads[replica] == 0 or any(counts[key] < 1 for key in path):
            raise ValueError(f"request is not running on replica {replica}")
        counts.subtract(path)
        for key in path:
            if counts[key] == 0:
                del counts[key]
        self._loads[replica] -= 1


class Placement(ABC):
    name: ClassVar[str]

    @abstractmethod
    def choose(self, path: RoutingPath, replicas: ReplicaSet) -> int:
        """The replica to run a request with this predicted routing path (the caller then `add`s it)."""


class RoundRobin(Placement):
    """The baseline: replicas in turn, blind to routing and load."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, path: RoutingPath, replicas: ReplicaSet) -> int:
        replica = self._next % replicas.num_replicas
        self._next = replica + 1
        return replica


class RoutingAware(Placement):
    """Most similar working set among the replicas within `slack` requests of the least loaded.

    Metrics: `jaccard` |P & W| / |P | W| (higher is better), `hamming` |P ^ W| and `new` |P - W| (the
    distinct pairs the request adds to the replica; lower is better), W the replica's working-set pairs.
    Ties go to the less loaded replica, then the lower index. The defaults (`new`, slack 2) loaded fewest
    experts replayed on alpaca traces at 2 and 4 replicas (a retired study, docs/results/README.md)."""

    name = "routing"
    METRICS = ("jaccard", "hamming", "new")

    def __init__(self, metric: str = "new", slack: int = 2) -> None:
        if metric not in self.METRICS:
            raise ValueError(f"metric must be one of {', '.join(self.METRICS)}, got {metric!r}")
        if slack < 1:
            raise ValueError(f"slack must be >= 1 (1 = only the least loaded replicas), got {slack}")
        self.metric = metric
        self.slack = slack

    def choose(self, path: RoutingPath, replicas: ReplicaSet) -> int:
        floor = min(replicas.load(r) for r in range(replicas.num_replicas))
        eligible = [r for r in range(replicas.num_replicas) if replicas.load(r) < floor + self.slack]
        return min(eligible, key=lambda r: (-self._similarity(path, replicas.support(r)), replicas.load(r), r))

    def _similarity(self, path: RoutingPath, support: Iterable[Key]) -> float:
        working = set(support)
        if self.metric == "jaccard":
            union = len(path | working)
            return len(path & working) / union if union else 0.0
        if self.metric == "hamming":
            return -float(len(path ^ working))
        return -float(len(path - working))


PLACEMENTS: dict[str, type[Placement]] = {cls.name: cls for cls in (RoundRobin, RoutingAware)}


def placement_class(name: str) -> type[Placement]:
    if name not in PLACEMENTS:
        raise ValueError(f"unknown placement {name!r}; choose one of {', '.join(PLACEMENTS)}")
    return PLACEMENTS[name]
