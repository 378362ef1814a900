"""The slow tier: where every expert lives when it is not in the fast-tier cache.

`host` keeps each expert as one flat buffer in host memory (pinned when the fast tier is CUDA, so a
transfer is one asynchronous copy); `disk` reads the expert's tensors from the safetensors files each
time it is fetched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from tqdm import tqdm

from expertflow.adapters import MoEAdapter, TensorRef
from expertflow.checkpoint import Checkpoint

Key = tuple[int, int]  # (layer, expert)


class ExpertStore(ABC):
    """Reads one expert, as one flat buffer, into a destination tensor of `numel` values."""

    name: str

    def __init__(self, checkpoint: Checkpoint, adapter: MoEAdapter, layers: list[int], dtype: torch.dtype) -> None:
        available = set(checkpoint.keys())
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.numel = adapter.layout.numel
        self.expert_bytes = self.numel * torch.empty((), dtype=dtype).element_size()
        # Resolve every expert's tensor names once, so a missing expert fails at load time, not mid-generation.
        self.refs: dict[Key, list[TensorRef]] = {
            (layer, e): adapter.expert_refs(layer, e, available)
            for layer in layers
            for e in range(adapter.num_experts)
        }

    @property
    def keys(self) -> list[Key]:
        return list(self.refs)

    @abstractmethod
    def read_into(self, key: Key, out: torch.Tensor) -> None:
        """Copy expert `key` into `out` (flat, `numel` values, any device)."""

    def close(self) -> None:
        """Release what the store holds."""


class HostStore(ExpertStore):
    name = "host"

    def __init__(self, checkpoint: Checkpoint, adapter: MoEAdapter, layers: list[int], dtype: torch.dtype,
                 pin_memory: bool = False) -> None:
        super().__init__(checkpoint, adapter, layers, dtype)
        self._buffers: dict[Key, torch.Tensor] = {}
        for key in tqdm(self.refs, desc="experts -> host memory", unit="expert",
                        leave=False, disable=None):
            buf = torch.empty(self.numel, dtype=dtype, pin_memory=pin_memory)
            checkpoint.read_expert_into(self.refs[key], buf)
            self._buffers[key] = buf

    def read_into(self, key: Key, out: torch.Tensor) -> None:
        out.copy_(self._buffers[key], non_blocking=out.is_cuda)

    def close(self) -> None:
        self._buffers.clear()


class DiskStore(ExpertStore):
    name = "disk"

    def read_into(self, key: Key, out: torch.Tensor) -> None:
        if out.is_cuda:
            # Safetensors reads into host memory; stage there, then one copy to the device.
            staging = torch.empty(self.numel, dtype=self.dtype)
            self.checkpoint.read_expert_into(self.refs[key], staging)
            out.copy_(staging)
        else:
            self.checkpoint.read_expert_into(self.refs[key], out)


STORES: dict[str, type[ExpertStore]] = {"host": HostStore, "disk": DiskStore}
