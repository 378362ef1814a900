"""DeepSeek-V2/V3 (DeepSeek-MoE): shared experts stay resident; the first `first_k_dense_replace` layers are dense."""

from expertflow.adapters.base import MoEAdapter


class DeepseekAdapter(MoEAdapter):
    architectures = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
    num_experts_attr = "n_routed_experts"
