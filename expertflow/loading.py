"""Build a transformers MoE model with its experts offloaded, without ever materialising the experts.

The model skeleton is built with parameters on the meta device; each MoE block's `experts` child is
replaced by an `OffloadedExperts` module; only non-expert tensors are read from the checkpoint into the
model. Experts stay in the store (host memory or the safetensors files) until the cache fetches them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from expertflow.adapters import MoEAdapter, adapter_for
from expertflow.cache.expert_cache import ExpertCache
from expertflow.checkpoint import Checkpoint
from expertflow.config import EngineConfig
from expertflow.errors import ExpertflowError
from expertflow.cache.offloaded_experts import OffloadedExperts, RoutingObserver
from expertflow.hub import model_name
from expertflow.cache.policies import CachePolicy, build_policy, policy_class, policy_settings
from expertflow.cache.residency import Residency
from expertflow.cache.stores import STORES, ExpertStore


@dataclass
class OffloadedModel:
    """The parts `load` builds; the engine is assembled from them."""

    model: nn.Module
    adapter: MoEAdapter
    layers: list[int]
    store: ExpertStore
    cache: ExpertCache
    policy: CachePolicy
    tokenizer: object | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    name: str
    resident_bytes: int = 0  # fast-tier bytes of every non-expert weight (what a memory budget holds first)
    budget_note: str | None = None  # why the budget bought fewer slots than it names (it holds every expert)


def read_config(config: EngineConfig):
    if not (config.model / "config.json").is_file():
        raise ExpertflowError(f"no config.json in {config.model}; point --model at a transformers checkpoint directory")
    try:
        return AutoConfig.from_pretrained(config.model)
    except (ValueError, KeyError, json.JSONDecodeError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExpertflowError(f"cannot read {config.model / 'config.json'}: {first}") from exc


def load(config: EngineConfig, observer: RoutingObserver | None = None) -> OffloadedModel:
    hf_config = read_config(config)
    adapter = adapter_for(hf_config)
    checkpoint = Checkpoint(config.model)
    with init_empty_weights(include_buffers=False):
        chosen_experts = {} if config.experts_implementation == "auto" else \
            {"experts_implementation": config.experts_implementation}
        model = adapter.auto_class.from_config(hf_config, dtype=config.torch_dtype, **chosen_experts)
    # The offloaded experts combine their outputs as the implementation transformers picked for this model does
    # (its default, grouped_mm, where the model has a choice), so the bits equal transformers' own.
    implementation = getattr(model.config, "_experts_implementation_internal", None) or "eager"
    layers = adapter.moe_layers(model)
    if not layers:
        raise ExpertflowError(f"{config.model} has no routed MoE layers; expertflow runs Mixture-of-Experts models only")

    # The budget and the policy are checked before any expert is read, so a bad budget fails fast.
    expert_bytes = adapter.layout.nbytes(config.torch_dtype)
    chosen = policy_class(config.policy)
    if chosen.needs_future:
        raise ExpertflowError(f"policy {config.policy!r} needs the future access sequence; compare it with "
                              "expertflow simulate --policies ...,belady")
    policy_settings(config.policy, config.policy_settings)  # a bad knob fails here too
    minimum = chosen.min_capacity(layers, adapter.num_experts, adapter.top_k)
    resident = resident_bytes(model, adapter, checkpoint, config)
    total_experts = len(layers) * adapter.num_experts
    store_name = config.store
    if config.capacity(total_experts, expert_bytes, resident, minimum) >= total_experts and \
            config.torch_device.type == "cpu":
        # Every expert stays in its slot, and on a CPU the slots are host RAM: a host store would hold each expert
        # twice. Each is read from the files once instead.
        store_name = "disk"
    options = {"pin_memory": True} if store_name == "host" and config.torch_device.type == "cuda" else {}
    if store_name == "disk":
        options = {"page_cache": config.page_cache}
    store = STORES[store_name](checkpoint, adapter, layers, config.torch_dtype, **options)
    try:
        # A byte budget pays for the slots as the store lays them out (a zero-copy disk slot has spare room).
        capacity = config.capacity(total_experts, store.slot_bytes(config.torch_device), resident, minimum)
        policy = build_policy(config.policy, capacity, layers, adapter.num_experts, adapter.top_k,
                              config.policy_settings)
    except ExpertflowError:
        store.close()
        raise
    cache = ExpertCache(Residency(capacity, policy), store, config.torch_device,
                        transfer_ratio=config.transfer_ratio, background=policy.prefetches,
                        io_threads=config.io_threads)
    for layer in layers:
        model.set_submodule(adapter.experts_path(layer), OffloadedExperts(layer, adapter, cache, observer,
                                                                                implementation))

    _load_resident_weights(model, adapter, checkpoint, config)
    model.to(config.torch_device).eval()
    eos, pad = _special_tokens(config, hf_config)
    return OffloadedModel(model=model, adapter=adapter, layers=layers, store=store, cache=cache, policy=policy,
                          tokenizer=_tokenizer(config), eos_token_ids=eos, pad_token_id=pad,
                          name=model_name(config.model), resident_bytes=resident,
                          budget_note=config.capped_note(total_experts, store.slot_bytes(config.torch_device),
                                                         resident))


def resident_bytes(model: nn.Module, adapter: MoEAdapter, checkpoint: Checkpoint, config: EngineConfig) -> int:
    """Fast-tier bytes of every non-expert weight the model will load, at the engine's dtype: what a
    `memory_budget` holds before any expert slot. Counted off the checkpoint (tied weights are stored once),
    the tensors `_load_resident_weights` reads, so nothing is loaded."""
    size = torch.empty((), dtype=config.torch_dtype).element_size()
    total = 0
    for key, _ in _resident_keys(model, adapter, checkpoint):
        extent = checkpoint.extent_of(key)
        total += math.prod(extent.shape) * (size if extent.dtype.is_floating_point else extent.dtype.itemsize)
    return total


def _resident_keys(model: nn.Module, adapter: MoEAdapter, checkpoint: Checkpoint) -> list[tuple[str, str]]:
    """(checkpoint key, module key) of every non-expert tensor the skeleton has a parameter or buffer for."""
    wanted = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    keys = [(key, adapter.module_key(key)) for key in checkpoint.keys() if not adapter.is_expert_tensor(key)]
    return [(key, module_key) for key, module_key in keys if module_key in wanted]


def _load_resident_weights(model: nn.Module, adapter: MoEAdapter, checkpoint: Checkpoint, config: EngineConfig) -> None:
    """Read every non-expert tensor into the skeleton; fail naming any weight the checkpoint lacks."""
    state = {}
    for key, module_key in _resident_keys(model, adapter, checkpoint):
        tensor = checkpoint.read(key)
        state[module_key] = tensor.to(config.torch_dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ExpertflowError(
            f"checkpoint in {config.model} lacks {len(missing)} weights (first: {missing[0]}); it is incomplete or "
            "from another architecture"
        )


def _special_tokens(config: EngineConfig, hf_config) -> tuple[tuple[int, ...], int]:
    generation = GenerationConfig.from_model_config(hf_config)
    if (config.model / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(config.model)
    eos = generation.eos_token_id if generation.eos_token_id is not None else hf_config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    pad = generation.pad_token_id if generation.pad_token_id is not None else getattr(hf_config, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)


def _tokenizer(config: EngineConfig):
    has_tokenizer = any((config.model / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    return AutoTokenizer.from_pretrained(config.model) if has_tokenizer else None
