"""What expertflow finds in a checkpoint directory, checked without reading any weights.

`expertflow inspect` prints this report; every problem that would stop a run later (unsupported
architecture, missing or quantized expert tensors, incomplete shards) is raised here as a one-line error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import init_empty_weights

from expertflow.adapters import adapter_for
from expertflow.checkpoint import INDEX_FILE, Checkpoint
from expertflow.config import EngineConfig
from expertflow.loading import read_config
from expertflow.cache.policies import POLICY_NAMES, policy_class


@dataclass(frozen=True)
class ModelReport:
    architecture: str
    model_type: str
    layers: int
    moe_layers: list[int]
    dense_layers: list[int]  # blocks without routed experts, numbered over the stacks in order
    experts_per_layer: int
    top_k: int
    expert_bytes: int
    all_expert_bytes: int
    resident_bytes: int
    checkpoint_layout: str  # "per-expert" (hub) or "fused" (3-D expert tensors)
    checkpoint_dtype: str
    sharded: bool
    shards: int
    min_cache_experts: dict[str, int]
    stacks: list[dict]  # per stack: name, blocks, moe_blocks, moe_layers (encoder-decoder models have two)

    def as_dict(self) -> dict:
        return asdict(self)


def inspect_model(model_dir: Path) -> ModelReport:
    config = EngineConfig(model=model_dir)
    hf_config = read_config(config)
    adapter = adapter_for(hf_config)
    checkpoint = Checkpoint(config.model)
    with init_empty_weights(include_buffers=False):
        skeleton = adapter.auto_class.from_config(hf_config)
    stacks = adapter.stacks(skeleton)
    moe_layers = [layer for stack in stacks for layer in stack.moe_layers]
    layer_count = sum(stack.blocks for stack in stacks)
    dense_layers, first = [], 0
    for stack in stacks:
        dense_layers += [first + b for b in range(stack.blocks) if b not in stack.moe_blocks]
        first += stack.blocks
    available = set(checkpoint.keys())
    refs = {(layer, e): adapter.expert_refs(layer, e, available)
            for layer in moe_layers for e in range(adapter.num_experts)}
    first = next(iter(refs.values()))
    extents = [checkpoint.extent(r) for r in first]
    expert_bytes = sum(e.nbytes for e in extents)
    resident_bytes = sum(checkpoint.extent_of(name).nbytes for name in available if not adapter.is_expert_tensor(name))
    shards = len({checkpoint.file_of(name) for name in available})
    return ModelReport(
        architecture=type(skeleton).__name__, model_type=hf_config.model_type, layers=layer_count,
        moe_layers=moe_layers, dense_layers=dense_layers,
        experts_per_layer=adapter.num_experts, top_k=adapter.top_k, expert_bytes=expert_bytes,
        all_expert_bytes=expert_bytes * len(refs), resident_bytes=resident_bytes,
        checkpoint_layout="per-expert" if first[0].index is None else "fused",
        checkpoint_dtype=str(extents[0].dtype).removeprefix("torch."),
        sharded=(config.model / INDEX_FILE).is_file(), shards=shards,
        # every name a policy answers to, aliases (`none`, `expertflow`) included: the report has always had them
        min_cache_experts={name: policy_class(name).min_capacity(moe_layers, adapter.num_experts, adapter.top_k)
                           for name in POLICY_NAMES},
        stacks=[asdict(stack) for stack in stacks],
    )
