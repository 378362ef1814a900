"""Offloading never changes what the model computes: tokens and logits against plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import expertflow
from tests.devices import DEVICES
from tests.reference import reference_generate
from tests.tiny_models import TINY_CONFIGS, save_tiny_model

PROMPTS = [[5, 17, 33, 8, 41, 60, 12], [70, 3, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
NEW_TOKENS = 12


def _assert_matches_reference(model_dir: Path, **engine_kwargs) -> None:
    m = expertflow.from_pretrained(model_dir, **engine_kwargs)
    ours = m.generate(input_ids=PROMPTS, max_new_tokens=NEW_TOKENS)
    theirs, logits = reference_generate(model_dir, PROMPTS, NEW_TOKENS, m.engine.parts.pad_token_id)
    assert ours.sequences == theirs
    if all(len(s) == NEW_TOKENS for s in theirs):  # with an early eos the last logits are of another step
        torch.testing.assert_close(ours.last_logits, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("store", ["host", "disk"])
@pytest.mark.parametrize("size", ["min", "half", "all"])
def test_every_family_matches_transformers(tiny_model_dirs, family, store, size):
    model_dir = tiny_model_dirs[family]
    probe = expertflow.from_pretrained(model_dir, policy="none")
    layers, experts, top_k = probe.num_moe_layers, probe.num_experts, probe.top_k
    cache = {"min": layers * top_k, "half": layers * experts // 2, "all": layers * experts}[size]
    _assert_matches_reference(model_dir, cache_experts=cache, policy="lru", store=store)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm", None])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_all_resident_policy_matches_transformers_bit_for_bit(tiny_mixtral_dir, tmp_path, implementation, dtype):
    """Each of transformers' experts implementations combines a token's experts in its own order and precision;
    the offloaded experts follow the one the model uses (None: transformers' default), to the last bit."""
    model_dir = tiny_mixtral_dir
    if dtype == "bfloat16":
        AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
        model_dir = tmp_path / "bf16"
    m = expertflow.from_pretrained(model_dir, experts_implementation=implementation or "auto")  # all resident
    ours = m.generate(input_ids=PROMPTS, max_new_tokens=NEW_TOKENS)
    theirs, logits = reference_generate(model_dir, PROMPTS, NEW_TOKENS, 1, experts_implementation=implementation,
                                        dtype="auto")
    assert ours.sequences == theirs
    if all(len(s) == NEW_TOKENS for s in theirs):
        assert torch.equal(ours.last_logits, logits.to(ours.last_logits.dtype))
    assert ours.stats.hit_ratio == 1.0 and ours.stats.expert_loads == 0


def test_fused_checkpoint_layout(tmp_path, tiny_mixtral_dir):
    """Checkpoints holding 3-D fused experts (`experts.gate_up_proj`) load to the same outputs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        (fused / name).write_text((tiny_mixtral_dir / name).read_text())
    a = expertflow.from_pretrained(fused, cache_experts=6, store="disk").generate(input_ids=PROMPTS, max_new_tokens=8)
    b = expertflow.from_pretrained(tiny_mixtral_dir, cache_experts=6).generate(input_ids=PROMPTS, max_new_tokens=8)
    assert a.sequences == b.sequences
    assert torch.equal(a.last_logits, b.last_logits)


def test_sharded_checkpoint(tmp_path):
    out = save_tiny_model("qwen2_moe", tmp_path / "one")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    _assert_matches_reference(tmp_path / "sharded", cache_experts=8, store="disk")


EMBEDDED_PROMPTS = ["Describe a process of making crepes.", "Give three tips for staying healthy.",
                    "The capital of France is"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache,store", [(16, "disk"), (64, "host"), (256, "disk")])
def test_embedded_model_matches_transformers(embedded_model_dir, cache, store, device):
    m = expertflow.from_pretrained(cache_experts=cache, store=store, device=device)
    prompts = [m.encode(p) for p in EMBEDDED_PROMPTS]
    ours = m.generate(input_ids=prompts, max_new_tokens=16)
    theirs, logits = reference_generate(embedded_model_dir, prompts, 16, m.engine.parts.pad_token_id,
                                        device=device)
    assert ours.sequences == theirs
    if all(len(s) == 16 for s in theirs):
        torch.testing.assert_close(ours.last_logits.cpu(), logits, atol=1e-5, rtol=0)
    assert ours.stats.peak_expert_bytes <= cache * m.cache.slot_bytes  # a zero-copy disk slot has a page spare


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
@pytest.mark.parametrize("cache,store", [(None, None), (6, "disk"), (12, "host")])
def test_bf16_checkpoint_at_the_default_dtype_matches_transformers_default(tmp_path, family, cache, store, device):
    """Real checkpoints are bf16: by default both transformers and expertflow keep the checkpoint's dtype, and
    the tokens and logits are identical, every expert resident or cached, from either store."""
    fp32 = save_tiny_model(family, tmp_path / "fp32")
    AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    m = expertflow.from_pretrained(tmp_path / "bf16", cache_experts=cache, store=store, device=device)
    assert m.config.dtype == "bfloat16" and m.config.store == (store or ("disk" if device == "cpu" else "host"))
    assert m.cache.store.expert_bytes == m.cache.store.numel * 2  # held as stored, not upcast
    ours = m.generate(input_ids=PROMPTS, max_new_tokens=8)
    m.close()
    theirs, logits = reference_generate(tmp_path / "bf16", PROMPTS, 8, 1, dtype="auto", device=device)
    assert ours.sequences == theirs
    if all(len(s) == 8 for s in theirs):
        assert torch.equal(ours.last_logits.cpu(), logits.to(ours.last_logits.dtype))


def test_bf16_checkpoint_runs_in_fp32_from_either_store(tmp_path, tiny_mixtral_dir):
    """A bf16 checkpoint upcast on load (an explicit dtype converts): disk reads (staged cast) equal host reads and
    transformers in fp32."""
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    host = expertflow.from_pretrained(tmp_path / "bf16", cache_experts=6, store="host", dtype="float32")
    disk = expertflow.from_pretrained(tmp_path / "bf16", cache_experts=6, store="disk", dtype="float32")
    a = host.generate(input_ids=PROMPTS, max_new_tokens=8)
    b = disk.generate(input_ids=PROMPTS, max_new_tokens=8)
    assert a.sequences == b.sequences and torch.equal(a.last_logits, b.last_logits)
    theirs, _ = reference_generate(tmp_path / "bf16", PROMPTS, 8, 1)
    assert a.sequences == theirs
