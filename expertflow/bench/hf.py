"""The two baselines built from transformers itself: all weights in memory, and accelerate offloading.

`accelerate` is what a user would pick instead of expertflow: `infer_auto_device_map` under the same
fast-tier budget (non-expert weights + the cache's expert bytes) places whole modules in memory and
the rest in a disk `offload_folder`, which accelerate's hooks read back module by module on every
forward. On a CPU-only machine the fast tier is host RAM, so "cpu" plays the GPU's role and "disk" the
slow tier. accelerate reads its offload files through the OS page cache and has no way to bypass it, so
left alone it would read the whole model from RAM once it had seen it. Where the OS allows, the timed
generation therefore runs in a memory cgroup (`MemoryLimit`) that holds what the run touches after loading,
page cache included, to the budget's unplaced part plus the one offloaded module accelerate must hold while
it runs plus `WORKING_HEADROOM`: the memory its reported peak fast-tier bytes claim, enforced. Elsewhere
its figures are an upper bound on what it would do from a cold disk, and its notes say so.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig

from expertflow.adapters import adapter_for

from expertflow.bench.memory_limit import MiB, MemoryLimit, drop_cached
from expertflow.bench.spec import RunSpec
from expertflow.bench.systems import WARMUP_TOKENS, Measured

# Memory a bounded accelerate run may take beyond its weights: activations, the KV cache, allocator slack.
WORKING_HEADROOM = 128 * MiB


def _auto_class(model_dir: Path):
    """transformers' auto class for the checkpoint (causal LM, or seq2seq for encoder-decoder MoEs)."""
    return adapter_for(AutoConfig.from_pretrained(model_dir)).auto_class


def run_all_in_memory(spec: RunSpec) -> Measured:
    model = _auto_class(spec.model).from_pretrained(spec.model, dtype=getattr(torch, spec.dtype)).to(spec.device).eval()
    expert, resident = _split_bytes(model)
    sequences, seconds, prefill = _timed_generate(model, spec)
    return Measured(sequences=sequences, seconds=seconds, prefill_seconds=prefill, peak_expert_bytes=expert,
                    resident_bytes=resident,
                    all_expert_bytes=expert, hit_ratio=1.0)


def run_accelerate(spec: RunSpec) -> Measured:
    from accelerate import infer_auto_device_map, init_empty_weights

    with init_empty_weights():
        skeleton = _auto_class(spec.model).from_config(AutoConfig.from_pretrained(spec.model),
                                                        dtype=getattr(torch, spec.dtype))
    skeleton.tie_weights()
    expert_total, resident = _split_bytes(skeleton)
    expert_each = expert_total // _experts_total(skeleton)
    budget = resident + spec.cache_experts * expert_each
    # Split as finely as accelerate can hook: attention, norms, each layer's fused experts module on its own.
    experts_classes = sorted({type(m).__name__ for n, m in skeleton.named_modules() if n.endswith(".experts")})
    # On a CPU the fast tier is RAM and the slow one the disk; on CUDA, GPU memory and host RAM (as its users run it).
    fast, slow = ("cpu", "disk") if spec.device == "cpu" else (torch.device(spec.device).index or 0, "cpu")
    device_map = infer_auto_device_map(skeleton, max_memory={fast: budget, slow: 1 << 50},
                                       no_split_module_classes=experts_classes)
    in_memory, largest_offloaded = _placement(skeleton, device_map, slow)
    limit = bounded_limit(budget, sum(in_memory.values()), sum(largest_offloaded.values()))
    bound: dict = {}
    with tempfile.TemporaryDirectory(dir=spec.offload_dir) as offload:
        model = _auto_class(spec.model).from_pretrained(spec.model, dtype=getattr(torch, spec.dtype),
                                                        device_map=device_map, offload_folder=offload).eval()
        if slow == "disk" and not spec.page_cache:  # the disk tier honestly measured, as the engine's stores do
            # Loading filled the page cache with every weight; dropped, the timed run reads them again.
            drop_cached([f for f in [*Path(offload).rglob("*"), *Path(spec.model).glob("*.safetensors")]
                         if f.is_file()])
            with MemoryLimit(limit) as held:
                sequences, seconds, prefill = _timed_generate(model, spec)
            bound = {"memory_limit_bytes": limit if held.bounded else None, "bounded_peak_bytes": held.peak_bytes()}
            reads = f"page cache bounded: {held.method}" if held.bounded else \
                    f"page cache (not bypassed; {held.method})"
        else:
            sequences, seconds, prefill = _timed_generate(model, spec)
            reads = ("page cache (not bypassed; unbounded, as --page-cache asks)" if slow == "disk"
                     else "host RAM (offloaded modules copied to the GPU as they run)")
    return Measured(sequences=sequences, seconds=seconds, prefill_seconds=prefill,
                    # An offloaded module's weights are in memory while it runs: the largest one adds to the peak.
                    peak_expert_bytes=in_memory["expert"] + largest_offloaded["expert"],
                    resident_bytes=in_memory["resident"] + largest_offloaded["resident"],
                    all_expert_bytes=expert_total, hit_ratio=None,
                    notes={"budget_bytes": budget, "modules_in_memory": sum(d == fast for d in device_map.values()),
                           "modules_on_disk": sum(d == slow for d in device_map.values()),
                           "offload_reads": reads, **bound})


def bounded_limit(budget: int, placed: int, largest_offloaded: int) -> int:
    """What a bounded accelerate run may be charged after loading: the budget's part its device map left
    unplaced (page cache of offload files, in place of placed weights), the largest offloaded module
    (accelerate holds a module's weights while it runs, so it cannot run in less), and working memory."""
    return max(budget - placed, 0) + largest_offloaded + WORKING_HEADROOM


def _timed_generate(model, spec: RunSpec) -> tuple[list[list[int]], float, float]:
    """(sequences, seconds of the timed run, seconds of the same batches' prefill pass after it)."""
    generation = GenerationConfig.from_pretrained(spec.model) if (Path(spec.model) / "generation_config.json").is_file() \
        else GenerationConfig.from_model_config(model.config)
    eos = generation.eos_token_id if generation.eos_token_id is not None else model.config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    pad = generation.pad_token_id if generation.pad_token_id is not None else min(eos_ids)
    _generate(model, spec.prompts[:1], WARMUP_TOKENS, eos_ids, pad)
    batches = spec.batches()
    sequences: list[list[int]] = []
    start = time.perf_counter()
    for batch in batches:
        sequences += _generate(model, batch, spec.max_new_tokens, eos_ids, pad)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches:
        _generate(model, batch, 1, eos_ids, pad)
    return sequences, seconds, time.perf_counter() - start


@torch.inference_mode()
def _generate(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad: int) -> list[list[int]]:
    """Greedy generate for one padded batch -> generated ids per prompt, cut after the first EOS.

    Decoder-only prompts are left-padded and the output continues them; encoder-decoder prompts are
    right-padded (as expertflow's seq2seq engine does: expert capacity fills in position order) and the
    output is the decoder's, after its start token."""
    width = max(map(len, prompts))
    seq2seq = model.config.is_encoder_decoder
    pads = [[pad] * (width - len(p)) for p in prompts]
    ids = torch.tensor([p + z if seq2seq else z + p for p, z in zip(prompts, pads)], device=model.device)
    mask = torch.tensor([[1] * len(p) + [0] * len(z) if seq2seq else [0] * len(z) + [1] * len(p)
                         for p, z in zip(prompts, pads)], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, eos_token_id=sorted(eos_ids), pad_token_id=pad)
    start = 1 if seq2seq else width
    return [_cut_at_eos(row[start:].tolist(), eos_ids) for row in out]


def _cut_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


def _is_expert(name: str) -> bool:
    return ".experts." in f"{name}."


def _split_bytes(model) -> tuple[int, int]:
    """(expert bytes, every other weight's bytes); tied weights counted once."""
    sizes = {"expert": 0, "resident": 0}
    for name, p in model.named_parameters():
        sizes["expert" if _is_expert(name) else "resident"] += p.numel() * p.element_size()
    return sizes["expert"], sizes["resident"]


def _experts_total(model) -> int:
    config = model.config
    per_layer = next(getattr(config, a) for a in ("num_local_experts", "num_experts", "n_routed_experts")
                     if getattr(config, a, None))
    moe_layers = {name.split(".experts.")[0] for name, _ in model.named_parameters() if _is_expert(name)}
    return per_layer * len(moe_layers)


def _placement(model, device_map: dict[str, str | int], slow: str) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes placed in memory, and the bytes of the largest offloaded module, split expert/resident.

    accelerate hooks every module that owns parameters, loading just that module's weights while it
    runs, so the transient extra is the largest such module on disk (one layer's fused experts)."""
    in_memory = {"expert": 0, "resident": 0}
    on_disk: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        entry = max((m for m in device_map if m == "" or name == m or name.startswith(m + ".")), key=len)
        kind = "expert" if _is_expert(name) else "resident"
        size = p.numel() * p.element_size()
        if device_map[entry] == slow:
            on_disk.setdefault(name.rsplit(".", 1)[0], {"expert": 0, "resident": 0})[kind] += size
        else:
            in_memory[kind] += size
    largest = max(on_disk.values(), key=lambda s: s["expert"] + s["resident"], default={"expert": 0, "resident": 0})
    return in_memory, largest
