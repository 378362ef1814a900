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
from expertflow.cache.direct_io import (ALIGN, SLOT_SLACK, BounceBuffers, open_direct, placement_skip, read_exact,
                                  readv_exact)
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

    def slot_bytes(self, device: torch.device) -> int:
        """Bytes of one fast-tier slot on `device`: the expert, plus any room `place` needs."""
        return self.expert_bytes

    def place(self, key: Key, slot: torch.Tensor) -> torch.Tensor:
        """Where expert `key`'s flat values go within a slot's bytes (uint8, `slot_bytes`): the view that
        `read_into` fills. A store may pick the place so that its reads land without a copy."""
        return slot[: self.expert_bytes].view(self.dtype)

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
    destination when dtypes match. Without `page_cache` the reads bypass the OS page cache, so every
    fetch really reads the disk: O_DIRECT where the file system takes it (see `direct_io`; an expert's
    neighbouring tensors are fetched with one read, scattered straight into a CPU slot placed by `place`
    when every tensor is whole pages), else a buffered read per tensor whose range is then dropped
    (posix_fadvise DONTNEED); `direct_io=False` asks for the latter (to compare the two)."""

    name = "disk"

    def __init__(self, checkpoint: Checkpoint, adapter: MoEAdapter, layers: list[int], dtype: torch.dtype,
                 page_cache: bool = False, direct_io: bool = True) -> None:
        super().__init__(checkpoint, adapter, layers, dtype)
        self.drop_page_cache = not page_cache and hasattr(os, "posix_fadvise")
        self.extents: dict[Key, list[Extent]] = {k: [checkpoint.extent(r) for r in refs] for k, refs in self.refs.items()}
        self._spans = {key: _spans_of(key, extents, self.numel) for key, extents in self.extents.items()}
        paths = {e.path for ex in self.extents.values() for e in ex}
        self._fds = {path: os.open(path, os.O_RDONLY) for path in paths}
        self._direct_fds: dict[Path, int] = {}
        if not page_cache and direct_io:
            self._direct_fds = {path: fd for path in paths if (fd := open_direct(path)) is not None}
        self._open = [*self._fds.values(), *self._direct_fds.values()]
        self._bounce = BounceBuffers()
        # An expert whose tensors all sit at one offset within a page relative to their place in its flat
        # buffer (tensors of whole pages, as in real checkpoints) can be read straight into a slot that puts
        # the buffer at that offset (`place`): each tensor's whole blocks then skip the bounce buffer.
        self._page_offset = {key: r for key, spans in self._spans.items()
                             if (r := _page_offset(spans, dtype)) is not None}
        self._scatter = {key: [_scatter_of(span) for span in self._spans[key]] for key in self._page_offset}

    def slot_bytes(self, device: torch.device) -> int:
        zero_copy = self._direct_fds and self._page_offset and device.type == "cpu"
        return self.expert_bytes + (SLOT_SLACK if zero_copy else 0)

    def place(self, key: Key, slot: torch.Tensor) -> torch.Tensor:
        offset = self._page_offset.get(key)
        direct = all(span.path in self._direct_fds for span in self._spans[key])
        if offset is None or not direct or slot.device.type != "cpu":
            return super().place(key, slot)
        skip = placement_skip(slot.data_ptr(), offset)
        if skip % self.dtype.itemsize or skip + self.expert_bytes > slot.numel():
            return super().place(key, slot)
        return slot[skip : skip + self.expert_bytes].view(self.dtype)

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
        placed = _placed_for(out, self.dtype, self._page_offset.get(key))
        for i, span in enumerate(self._spans[key]):
            fd = self._direct_fds.get(span.path)
            if fd is not None:
                try:
                    if placed:
                        self._read_in_place(fd, span, self._scatter[key][i], _byte_view(out))
                    else:
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

    def _read_in_place(self, fd: int, span: _Span, plan: _Scatter, dest: memoryview) -> None:
        """The span in one scattered read (`plan`): each tensor's whole blocks straight into its place in
        `dest` (the expert's flat bytes, placed by `place`), the blocks only partly its own into the bounce
        buffer, and those bytes then copied to their places. The device sees one request, as for a read
        through the bounce buffer, and the ~6 MiB copy of a widened expert shrinks to a few KiB."""
        scratch = self._bounce.get(plan.scratch_bytes)
        views = [scratch[s : s + n] if at is None else dest[at : at + n] for n, at, s in plan.runs]
        readv_exact(fd, views, plan.begin, span.end - plan.begin, span.path)
        for at, s, n in plan.copies:
            dest[at : at + n] = scratch[s : s + n]

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


@dataclass(frozen=True)
class _Scatter:
    """How a span is read in place (`DiskStore._read_in_place`), worked out once per expert: from the block at
    `begin`, runs of `(bytes, index in the expert's bytes, index in the bounce buffer)` in file order, each to
    the expert's bytes (whole blocks of one tensor) or, index None, to the bounce buffer (the blocks where
    tensors meet, and the ends); then `copies` of `(index in the expert's bytes, index in the bounce buffer,
    bytes)` put the bounced bytes of each tensor in place."""

    begin: int
    runs: tuple[tuple[int, int | None, int], ...]
    copies: tuple[tuple[int, int, int], ...]
    scratch_bytes: int


def _scatter_of(span: _Span) -> _Scatter:
    runs: list[list] = []  # [file offset, bytes, index in the expert's bytes or None]

    def run(offset: int, nbytes: int, at: int | None) -> None:
        if nbytes <= 0:
            return
        if at is None and runs and runs[-1][2] is None:  # neighbouring bounced blocks: one buffer
            runs[-1][1] += nbytes
        else:
            runs.append([offset, nbytes, at])

    begin = span.begin - span.begin % ALIGN
    cursor = begin
    for piece in span.pieces:  # in file order, each at or after the previous one's end
        start, stop = piece.extent.offset, piece.extent.offset + piece.extent.nbytes
        first, last = -(-start // ALIGN) * ALIGN, stop - stop % ALIGN
        if first >= last:  # no whole block of its own
            run(cursor, -(-stop // ALIGN) * ALIGN - cursor, None)
            cursor = -(-stop // ALIGN) * ALIGN
            continue
        run(cursor, first - cursor, None)
        run(first, last - first, piece.start * piece.extent.dtype.itemsize + first - start)
        cursor = last
    run(cursor, -(-span.end // ALIGN) * ALIGN - cursor, None)

    planned, copies, used = [], [], 0
    for offset, nbytes, at in runs:
        if at is not None:
            planned.append((nbytes, at, 0))
            continue
        planned.append((nbytes, None, used))
        for piece in span.pieces:
            start, stop = piece.extent.offset, piece.extent.offset + piece.extent.nbytes
            lo, hi = max(start, offset), min(stop, offset + nbytes)
            if lo < hi:
                copies.append((piece.start * piece.extent.dtype.itemsize + lo - start, used + lo - offset, hi - lo))
        used += nbytes
    return _Scatter(begin, tuple(planned), tuple(copies), used or ALIGN)


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


def _page_offset(spans: list[_Span], dtype: torch.dtype) -> int | None:
    """The offset within a page that the expert's flat buffer must start at for every tensor's file bytes to
    line up with their place in it, if there is one (all tensors in `dtype`, so no cast), else None."""
    offsets = {(p.extent.offset - p.start * dtype.itemsize) % ALIGN for span in spans for p in span.pieces}
    same_dtype = all(p.extent.dtype == dtype for span in spans for p in span.pieces)
    return offsets.pop() if same_dtype and len(offsets) == 1 else None


def _placed_for(out: torch.Tensor, dtype: torch.dtype, offset: int | None) -> bool:
    """Whether `out` is a CPU buffer of `dtype` starting at `offset` within a page (see `DiskStore.place`)."""
    return (offset is not None and out.device.type == "cpu" and out.is_contiguous() and out.dtype == dtype
            and (out.data_ptr() - offset) % ALIGN == 0)


def _byte_view(buffer: torch.Tensor) -> memoryview:
    return memoryview(buffer.view(torch.uint8).numpy())


STORES: dict[str, type[ExpertStore]] = {"host": HostStore, "disk": DiskStore}
