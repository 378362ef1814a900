"""The disk tier's page-cache bypass: O_DIRECT reads return exactly the checkpoint's bytes, for every model
family's tensor layout, from concurrent readers, and a truncated file is a one-line error."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from expertflow.adapters import adapter_for
from expertflow.api import ExpertflowModel
from expertflow.checkpoint import Checkpoint
from expertflow.config import EngineConfig
from expertflow.cache.direct_io import ALIGN, SLOT_SLACK, open_direct
from expertflow.errors import ExpertflowError
from expertflow.loading import read_config
from expertflow.cache.stores import DiskStore, HostStore
from expertflow.widen import widen_checkpoint
from tests.reference import reference_generate
from tests.tiny_models import TINY_CONFIGS


def _adapter(model_dir: Path):
    return adapter_for(read_config(EngineConfig(model=model_dir)))


def _stores(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[HostStore, DiskStore]:
    adapter = _adapter(model_dir)
    checkpoint = Checkpoint(model_dir)
    layers = sorted({int(k.split(".")[2]) for k in checkpoint.keys() if adapter.is_expert_tensor(k)})
    return (HostStore(checkpoint, adapter, layers, dtype),
            DiskStore(checkpoint, adapter, layers, dtype, page_cache=False))


def _assert_same_experts(host: HostStore, store: DiskStore, read: dict | None = None) -> None:
    """Every expert `store` reads (or `read` already holds) equals the host store's copy, bit for bit."""
    for key in host.keys:
        want, got = torch.empty(host.numel), read[key] if read is not None else torch.empty(store.numel)
        host.read_into(key, want)
        if read is None:
            store.read_into(key, got)
        assert torch.equal(got, want), key


def _require_direct(model_dir: Path) -> None:
    fd = open_direct(next(model_dir.glob("*.safetensors")))
    if fd is None:
        pytest.skip("this file system refuses O_DIRECT")
    os.close(fd)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_direct_reads_equal_the_host_store_from_concurrent_readers(family, tiny_model_dirs):
    _require_direct(tiny_model_dirs[family])
    host, disk = _stores(tiny_model_dirs[family])
    assert disk.read_method == "O_DIRECT (page cache bypassed)"
    keys = host.keys
    got = {key: torch.full((disk.numel,), float("nan")) for key in keys}

    def reader(i: int) -> None:
        for key in keys[i::4]:
            disk.read_into(key, got[key])

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _assert_same_experts(host, disk, got)
    disk.close()


def test_an_experts_back_to_back_tensors_are_one_read(tiny_mixtral_dir):
    _, disk = _stores(tiny_mixtral_dir)
    # save_pretrained writes experts.{e}.w1/w2/w3 next to each other: one span of exactly their bytes.
    for key, extents in disk.extents.items():
        (span,) = disk._spans[key]
        assert span.end - span.begin == sum(e.nbytes for e in extents)
    disk.close()


@pytest.fixture(scope="module")
def page_sized_dirs(tmp_path_factory, tiny_model_dirs) -> dict[str, Path]:
    """The tiny models widened until every expert tensor is whole pages, as in real checkpoints (the tiny
    ones' tensors are a few hundred bytes: no block of theirs could be read straight into a slot). Families
    `widen` cannot pad (gpt-oss's expert layout) are left out."""
    root = tmp_path_factory.mktemp("page-sized")
    widened = {}
    for family, path in tiny_model_dirs.items():
        try:
            widened[family] = widen_checkpoint(path, root / family, intermediate_size=256)
        except ExpertflowError:
            pass
    return widened


def _placed_reads(disk: DiskStore, host: HostStore) -> int:
    """Reads every expert into slots `place` lined up (at every 64-byte offset within a page, as a CPU
    allocator may hand them out), checks them against the host store's copy, and returns the bytes the
    reading thread's bounce buffer grew to."""
    cpu = torch.device("cpu")
    slots = [torch.empty(disk.slot_bytes(cpu) + i * 64, dtype=torch.uint8)[i * 64 :] for i in range(ALIGN // 64)]
    grew: list[int] = []

    def reader() -> None:
        for i, key in enumerate(disk.keys):
            flat = disk.place(key, slots[i % len(slots)])
            assert flat.numel() == disk.numel and flat.dtype == disk.dtype
            disk.read_into(key, flat)
            want = torch.empty(host.numel)
            host.read_into(key, want)
            assert torch.equal(flat, want), key
        buffer = getattr(disk._bounce._local, "buffer", None)
        grew.append(0 if buffer is None else len(buffer))

    thread = threading.Thread(target=reader)  # a fresh thread: its own, so far empty, bounce buffer
    thread.start()
    thread.join()
    assert len(grew) == 1, "the reader failed"
    return grew[0]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_a_placed_slot_is_read_straight_from_the_device(family, tiny_model_dirs, page_sized_dirs):
    """Whole-page tensors: `place` lines the slot up with the file, and only the blocks where tensors meet pass
    through the bounce buffer. Tiny tensors: no spare room is asked for, and the reads still land right."""
    _require_direct(tiny_model_dirs[family])
    cpu = torch.device("cpu")
    host, disk = _stores(tiny_model_dirs[family])
    assert disk.slot_bytes(cpu) == disk.expert_bytes and not disk._page_offset
    assert _placed_reads(disk, host) >= disk.expert_bytes  # the whole expert went through the bounce buffer
    disk.close()
    if family not in page_sized_dirs:
        return
    host, disk = _stores(page_sized_dirs[family])
    assert host.slot_bytes(cpu) == host.expert_bytes
    assert disk.slot_bytes(torch.device("cuda")) == disk.expert_bytes  # a device copy stages through the bounce
    placeable = len(disk._page_offset)
    assert disk.slot_bytes(cpu) == disk.expert_bytes + (SLOT_SLACK if placeable else 0)
    grew = _placed_reads(disk, host)
    if placeable == len(disk.keys):
        edges = max(len(spans) + sum(len(s.pieces) for s in spans) for spans in disk._spans.values())
        assert grew <= edges * ALIGN < disk.expert_bytes
    if family == "mixtral":  # hub per-expert tensors of whole pages, placed off page boundaries
        assert placeable == len(disk.keys) and set(disk._page_offset.values()) != {0}
    disk.close()


def test_a_slot_without_room_is_filled_through_the_bounce_buffer(page_sized_dirs):
    model = page_sized_dirs["mixtral"]
    _require_direct(model)
    host, disk = _stores(model)
    key = disk.keys[3]
    room = torch.empty(disk.expert_bytes + ALIGN, dtype=torch.uint8)
    wrong = (disk._page_offset[key] - room.data_ptr() + 64) % ALIGN  # 64 bytes past where `place` would put it
    tight = room[wrong : wrong + disk.expert_bytes]
    flat = disk.place(key, tight)
    assert flat.data_ptr() == tight.data_ptr()  # too little room to line up: the plain place
    disk.read_into(key, flat)
    want = torch.empty(host.numel)
    host.read_into(key, want)
    assert torch.equal(flat, want)
    disk.close()


def test_zero_copy_slots_count_against_the_budget_and_keep_the_tokens(page_sized_dirs):
    """Each direct-read slot holds a page of spare room; the memory budget pays for it, and the tokens are
    transformers' own."""
    model = page_sized_dirs["mixtral"]
    _require_direct(model)
    probe = ExpertflowModel(EngineConfig(model=model, policy="none"))
    resident = sum(p.numel() * p.element_size() for p in probe.engine.parts.model.parameters())
    expert = probe.engine.parts.store.expert_bytes
    probe.close()
    budget = resident + 20 * expert + 19 * SLOT_SLACK  # 20 plain slots, but only 19 with their spare room
    prompts = [[5, 17, 33, 8, 41, 60, 12], [70, 3, 9]]
    theirs = reference_generate(model, prompts, 10, 1)[0]
    for policy in ("lru", "ring"):  # demand reads on the layer's thread, and a prefetching transfer worker
        m = ExpertflowModel(EngineConfig(model=model, memory_budget=budget, policy=policy, store="disk",
                                         page_cache=False))
        assert m.cache.slot_bytes == expert + SLOT_SLACK and m.cache.residency.capacity == 19
        out = m.generate(input_ids=prompts, max_new_tokens=10)
        m.close()
        assert out.sequences == theirs, policy
        assert out.stats.peak_expert_bytes == 19 * (expert + SLOT_SLACK)
        assert out.stats.peak_fast_tier_bytes <= budget


def test_a_bench_memory_budget_buys_the_engines_slots_not_plain_ones(page_sized_dirs, tmp_path):
    """The bench hands a whole-tier budget to the engine, which pays for each slot's spare room: the row
    reports the slots the engine ran (19), not the 20 plain experts the budget would buy, and stays within it."""
    from expertflow.bench.harness import model_shape, run_bench
    from expertflow.bench.spec import BenchConfig, CacheSize

    model = page_sized_dirs["mixtral"]
    _require_direct(model)
    shape = model_shape(model)
    budget = shape.resident_bytes + 20 * shape.expert_bytes + 19 * SLOT_SLACK
    config = BenchConfig(model=model, systems=["all-in-memory", "lru"], batch_sizes=[2], out=tmp_path / "out",
                         cache_sizes=[CacheSize.parse(f"{budget}B", whole_tier=True)], max_new_tokens=4)
    doc = run_bench(config, [[5, 17, 33, 8, 41, 60, 12], [70, 3, 9]])
    memory, lru = doc["results"]
    assert doc["setup"]["cache_sizes"][0]["cache_experts"] == 20  # what the plain expert size would buy
    assert lru["cache_experts"] == 19 and lru["same_tokens"]
    assert lru["peak_fast_tier_bytes"] == shape.resident_bytes + 19 * (shape.expert_bytes + SLOT_SLACK) <= budget


def test_a_truncated_file_read_in_place_is_a_one_line_error(tmp_path, page_sized_dirs):
    copy = tmp_path / "model"
    copy.mkdir()
    for f in page_sized_dirs["mixtral"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    _require_direct(copy)
    _, disk = _stores(copy)
    last = max(disk.keys, key=lambda k: max(e.offset for e in disk.extents[k]))
    cut = max(disk.extents[last], key=lambda e: e.offset)
    os.truncate(cut.path, cut.offset + cut.nbytes // 2)
    flat = disk.place(last, torch.empty(disk.slot_bytes(torch.device("cpu")), dtype=torch.uint8))
    with pytest.raises(ExpertflowError, match="the file is truncated") as caught:
        disk.read_into(last, flat)
    assert "\n" not in str(caught.value)
    disk.close()


def test_direct_reads_cast_a_bf16_checkpoint_and_keep_the_tokens(tmp_path, tiny_mixtral_dir):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _require_direct(tmp_path / "bf16")
    host, disk = _stores(tmp_path / "bf16")
    _assert_same_experts(host, disk)
    disk.close()
    prompts = [[5, 9, 13, 2], [7, 7, 30]]
    m = ExpertflowModel(EngineConfig(model=tmp_path / "bf16", cache_experts=6, store="disk", page_cache=False))
    assert m.engine.parts.store.read_method == "O_DIRECT (page cache bypassed)"
    ours = m.generate(input_ids=prompts, max_new_tokens=6).sequences
    m.close()
    assert ours == reference_generate(tmp_path / "bf16", prompts, 6, 1)[0]


def test_a_truncated_expert_file_is_a_one_line_error(tmp_path, tiny_mixtral_dir):
    copy = tmp_path / "model"
    copy.mkdir()
    for f in tiny_mixtral_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    _require_direct(copy)
    _, disk = _stores(copy)
    last = max(disk.keys, key=lambda k: max(e.offset for e in disk.extents[k]))
    cut = max(disk.extents[last], key=lambda e: e.offset)
    os.truncate(cut.path, cut.offset + cut.nbytes // 2)  # the file now ends inside this expert's last tensor
    with pytest.raises(ExpertflowError, match="the file is truncated") as caught:
        disk.read_into(last, torch.empty(disk.numel))
    assert "\n" not in str(caught.value)
    disk.close()


def test_buffered_reads_dropped_from_the_page_cache_remain_a_choice(tiny_mixtral_dir):
    host, _ = _stores(tiny_mixtral_dir)
    checkpoint = Checkpoint(tiny_mixtral_dir)
    buffered = DiskStore(checkpoint, _adapter(tiny_mixtral_dir), sorted({k[0] for k in host.keys}), torch.float32,
                         page_cache=False, direct_io=False)
    assert buffered.read_method == "pread + posix_fadvise(DONTNEED) after each read (page cache bypassed)"
    _assert_same_experts(host, buffered)
    buffered.close()
