"""Cache policies by name: the CLI's `--policy` picks one of these classes."""

from __future__ import annotations

from expertflow.errors import ExpertflowError
from expertflow.policies.base import CachePolicy, Key
from expertflow.policies.lru import LRUPolicy
from expertflow.policies.resident import AllResidentPolicy

POLICIES: dict[str, type[CachePolicy]] = {cls.name: cls for cls in (AllResidentPolicy, LRUPolicy)}


def policy_class(name: str) -> type[CachePolicy]:
    try:
        return POLICIES[name]
    except KeyError:
        raise ExpertflowError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None


__all__ = ["POLICIES", "CachePolicy", "Key", "policy_class"]
