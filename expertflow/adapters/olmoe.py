"""OLMoE: every layer routed, no shared experts; expert size is `intermediate_size`."""

from expertflow.adapters.base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    architectures = ("OlmoeForCausalLM",)
    intermediate_attr = "intermediate_size"
