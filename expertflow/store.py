"""The slow tier: where every expert lives when it is not in the fast-tier cache.

`host` keeps each expert as one flat buffer in host memory (pinned when the fast tier is CUDA, so a
transfer is one asynchronous copy); `disk` reads the expert's tensors from the safetensors files each
time it is fetched.
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from expertflow.adapters import MoEAdapter, TensorRef
from expertflow.checkpoint import Checkpoint, Extent
from expertflow.direct_io import ALIGN, BounceBuffers, open_direct, read_exact
from expertflow.errors import ExpertflowError

Key = tuple[int, int]  # (layer, expert)


class ExpertStore(ABC):
    """Reads one expert, as one flat buffer, into a destination tensor of `numel` values."""

    name: str
    read_method: str  # how a read reaches the slow tier, for reports

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
    read_method = "host RAM store (no disk)"

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


@dataclass(frozen=True)
class _Piece:
    """One tensor of an expert: where it sits on disk and where it goes in the flat buffer."""

    extent: Extent
    start: int  # first value in the destination
    numel: int


@dataclass(frozen=True)
class _Span:
    """Neighbouring pieces of one file, fetched with one read: [begin, end) covers them all."""

    path: Path
    begin: int
    end: int
    pieces: tuple[_Piece, ...]


class DiskStore(ExpertStore):
    """Reads each expert's bytes from the safetensors files with positional reads, straight into the
    destination when dtypes match. With `drop_page_cache` the reads bypass the OS page cache, so every
    fetch really reads the disk: O_DIRECT where the file system takes it (see `direct_io`; an expert's
    neighbouring tensors are fetched with one read), else a buffered read per tensor whose range is then
    dropped (posix_fadvise DONTNEED); `direct_io=False` asks for the latter (to compare the two)."""

    name = "disk"

    def __init__(self, checkpoint: Checkpoint, adapter: MoEAdapter, layers: list[int], dtype: torch.dtype,
                 drop_page_cache: bool = False, direct_io: bool = True) -> None:
        super().__init__(checkpoint, adapter, layers, dtype)
        self.drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")
        self.extents: dict[Key, list[Extent]] = {k: [checkpoint.extent(r) for r in refs] for k, refs in self.refs.items()}
        self._spans = {key: _spans_of(key, extents, self.numel) for key, extents in self.extents.items()}
        paths = {e.path for ex in self.extents.values() for e in ex}
        self._fds = {path: os.open(path, os.O_RDONLY) for path in paths}
        self._direct_fds: dict[Path, int] = {}
        if drop_page_cache and direct_io:
            self._direct_fds = {path: fd for path in paths if (fd := open_direct(path)) is not None}
        self._open = [*self._fds.values(), *self._direct_fds.values()]
        self._bounce = BounceBuffers()

    @property
    def read_method(self) -> str:
        """How reads reach the device, for reports."""
        if self._direct_fds and len(self._direct_fds) == len(self._fds):
            return "O_DIRECT (page cache bypassed)"
        if self._direct_fds:
            return "O_DIRECT where the file system allows, else pread + posix_fadvise(DONTNEED) (page cache bypassed)"
        if self.drop_page_cache:
            return "pread + posix_fadvise(DONTNEED) after each read (page cache bypassed)"
        return "pread through the OS page cache"

    def read_into(self, key: Key, out: torch.Tensor) -> None:
        for span in self._spans[key]:
            fd = self._direct_fds.get(span.path)
            if fd is not None:
                try:
                    self._read_direct(fd, span, out)
                    continue
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    # The file system opened O_DIRECT but refuses the transfer: read this file buffered from
                    # now on (the descriptor stays open until close(): another reader may be using it).
                    self._direct_fds.pop(span.path, None)
            for piece in span.pieces:
                self._read_buffered(piece, out[piece.start : piece.start + piece.numel])

    def _read_direct(self, fd: int, span: _Span, out: torch.Tensor) -> None:
        """The span's aligned superset into this thread's bounce buffer, then each piece copied to its place."""
        begin = span.begin - span.begin % ALIGN
        length = -(-(span.end - begin) // ALIGN) * ALIGN
        view = self._bounce.get(length)
        read_exact(fd, view[:length], begin, span.end - begin, span.path)
        for piece in span.pieces:
            source = torch.frombuffer(view, dtype=piece.extent.dtype, count=piece.numel,
                                      offset=piece.extent.offset - begin)
            out[piece.start : piece.start + piece.numel].copy_(source)

    def _read_buffered(self, piece: _Piece, target: torch.Tensor) -> None:
        extent = piece.extent
        in_place = extent.dtype == target.dtype and target.device.type == "cpu"
        buffer = target if in_place else torch.empty(piece.numel, dtype=extent.dtype)
        fd = self._fds[extent.path]
        read_exact(fd, _byte_view(buffer), extent.offset, extent.nbytes, extent.path)
        if self.drop_page_cache:
            os.posix_fadvise(fd, extent.offset, extent.nbytes, os.POSIX_FADV_DONTNEED)
        if not in_place:
            target.copy_(buffer)

    def close(self) -> None:
        for fd in self._open:
            os.close(fd)
        self._open.clear()
        self._fds.clear()
        self._direct_fds.clear()


def _spans_of(key: Key, extents: list[Extent], numel: int) -> list[_Span]:
    """An expert's pieces grouped into runs of neighbours: per-expert hub tensors sit back to back (one
    span); a fused 3-D tensor's rows for one expert sit far from the other tensor's (one span each)."""
    pieces, start = [], 0
    for extent in extents:
        count = extent.nbytes // extent.dtype.itemsize
        pieces.append(_Piece(extent, start, count))
        start += count
    if start != numel:
        raise ExpertflowError(f"expert {key} holds {start} values on disk, the config implies {numel}; "
                              "checkpoint and config.json disagree")
    spans: list[_Span] = []
    for piece in sorted(pieces, key=lambda p: (str(p.extent.path), p.extent.offset)):
        e = piece.extent
        last = spans[-1] if spans else None
        if last is not None and last.path == e.path and e.offset - last.end <= ALIGN:
            spans[-1] = _Span(last.path, last.begin, max(last.end, e.offset + e.nbytes), (*last.pieces, piece))
        else:
            spans.append(_Span(e.path, e.offset, e.offset + e.nbytes, (piece,)))
    return spans


def _byte_view(buffer: torch.Tensor) -> memoryview:
    return memoryview(buffer.view(torch.uint8).numpy())


STORES: dict[str, type[ExpertStore]] = {"host": HostStore, "disk": DiskStore}
