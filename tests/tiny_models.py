"""Tiny random MoE models of every supported family, built from configs and saved like hub checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from expertflow.embedded import EMBEDDED_MODEL_DIR

__all__ = ["TINY_CONFIGS", "EMBEDDED_MODEL_DIR", "save_tiny_model", "tiny_config"]

_COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
               max_position_embeddings=256, bos_token_id=0, eos_token_id=2, pad_token_id=1)

TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(model_type="mixtral", intermediate_size=16, num_hidden_layers=3,
                    num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=24, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, num_hidden_layers=3, num_experts=8,
                      num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=24, moe_intermediate_size=16,
                      num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, head_dim=8),
    "olmoe": dict(model_type="olmoe", intermediate_size=16, num_hidden_layers=3, num_experts=8,
                  num_experts_per_tok=2),
    "deepseek_v2": dict(model_type="deepseek_v2", intermediate_size=48, moe_intermediate_size=16,
                        num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    "deepseek_v3": dict(model_type="deepseek_v3", intermediate_size=48, moe_intermediate_size=16,
                        num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    "gpt_oss": dict(model_type="gpt_oss", intermediate_size=16, num_hidden_layers=2, num_local_experts=8,
                    num_experts_per_tok=2, head_dim=8, layer_types=["sliding_attention", "full_attention"],
                    sliding_window=16),
}


def tiny_config(family: str):
    spec = dict(_COMMON, **TINY_CONFIGS[family])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def save_tiny_model(family: str, out: Path, seed: int = 0) -> Path:
    """Random-init a tiny model of `family` and `save_pretrained` it (hub-style per-expert tensors)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    # Router weights scaled up so routing is decisive and varies by token (random init is near-uniform).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and param.dim() == 2 and param.shape[0] != 1:
                param.mul_(20.0)
    model.save_pretrained(out)
    return out
