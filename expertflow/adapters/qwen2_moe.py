"""Qwen2-MoE (Qwen1.5-MoE): routed experts plus an always-on shared expert, which stays resident."""

from expertflow.adapters.base import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    architectures = ("Qwen2MoeForCausalLM",)
