"""Under which name a transformers model's forward takes its KV cache, and where its output returns it.

transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40), while
expertflow supports every transformers 5 release. The name is decided here, in the adapter layer, because
that is the only code that knows HF specifics; and it is decided once per loaded model (the engines ask
at construction) from the forward's own signature: asking the model what it accepts is right on every
release and for every model class, where comparing version strings would guess when each was converted.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from expertflow.errors import ExpertflowError

NEW_NAME = "cache"             # transformers >= 5.24
OLD_NAME = "past_key_values"   # transformers 5.0 - 5.23 (deprecated from 5.24, removed in 5.40)


@dataclass(frozen=True)
class KVArgument:
    """The keyword a model's forward takes its KV cache under; `inputs`/`output` carry it in and out."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in (NEW_NAME, OLD_NAME):
            raise ValueError(f"KV cache argument must be {NEW_NAME!r} or {OLD_NAME!r}, got {self.name!r}")

    @classmethod
    def of(cls, forward: Callable) -> KVArgument:
        """The name `forward` (a model's bound forward) declares; the new one if it declares both.

        `inspect.signature` follows `functools.wraps`, so transformers' decorators (deprecate_kwarg,
        can_return_tuple) show the real forward's parameters."""
        try:
            parameters = inspect.signature(forward).parameters
        except (TypeError, ValueError) as exc:
            raise ExpertflowError(f"cannot read the signature of {_name(forward)}: {exc}") from exc
        for name in (NEW_NAME, OLD_NAME):
            if name in parameters:
                return cls(name)
        raise ExpertflowError(f"{_name(forward)} takes neither `{NEW_NAME}` nor `{OLD_NAME}`; expertflow needs a "
                              "transformers 5 model whose forward takes a KV cache")

    def inputs(self, kv: object) -> dict[str, object]:
        """Keyword arguments passing `kv` (a transformers Cache, or None before prefill) to the forward."""
        return {self.name: kv}

    @staticmethod
    def output(out: object) -> object:
        """The KV cache a forward returned: the output class's `cache` field where it has one (5.24 keeps
        `past_key_values` only as a property that logs a deprecation), else its `past_key_values` field."""
        fields = getattr(type(out), "__dataclass_fields__", {})
        for name in (NEW_NAME, OLD_NAME):
            if name in fields:
                return getattr(out, name)
        raise ExpertflowError(f"{type(out).__name__} holds neither `{NEW_NAME}` nor `{OLD_NAME}`; "
                              "call the model with use_cache=True on transformers 5")


def _name(forward: Callable) -> str:
    return getattr(forward, "__qualname__", repr(forward))
