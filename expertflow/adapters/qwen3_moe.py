"""Qwen3-MoE: routed experts only; `mlp_only_layers` may keep some layers dense."""

from expertflow.adapters.base import MoEAdapter


class Qwen3MoeAdapter(MoEAdapter):
    architectures = ("Qwen3MoeForCausalLM",)
