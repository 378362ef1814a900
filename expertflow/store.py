"""The slow tier: where every expert lives when it is not in the fast-tier cache.

`host` keeps each expert as one flat buffer in host memory (pinned when the fast tier is CUDA, so a
transfer is one asynchronous copy); `disk` reads the expert's tensors from the safetensors files each
time it is fetched.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

import torch
from tqdm import tqdm

from expertflow.adapters import MoEAdapter, TensorRef
from expertflow.checkpoint import Checkpoint, Extent
from expertflow.errors import ExpertflowError

Key = tuple[int, int]  # (layer, expert)


class ExpertStore(ABC):
    """Reads one expert, as one flat buffer, into a destination tensor of `numel` values."""

    name: str

    def __init__(self, checkpoint: Checkpoint, adapter: MoEAdapter, layers: list[int], dtype: torch.dtype) -> None:
        available = set(checkpoint.keys())
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.numel = adapter.layout.numel
        self.expert_bytes = adapter.layout.nbytes(dtype)
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
    """Reads each expert's bytes from the safetensors files with positional reads, straight into the
    destination when dtypes match. With `drop_page_cache`, the read range is dropped from the OS page
    cache afterwards (posix_fadvise DONTNEED), so the next fetch really reads the disk again."""

    name = "disk"

    def __init__(self, checkpoint: Checkpoint, adapter: MoEAdapter, layers: list[int], dtype: torch.dtype,
                 drop_page_cache: bool = False) -> None:
        super().__init__(checkpoint, adapter, layers, dtype)
        self.drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")
        self.extents: dict[Key, list[Extent]] = {k: [checkpoint.extent(r) for r in refs] for k, refs in self.refs.items()}
        self._fds = {path: os.open(path, os.O_RDONLY) for path in {e.path for ex in self.extents.values() for e in ex}}

    def read_into(self, key: Key, out: torch.Tensor) -> None:
        position = 0
        for extent in self.extents[key]:
            numel = extent.nbytes // extent.dtype.itemsize
            target = out[position : position + numel]
            direct = extent.dtype == out.dtype and out.device.type == "cpu"
            buffer = target if direct else torch.empty(numel, dtype=extent.dtype)
            self._pread(extent, buffer)
            if not direct:
                target.copy_(buffer)
            position += numel
        if position != out.numel():
            raise ExpertflowError(f"expert {key} holds {position} values on disk, the config implies {out.numel()}; "
                                  "checkpoint and config.json disagree")

    def _pread(self, extent: Extent, buffer: torch.Tensor) -> None:
        fd = self._fds[extent.path]
        view = memoryview(buffer.view(torch.uint8).numpy())
        done = 0
        while done < extent.nbytes:
            n = os.preadv(fd, [view[done:]], extent.offset + done)
            if n <= 0:
                raise ExpertflowError(f"{extent.path} ended early while reading an expert; the file is truncated")
            done += n
        if self.drop_page_cache:
            os.posix_fadvise(fd, extent.offset, extent.nbytes, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


STORES: dict[str, type[ExpertStore]] = {"host": HostStore, "disk": DiskStore}
