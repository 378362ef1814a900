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
from expertflow.direct_io import open_direct
from expertflow.errors import ExpertflowError
from expertflow.loading import read_config
from expertflow.store import DiskStore, HostStore
from tests.reference import reference_generate
from tests.tiny_models import TINY_CONFIGS


def _adapter(model_dir: Path):
    return adapter_for(read_config(EngineConfig(model=model_dir)))


def _stores(model_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[HostStore, DiskStore]:
    adapter = _adapter(model_dir)
    checkpoint = Checkpoint(model_dir)
    layers = sorted({int(k.split(".")[2]) for k in checkpoint.keys() if adapter.is_expert_tensor(k)})
    return (HostStore(checkpoint, adapter, layers, dtype),
            DiskStore(checkpoint, adapter, layers, dtype, drop_page_cache=True))


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


def test_direct_reads_cast_a_bf16_checkpoint_and_keep_the_tokens(tmp_path, tiny_mixtral_dir):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _require_direct(tmp_path / "bf16")
    host, disk = _stores(tmp_path / "bf16")
    _assert_same_experts(host, disk)
    disk.close()
    prompts = [[5, 9, 13, 2], [7, 7, 30]]
    m = ExpertflowModel(EngineConfig(model=tmp_path / "bf16", cache_experts=6, store="disk", drop_page_cache=True))
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
                         drop_page_cache=True, direct_io=False)
    assert buffered.read_method == "pread + posix_fadvise(DONTNEED) after each read (page cache bypassed)"
    _assert_same_experts(host, buffered)
    buffered.close()
