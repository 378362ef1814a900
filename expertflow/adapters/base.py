"""The adapter interface: everything expertflow knows about one MoE family's module paths and tensor names.

Adapters are the only code that knows HF module paths (`model.layers.{l}.mlp.experts`) and checkpoint
tensor names (`...experts.{e}.w1.weight` or fused `...experts.gate_up_proj`). Everything else speaks
of `(layer, expert)` keys and flat expert buffers.

Shape legend: E experts per layer, H hidden size, I expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.activations import ACT2FN

from expertflow.errors import ExpertflowError


@dataclass(frozen=True)
class ExpertPart:
    """One weight of an expert inside its flat buffer: `flat[offset : offset + numel].view(shape)`."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ExpertLayout:
    """The flat-buffer layout of one expert; one buffer per expert makes a transfer one copy."""

    parts: tuple[ExpertPart, ...]

    @classmethod
    def of(cls, *named_shapes: tuple[str, tuple[int, ...]]) -> "ExpertLayout":
        parts, offset = [], 0
        for name, shape in named_shapes:
            part = ExpertPart(name, tuple(shape), offset)
            parts.append(part)
            offset += part.numel
        return cls(tuple(parts))

    @property
    def numel(self) -> int:
        last = self.parts[-1]
        return last.offset + last.numel

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of one expert's flat buffer in `dtype`: one fast-tier slot."""
        return self.numel * dtype.itemsize

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {p.name: flat[p.offset : p.offset + p.numel].view(p.shape) for p in self.parts}


@dataclass(frozen=True)
class StackLayers:
    """One stack of transformer blocks (a decoder-only model has one): its block count, the blocks that
    hold routed experts, and the MoE layer numbers (cache keys) the adapter gives them, in block order."""

    name: str
    blocks: int
    moe_blocks: tuple[int, ...]
    moe_layers: tuple[int, ...]


@dataclass(frozen=True)
class TensorRef:
    """Where a piece of an expert lives in the checkpoint: a tensor name, and for fused 3-D tensors the
    expert's index along dim 0. Refs of one expert fill its flat buffer in order."""

    name: str
    index: int | None = None


class MoEAdapter:
    """Base for one MoE family. Subclasses set the class attributes; most need nothing else."""

    architectures: tuple[str, ...] = ()
    # Module path of a layer's MoE block (the one with `.experts`), and its name in hub checkpoints.
    block_path: str = "model.layers.{layer}.mlp"
    checkpoint_block_paths: tuple[str, ...] = ("model.layers.{layer}.mlp",)
    # Per-expert tensor names in hub checkpoints, in flat-buffer order: gate rows, up rows, down
    # (None: the family only publishes fused tensors).
    hub_expert_names: tuple[str, ...] | None = ("gate_proj", "up_proj", "down_proj")
    # Fused 3-D tensor names (experts along dim 0), in flat-buffer order, as transformers 5 names them.
    fused_expert_names: tuple[str, ...] = ("gate_up_proj", "down_proj")
    num_experts_attr: str = "num_experts"
    # The MoE block's router submodule; its output (or the output's first element) is the (T, E) logits.
    router_name: str = "gate"
    intermediate_attr: str = "moe_intermediate_size"
    # The transformers auto class that builds the family's skeleton, and which engine decodes it.
    auto_class: ClassVar[type] = AutoModelForCausalLM
    kind: ClassVar[str] = "decoder"  # "decoder" (engine/runner.py) or "encoder-decoder" (engine/seq2seq_runner.py)

    def __init__(self, config) -> None:
        self.config = config
        self.num_experts: int = int(getattr(config, self.num_experts_attr))
        self.top_k: int = int(config.num_experts_per_tok)
        self.hidden_size: int = int(config.hidden_size)
        self.intermediate_size: int = int(getattr(config, self.intermediate_attr))
        self.layout = self.expert_layout()
        self.act_fn: Callable[[torch.Tensor], torch.Tensor] = ACT2FN[config.hidden_act]

    def expert_layout(self) -> ExpertLayout:
        """SwiGLU experts as transformers 5 holds them: gate_up (2I, H) = [gate; up], down (H, I)."""
        return ExpertLayout.of(
            ("gate_up", (2 * self.intermediate_size, self.hidden_size)),
            ("down", (self.hidden_size, self.intermediate_size)),
        )

    # ---- module paths -------------------------------------------------------------------------
    def moe_layers(self, model: nn.Module) -> list[int]:
        """Decoder layers whose MLP is a routed MoE block (dense first layers, mlp_only_layers excluded)."""
        layers = model.get_submodule("model.layers")
        return [i for i in range(len(layers)) if self._has_experts(model, i)]

    def stacks(self, model: nn.Module) -> list[StackLayers]:
        """The model's stacks, for reports; here MoE layers are numbered by their decoder block."""
        layers = tuple(self.moe_layers(model))
        return [StackLayers("decoder", len(model.get_submodule("model.layers")), layers, layers)]

    def _has_experts(self, model: nn.Module, layer: int) -> bool:
        try:
            block = model.get_submodule(self.block_path.format(layer=layer))
        except AttributeError:
            return False
        return isinstance(getattr(block, "experts", None), nn.Module)

    def experts_path(self, layer: int) -> str:
        return self.block_path.format(layer=layer) + ".experts"

    def router_path(self, layer: int) -> str:
        return self.block_path.format(layer=layer) + "." + self.router_name

    def router_logits(self, output: torch.Tensor | tuple) -> torch.Tensor:
        """The (T, E) logits from what the router module returned (transformers 5 routers return
        (logits, top-k weights, top-k ids))."""
        return output[0] if isinstance(output, tuple) else output

    # ---- checkpoint names ---------------------------------------------------------------------
    def module_key(self, checkpoint_key: str) -> str:
        """Map a checkpoint tensor name to the model's state-dict key (hub names may differ)."""
        return checkpoint_key

    def is_expert_tensor(self, checkpoint_key: str) -> bool:
        if ".experts." not in checkpoint_key:
            return False
        leaf = checkpoint_key.rsplit(".experts.", 1)[1]
        per_expert = leaf.split(".")
        if self.hub_expert_names and len(per_expert) == 3 and per_expert[0].isdigit():
            return per_expert[1] in self.hub_expert_names
        return leaf in self.fused_expert_names

    def expert_refs(self, layer: int, expert: int, available: Collection[str]) -> list[TensorRef]:
        """The checkpoint tensors that fill expert (layer, expert)'s flat buffer, in order.

        Looks for the hub per-expert layout first, then the fused 3-D layout, under every block path
        the family's checkpoints use."""
        for path in self._block_paths(layer):
            if self.hub_expert_names:
                hub = [f"{path}.experts.{expert}.{n}.weight" for n in self.hub_expert_names]
                if all(name in available for name in hub):
                    return [TensorRef(name) for name in hub]
            fused = [f"{path}.experts.{n}" for n in self.fused_expert_names]
            if all(name in available for name in fused):
                return [TensorRef(name, expert) for name in fused]
        raise ExpertflowError(
            f"checkpoint has no weights for expert {expert} of layer {layer} (looked for "
            f"{self._block_paths(layer)[0]}.experts.{self.fused_expert_names[0]} and per-expert tensors); "
            "the safetensors files are incomplete, quantized, or not from this architecture"
        )

    def _block_paths(self, layer: int) -> list[str]:
        paths = [p.format(layer=layer) for p in self.checkpoint_block_paths]
        own = self.block_path.format(layer=layer)
        return paths + ([own] if own not in paths else [])

    # ---- compute ----------------------------------------------------------------------------
    def routing_inputs(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the family's MoE block passes its `experts` -> (top_k_index (T, K), top_k_weights (T, K)).

        transformers 5 blocks already pass that; an index equal to E marks a slot no expert computes."""
        return top_k_index, top_k_weights

    def expert_forward(self, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """One expert on its tokens x (T, H) -> (T, H), exactly as transformers' eager experts loop."""
        gate, up = nn.functional.linear(x, weights["gate_up"]).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, weights["down"])
