"""Switch Transformers: an encoder-decoder with top-1 sparse MLPs in both stacks, and expert capacity.

MoE layers are one global index over the sparse blocks, the encoder's first, then the decoder's, so an encoder
forward touches only the first group and a decoding step only the second. A token the router drops for
capacity is computed by no expert.

Shape legend: T tokens, E experts, H d_model, I d_ff. Design: docs/design/switch.md.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import torch
from torch import nn
from transformers import AutoModelForSeq2SeqLM
from transformers.activations import ACT2FN

from expertflow.adapters.base import ExpertLayout, MoEAdapter, StackLayers, TensorRef
from expertflow.errors import ExpertflowError

# The feed-forward sublayer is the last of a block: [self-attn, ff] in the encoder, [self-attn, cross, ff]
# in the decoder.
_FF_INDEX = {"encoder": 1, "decoder": 2}
_EXPERT_TENSOR = re.compile(r"\.experts\.expert_\d+\.(wi|wo)\.weight$")


def sparse_blocks(config) -> list[tuple[str, int]]:
    """(stack, block) of every sparse block, in global MoE-layer order; mirrors SwitchTransformersStack."""
    blocks = []
    for stack, count, step in (("encoder", config.num_layers, config.encoder_sparse_step),
                               ("decoder", config.num_decoder_layers, config.decoder_sparse_step)):
        blocks += [(stack, i) for i in range(count) if step > 0 and (i % step == 1 or step == 1)]
    return blocks


class SwitchAdapter(MoEAdapter):
    architectures = ("SwitchTransformersForConditionalGeneration",)
    auto_class = AutoModelForSeq2SeqLM
    kind = "encoder-decoder"
    hub_expert_names = ("wi", "wo")
    fused_expert_names = ()
    num_experts_attr = "num_experts"
    intermediate_attr = "d_ff"

    def __init__(self, config) -> None:
        # Not the base constructor: Switch has no top_k or hidden_act in its config (always top-1, dense_act_fn).
        self.config = config
        self.num_experts = int(config.num_experts)
        self.top_k = 1
        self.hidden_size = int(config.d_model)
        self.intermediate_size = int(config.d_ff)
        self.layout = self.expert_layout()
        self.act_fn = ACT2FN[config.dense_act_fn]
        self.blocks = sparse_blocks(config)

    def expert_layout(self) -> ExpertLayout:
        return ExpertLayout.of(("wi", (self.intermediate_size, self.hidden_size)),
                               ("wo", (self.hidden_size, self.intermediate_size)))

    # ---- module paths -------------------------------------------------------------------------
    def moe_layers(self, model: nn.Module) -> list[int]:
        layers = list(range(len(self.blocks)))
        missing = [self.experts_path(layer) for layer in layers if not self._has_experts(model, layer)]
        if missing:
            raise ExpertflowError(f"the model has no experts at {missing[0]}, where its config puts a sparse layer; "
                                  "the checkpoint is not a SwitchTransformersForConditionalGeneration")
        return layers

    def stacks(self, model: nn.Module) -> list[StackLayers]:
        self.moe_layers(model)
        counts = {"encoder": int(self.config.num_layers), "decoder": int(self.config.num_decoder_layers)}
        return [StackLayers(name, count,
                            tuple(block for stack, block in self.blocks if stack == name),
                            tuple(layer for layer, (stack, _) in enumerate(self.blocks) if stack == name))
                for name, count in counts.items()]

    def block_of(self, layer: int) -> str:
        stack, block = self.blocks[layer]
        return f"{stack}.block.{block}.layer.{_FF_INDEX[stack]}.mlp"

    def _has_experts(self, model: nn.Module, layer: int) -> bool:
        try:
            block = model.get_submodule(self.block_of(layer))
        except AttributeError:
            return False
        return isinstance(getattr(block, "experts", None), nn.Module)

    def experts_path(self, layer: int) -> str:
        return self.block_of(layer) + ".experts"

    # ---- checkpoint names ---------------------------------------------------------------------
    def is_expert_tensor(self, checkpoint_key: str) -> bool:
        return _EXPERT_TENSOR.search(checkpoint_key) is not None

    def expert_refs(self, layer: int, expert: int, available: Collection[str]) -> list[TensorRef]:
        names = [f"{self.experts_path(layer)}.expert_{expert}.{n}.weight" for n in self.hub_expert_names]
        if all(name in available for name in names):
            return [TensorRef(name) for name in names]
        raise ExpertflowError(f"checkpoint has no weights for expert {expert} of layer {layer} (looked for "
                              f"{names[0]}); the safetensors files are incomplete or not from this architecture")

    # ---- compute ----------------------------------------------------------------------------
    def routing_inputs(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Switch passes its experts a one-hot dispatch mask (T, 1, E) and the top probability (T, 1).

        -> expert index (T, 1) and weights (T, 1); a token dropped for capacity (all-zero mask) gets index E,
        which no expert owns, so it is skipped exactly as the eager loop skips it (its output stays zero)."""
        selected = top_k_index  # (T, 1, E) one-hot, int64
        dispatched = selected.amax(dim=-1) > 0  # (T, 1)
        index = torch.where(dispatched, selected.argmax(dim=-1), self.num_experts)
        return index, top_k_weights

    def expert_forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """SwitchTransformersDenseActDense op for op (its dropout is the identity in eval)."""
        wo = weights["wo"]
        hidden = self.act_fn(nn.functional.linear(x, weights["wi"]))
        if hidden.dtype != wo.dtype and wo.dtype != torch.int8:
            hidden = hidden.to(wo.dtype)
        return nn.functional.linear(hidden, wo)
