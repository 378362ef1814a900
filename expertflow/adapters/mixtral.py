"""Mixtral: hub checkpoints name the block `block_sparse_moe` and the expert weights w1 (gate), w3 (up), w2 (down)."""

from expertflow.adapters.base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    architectures = ("MixtralForCausalLM",)
    checkpoint_block_paths = ("model.layers.{layer}.block_sparse_moe", "model.layers.{layer}.mlp")
    hub_expert_names = ("w1", "w3", "w2")
    num_experts_attr = "num_local_experts"
    intermediate_attr = "intermediate_size"

    def module_key(self, checkpoint_key: str) -> str:
        return checkpoint_key.replace(".block_sparse_moe.", ".mlp.")
