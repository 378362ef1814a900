"""--memory-budget: one byte budget for the whole fast tier (non-expert weights first, then expert slots)."""

from __future__ import annotations

import math

import pytest

import expertflow
from expertflow.bench.harness import ModelShape, _size_note, cache_slots, model_shape, plan_runs
from expertflow.bench.spec import BenchConfig, CacheSize
from expertflow.config import EngineConfig
from expertflow.errors import ExpertflowError
from tests.reference import reference_generate
from tests.test_cli import _assert_one_line_error, _run

PROMPTS = [[5, 17, 33, 8, 41, 60, 12], [70, 3, 9]]


def _sizes(model_dir) -> tuple[int, int, int, int]:
    """-> (resident bytes as loaded, bytes of one expert, experts in all, the lru minimum) of a model."""
    probe = expertflow.from_pretrained(model_dir, policy="none")
    resident = sum(p.numel() * p.element_size() for p in probe.engine.parts.model.parameters())
    store = probe.engine.parts.store
    total = probe.num_moe_layers * probe.num_experts
    return resident, store.expert_bytes, total, probe.num_moe_layers * probe.top_k


def test_budget_buys_what_is_left_after_the_resident_weights(tiny_mixtral_dir):
    resident, expert, total, minimum = _sizes(tiny_mixtral_dir)
    slots = minimum + 3
    budget = resident + slots * expert + expert - 1
    m = expertflow.from_pretrained(tiny_mixtral_dir, memory_budget=budget, store="disk")
    assert m.engine.parts.cache.residency.capacity == slots
    out = m.generate(input_ids=PROMPTS, max_new_tokens=10)
    theirs, _ = reference_generate(tiny_mixtral_dir, PROMPTS, 10, m.engine.parts.pad_token_id)
    assert out.sequences == theirs
    assert out.stats.resident_bytes == resident  # counted off the checkpoint = the loaded parameters
    assert out.stats.peak_fast_tier_bytes == resident + out.stats.peak_expert_bytes <= budget


def test_budget_above_the_model_keeps_every_expert(tiny_mixtral_dir):
    resident, expert, total, _ = _sizes(tiny_mixtral_dir)
    m = expertflow.from_pretrained(tiny_mixtral_dir, memory_budget="1GiB")
    assert m.engine.parts.cache.residency.capacity == total


def test_budget_too_small_names_the_size_that_fits(tiny_mixtral_dir):
    resident, expert, _, minimum = _sizes(tiny_mixtral_dir)
    with pytest.raises(ExpertflowError) as info:
        expertflow.from_pretrained(tiny_mixtral_dir, memory_budget=resident + expert)
    needed = math.ceil((resident + minimum * expert) / 2**20)
    assert f"leaves room for 1 experts after {resident / 2**20:.2f} MiB of non-expert weights" in str(info.value)
    assert f"policy 'lru' needs {minimum}" in str(info.value)
    assert f"use --memory-budget {needed}MiB or more" in str(info.value)
    expertflow.from_pretrained(tiny_mixtral_dir, memory_budget=needed * 2**20)  # the suggestion loads


def test_one_budget_only(tiny_mixtral_dir):
    with pytest.raises(ExpertflowError, match="give one fast-tier budget, not both --cache-bytes and --memory-budget"):
        EngineConfig(model=tiny_mixtral_dir, cache_bytes=2**20, memory_budget=2**22)
    with pytest.raises(ExpertflowError, match="--memory-budget must be positive"):
        EngineConfig(model=tiny_mixtral_dir, memory_budget=0)


def test_cli_too_small_is_one_line(capsys, tiny_mixtral_dir):
    rc, _, err = _run(capsys, "generate", "--model", str(tiny_mixtral_dir), "--memory-budget", "1KiB",
                      "--prompt", "hi", "--max-new-tokens", "2")
    _assert_one_line_error(rc, err, "--memory-budget 0.00 MiB leaves room for 0 experts")


# The bench's --memory-budget: whole-tier shares of the all-in-memory footprint, as slots.
SHAPE = ModelShape(moe_layers=4, experts=8, top_k=2, expert_bytes=1000, resident_bytes=500)  # 32 experts, 32,500 B


@pytest.mark.parametrize("text, slots", [("10%", 2), ("50%", 15), ("100%", 32), ("20000B", 19),
                                         ("1MiB", 32)])
def test_bench_memory_budget_slots(text, slots):
    # 10% of 32,500 B is 3,250 B: 2,750 B after the resident 500 buys 2 slots, below the 8 one token needs.
    if slots < SHAPE.min_cache:
        with pytest.raises(ExpertflowError, match=r"--memory-budget 10% leaves room for 2 experts after 0.00 MiB .* "
                                                  r"needs at least 8"):
            cache_slots(CacheSize.parse(text, whole_tier=True), SHAPE)
        return
    assert cache_slots(CacheSize.parse(text, whole_tier=True), SHAPE) == slots


def test_bench_memory_budget_reaches_the_runs_and_the_setup(tiny_mixtral_dir, tmp_path):
    shape = model_shape(tiny_mixtral_dir)
    whole = shape.resident_bytes + shape.total_experts * shape.expert_bytes
    config = BenchConfig(model=tiny_mixtral_dir, systems=["all-in-memory", "lru"], batch_sizes=[1], out=tmp_path,
                         cache_sizes=[CacheSize.parse("60%", whole_tier=True)])
    runs = plan_runs(config, shape, [[5, 6, 7]], str(tmp_path))
    expected = (int(whole * 0.6) - shape.resident_bytes) // shape.expert_bytes
    assert [r.cache_experts for r in runs] == [None, expected]
    assert [r.memory_budget for r in runs] == [None, int(whole * 0.6)]  # the engine sizes its own slots
    note = _size_note(config.cache_sizes[0], shape)
    assert note == {"asked": "60%", "kind": "memory budget", "cache_experts": expected,
                    "memory_budget_bytes": int(whole * 0.6)}
    assert shape.resident_bytes + expected * shape.expert_bytes <= note["memory_budget_bytes"]


@pytest.mark.parametrize("text, needle", [("ten%", "cannot read --memory-budget 'ten%'"),
                                          ("0%", "must be a positive count or a share"),
                                          ("lots", "cannot read size 'lots'")])
def test_bench_memory_budget_bad_text(text, needle):
    with pytest.raises(ExpertflowError, match=needle):
        CacheSize.parse(text, whole_tier=True)
