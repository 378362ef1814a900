"""Cache policies by name: the CLI's `--policy` and the simulator's `--policies` pick these classes."""

from __future__ import annotations

from expertflow.errors import ExpertflowError
from expertflow.policies.base import CachePolicy, Forecast, Key
from expertflow.policies.belady import BeladyPolicy
from expertflow.policies.lfu import LFUPolicy
from expertflow.policies.lru import LRUPolicy
from expertflow.policies.plec import PLECPolicy
from expertflow.policies.pregated import PregatedPolicy
from expertflow.policies.resident import AllResidentPolicy
from expertflow.policies.ring import RingPolicy

POLICIES: dict[str, type[CachePolicy]] = {
    cls.name: cls
    for cls in (AllResidentPolicy, LRUPolicy, LFUPolicy, RingPolicy, PregatedPolicy, PLECPolicy, BeladyPolicy)
}


def policy_class(name: str) -> type[CachePolicy]:
    try:
        return POLICIES[name]
    except KeyError:
        raise ExpertflowError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None


__all__ = ["POLICIES", "CachePolicy", "Forecast", "Key", "policy_class"]
