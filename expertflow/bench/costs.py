"""What one expert costs on this machine: reading it from the disk tier vs computing it for one token.

The bench reports this ratio next to its figures, because offloading only pays (and only needs
prediction) when a transfer costs far more than the compute it feeds. Reads go through `DiskStore`
bypassing the page cache (O_DIRECT where the file system allows), so they measure the device, not RAM.
Compute cycles through many distinct experts held in RAM so their weights are not sitting in the CPU's caches.

Shape legend: H hidden size.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from expertflow.adapters import adapter_for
from expertflow.checkpoint import Checkpoint
from expertflow.config import EngineConfig
from expertflow.loading import read_config
from expertflow.cache.stores import DiskStore


@dataclass(frozen=True)
class ExpertCosts:
    expert_bytes: int
    intermediate_size: int
    load_ms: float          # median read of one expert from disk, page cache bypassed
    compute_ms: float       # median SwiGLU forward of one expert for one token
    page_cache: str         # how the reads bypassed the page cache

    @property
    def ratio(self) -> float:
        return self.load_ms / self.compute_ms if self.compute_ms > 0 else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "load_to_compute": self.ratio}


def measure_expert_costs(model_dir: Path, samples: int = 32) -> ExpertCosts:
    """Median costs over `samples` distinct experts (spread over every MoE layer)."""
    config = EngineConfig(model=model_dir)
    adapter = adapter_for(read_config(config))
    checkpoint = Checkpoint(config.model)
    available = set(checkpoint.keys())
    layers = sorted({int(k.split(".")[2]) for k in available if adapter.is_expert_tensor(k)})
    store = DiskStore(checkpoint, adapter, layers, config.torch_dtype, page_cache=False)
    reads = store.read_method
    keys = store.keys[:: max(1, len(store.keys) // samples)][:samples]
    try:
        # Slots as the engine's cache lays them out (`place`: a zero-copy read where the file allows), touched
        # before the reads (zeros, not empty): a slot is filled many times, so a read's cost is the device's,
        # not the first-touch page faults of a fresh buffer (~2 ms per 6 MiB here).
        cpu = torch.device("cpu")
        buffers = [store.place(k, torch.zeros(store.slot_bytes(cpu), dtype=torch.uint8)) for k in keys]
        load = [_timed(lambda k=k, b=b: store.read_into(k, b)) for k, b in zip(keys, buffers)]
        x = torch.randn(1, adapter.hidden_size)  # (1, H): one token
        with torch.inference_mode():
            views = [adapter.layout.views(b) for b in buffers]
            adapter.expert_forward(x, views[0])  # warm-up: first-call kernel selection
            compute = [_timed(lambda v=v: adapter.expert_forward(x, v)) for v in views * 3]
    finally:
        store.close()
    return ExpertCosts(expert_bytes=store.expert_bytes, intermediate_size=adapter.intermediate_size,
                       load_ms=statistics.median(load), compute_ms=statistics.median(compute),
                       page_cache=reads)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3
