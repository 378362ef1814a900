"""Cache policies by name: the CLI's `--policy` and the simulator's `--policies` pick these classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields

from expertflow.errors import ExpertflowError
from expertflow.cache.policies.base import CachePolicy, Forecast, Key
from expertflow.cache.policies.belady import BeladyPolicy
from expertflow.cache.policies.lfu import LFUPolicy
from expertflow.cache.policies.lru import LRUPolicy
from expertflow.cache.policies.plec import PLECPolicy
from expertflow.cache.policies.pregated import PregatedPolicy
from expertflow.cache.policies.resident import AllResidentPolicy
from expertflow.cache.policies.ring import RingPolicy

POLICIES: dict[str, type[CachePolicy]] = {
    cls.name: cls
    for cls in (AllResidentPolicy, LRUPolicy, LFUPolicy, RingPolicy, PregatedPolicy, PLECPolicy, BeladyPolicy)
}
# The names the CLI, the API and the bench have spelled since the start: valid for good (a contract, so no
# deprecation note), and what outputs report when a user passes them.
POLICY_ALIASES: dict[str, str] = {"none": AllResidentPolicy.name, "expertflow": PLECPolicy.name}
POLICY_NAMES: tuple[str, ...] = (*POLICIES, *POLICY_ALIASES)   # every name a policy can be asked for by


def policy_names_help() -> str:
    """The policies for --help: canonical names, then each alias with the name it stands for."""
    aliases = ", ".join(f"{alias} = {name}" for alias, name in POLICY_ALIASES.items())
    return f"{', '.join(POLICIES)} (aliases: {aliases})"


def _spelled(name: str) -> str:
    """A canonical name with its aliases, for messages: `plec (or expertflow)`."""
    aliases = [alias for alias, target in POLICY_ALIASES.items() if target == name]
    return f"{name} (or {', '.join(aliases)})" if aliases else name


def policy_settings(name: str, settings: Mapping[str, object]) -> object | None:
    """The policy's validated settings object from `settings` (None when empty: the policy's defaults);
    a one-line error when the policy has no such knobs or a value is out of range."""
    if not settings:
        return None
    cls = policy_class(name)
    if cls.settings_class is None:
        raise ExpertflowError(f"policy {name!r} has no settings ({', '.join(settings)} given); "
                              f"{', '.join(sorted(settings))} applies to policy "
                              f"{' or '.join(_spelled(n) for n, c in POLICIES.items() if c.settings_class)}")
    known = {f.name for f in fields(cls.settings_class)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ExpertflowError(f"policy {name!r} has no setting {unknown[0]!r}; it has {', '.join(sorted(known))}")
    try:
        return cls.settings_class(**settings)
    except ValueError as exc:
        raise ExpertflowError(str(exc)) from None


def setting_names(name: str) -> str:
    """The policy's knobs, comma-separated in their settings class's order (for CLI help)."""
    return ", ".join(f.name for f in fields(policy_class(name).settings_class))


def cli_settings(threshold: float | None = None, pairs: Sequence[str] = ()) -> dict[str, float]:
    """The CLI's --prefetch-threshold P (PLECConfig's `threshold`) and --policy-setting KEY=VALUE pairs as
    one settings dict, numbers parsed (integers stay integers); a one-line error for a malformed pair."""
    settings: dict[str, float] = {}
    for pair in pairs:
        key, sep, text = (part.strip() for part in pair.partition("="))
        if not sep or not key:
            raise ExpertflowError(f"--policy-setting wants KEY=VALUE, e.g. lead=3; got {pair!r}")
        settings[key] = _number(key, text)
    if threshold is not None:
        if settings.get("threshold", threshold) != threshold:
            raise ExpertflowError("--prefetch-threshold and --policy-setting threshold=... disagree; give one")
        settings["threshold"] = threshold
    return settings


def _number(key: str, text: str) -> float:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise ExpertflowError(f"--policy-setting {key}={text!r}: the value must be a number")


def build_policy(name: str, capacity: int, layers: Sequence[int], num_experts: int, top_k: int,
                 settings: Mapping[str, object] | None = None) -> CachePolicy:
    """The policy `name` over `capacity` slots, with its settings where given."""
    config = policy_settings(name, settings or {})
    options = {} if config is None else {"config": config}
    return policy_class(name)(capacity, layers, num_experts, top_k, **options)


def policy_class(name: str) -> type[CachePolicy]:
    """The class a policy name (canonical or alias) stands for."""
    try:
        return POLICIES[POLICY_ALIASES.get(name, name)]
    except KeyError:
        raise ExpertflowError(f"unknown policy {name!r}; choose one of {policy_names_help()}") from None


__all__ = ["POLICIES", "POLICY_ALIASES", "POLICY_NAMES", "CachePolicy", "Forecast", "Key", "build_policy",
           "policy_class", "policy_names_help", "policy_settings", "cli_settings"]
