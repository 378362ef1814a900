"""GPT-OSS: fused experts only, transposed (x @ W), biases, and gate/up interleaved column by column.

The gate is a clamped, alpha-scaled SwiGLU variant; this mirrors transformers' `GptOssExperts`
(`_apply_gate` and the eager loop) op for op so outputs are bit-identical. Hub GPT-OSS checkpoints
quantized to MXFP4 (`*_blocks`, `*_scales`) are not supported: dequantize them first.

Shape legend: H hidden, I intermediate.
"""

from __future__ import annotations

import torch

from expertflow.adapters.base import ExpertLayout, MoEAdapter


class GptOssAdapter(MoEAdapter):
    architectures = ("GptOssForCausalLM",)
    hub_expert_names = None
    fused_expert_names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    num_experts_attr = "num_local_experts"
    intermediate_attr = "intermediate_size"
    router_name = "router"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit

    def expert_layout(self) -> ExpertLayout:
        return ExpertLayout.of(
            ("gate_up", (self.hidden_size, 2 * self.intermediate_size)),
            ("gate_up_bias", (2 * self.intermediate_size,)),
            ("down", (self.intermediate_size, self.hidden_size)),
            ("down_bias", (self.hidden_size,)),
        )

    def expert_forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        gate_up = x @ weights["gate_up"] + weights["gate_up_bias"]  # (T, 2I), gate/up interleaved
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return ((up + 1) * glu) @ weights["down"] + weights["down_bias"]
