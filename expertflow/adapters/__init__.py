"""Model adapters, one module per MoE family, looked up by the checkpoint's `architectures` entry."""

from __future__ import annotations

from expertflow.adapters.base import ExpertLayout, ExpertPart, MoEAdapter, StackLayers, TensorRef
from expertflow.adapters.deepseek import DeepseekAdapter
from expertflow.adapters.gpt_oss import GptOssAdapter
from expertflow.adapters.mixtral import MixtralAdapter
from expertflow.adapters.olmoe import OlmoeAdapter
from expertflow.adapters.qwen2_moe import Qwen2MoeAdapter
from expertflow.adapters.qwen3_moe import Qwen3MoeAdapter
from expertflow.adapters.switch import SwitchAdapter
from expertflow.errors import ExpertflowError

ADAPTERS: tuple[type[MoEAdapter], ...] = (
    MixtralAdapter,
    Qwen2MoeAdapter,
    Qwen3MoeAdapter,
    OlmoeAdapter,
    DeepseekAdapter,
    GptOssAdapter,
    SwitchAdapter,
)

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(a for cls in ADAPTERS for a in cls.architectures)


def adapter_for(config) -> MoEAdapter:
    """The adapter for a transformers config, or a one-line error listing what is supported."""
    architectures = list(getattr(config, "architectures", None) or [])
    for cls in ADAPTERS:
        if any(a in cls.architectures for a in architectures):
            return cls(config)
    found = ", ".join(architectures) or f"model_type {getattr(config, 'model_type', '?')!r}"
    raise ExpertflowError(
        f"unsupported architecture {found}; expertflow supports {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


__all__ = [
    "ADAPTERS",
    "SUPPORTED_ARCHITECTURES",
    "ExpertLayout",
    "ExpertPart",
    "MoEAdapter",
    "StackLayers",
    "TensorRef",
    "adapter_for",
]
