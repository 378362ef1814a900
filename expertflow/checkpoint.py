"""Read a safetensors checkpoint (single file or sharded with an index) tensor by tensor, by name.

Nothing is materialised up front: each tensor is read from its file when asked for, so experts can be
left on disk and read one at a time. Reads are positional reads into a fresh tensor, not views of a memory
map: a mapped file's touched pages would stay in the process's resident set beside the copy the model
keeps, holding the weights twice.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from expertflow.adapters import TensorRef
from expertflow.cache.direct_io import read_exact
from expertflow.errors import ExpertflowError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}

SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class Extent:
    """Where a tensor's bytes sit in a file: for reading them with one positional read, bypassing mmap."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of a checkpoint directory, addressable by name across shards."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._file_of: dict[str, Path] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        for path in self._shard_paths():
            self._headers[path] = _read_header(path)
            for name in self._headers[path][1]:
                self._file_of[name] = path
        self._check_index_complete()

    def _shard_paths(self) -> list[Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                self._index_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ExpertflowError(f"{index} is not a valid safetensors index ({exc}); re-save the checkpoint") from exc
            return sorted({self.directory / f for f in self._index_map.values()})
        self._index_map = {}
        single = self.directory / SINGLE_FILE
        if single.is_file():
            return [single]
        raise ExpertflowError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {self.directory}; point --model at a safetensors checkpoint directory"
        )

    def _check_index_complete(self) -> None:
        missing = [n for n in self._index_map if n not in self._file_of]
        if missing:
            raise ExpertflowError(
                f"{len(missing)} tensors listed in {INDEX_FILE} are not in its shards (first: {missing[0]}); "
                "the checkpoint is incomplete: copy it again"
            )

    def keys(self) -> Iterator[str]:
        return iter(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def read(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise ExpertflowError(f"tensor {name} is not in the checkpoint at {self.directory}")
        return self.read_ref(TensorRef(name))

    def read_ref(self, ref: TensorRef) -> torch.Tensor:
        """One expert's piece: a whole per-expert tensor, or row `index` of a fused 3-D tensor."""
        extent = self.extent(ref)
        tensor = torch.empty(extent.shape, dtype=extent.dtype)
        if extent.nbytes:
            fd = os.open(extent.path, os.O_RDONLY)
            try:
                read_exact(fd, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), extent.offset, extent.nbytes,
                           extent.path)
            finally:
                os.close(fd)
        return tensor

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def extent_of(self, name: str) -> Extent:
        return self.extent(TensorRef(name))

    def extent(self, ref: TensorRef) -> Extent:
        """The byte range of a per-expert tensor, or of one expert's row of a fused 3-D tensor."""
        path = self._file_of[ref.name]
        data_start, header = self._headers[path]
        entry = header[ref.name]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if entry["dtype"] not in _DTYPES:
            raise ExpertflowError(f"tensor {ref.name} in {path} is stored as {entry['dtype']}, which expertflow does "
                                  f"not read ({', '.join(_DTYPES)}); convert the checkpoint")
        if ref.index is not None:
            row = (end - begin) // shape[0]
            begin, end, shape = begin + ref.index * row, begin + (ref.index + 1) * row, shape[1:]
        return Extent(path, data_start + begin, end - begin, _DTYPES[entry["dtype"]], shape)

    def read_expert_into(self, refs: list[TensorRef], out: torch.Tensor) -> None:
        """Fill a flat expert buffer from the checkpoint, piece after piece (casting to out's dtype)."""
        offset = 0
        for ref in refs:
            piece = self.read_ref(ref).reshape(-1)
            end = offset + piece.numel()
            if end > out.numel():
                raise ExpertflowError(f"tensor {ref.name} is larger than the config says; checkpoint and config.json disagree")
            out[offset:end].copy_(piece)
            offset = end
        if offset != out.numel():
            raise ExpertflowError(
                f"expert tensors {refs[0].name}... hold {offset} values, the config implies {out.numel()}; "
                "checkpoint and config.json disagree"
            )


def _read_header(path: Path) -> tuple[int, dict]:
    """(offset where tensor data starts, the JSON header without its metadata) of a safetensors file, checked
    against the file's size so that a truncated copy fails here, not halfway through a generation."""
    if not path.is_file():
        raise ExpertflowError(f"checkpoint shard {path} is missing; copy the whole checkpoint directory")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if 8 + length > size:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise ExpertflowError(f"{path} is not a readable safetensors file ({exc}); it may be truncated: "
                              "copy it again") from None
    if 8 + length + end > size:
        raise ExpertflowError(f"{path} holds {size} bytes but its header describes {8 + length + end}; the file is "
                              "truncated: copy it again")
    return 8 + length, header


def stored_dtype(directory: Path) -> str:
    """The dtype a checkpoint's weights are stored in, as transformers' `dtype="auto"` reads it: config.json's
    `dtype` (`torch_dtype` before transformers 5), else the dtype of most of its floating-point bytes, else
    float32."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    named = config.get("dtype") or config.get("torch_dtype")
    if isinstance(named, str):
        return named.removeprefix("torch.")
    nbytes: dict[torch.dtype, int] = {}
    try:
        checkpoint = Checkpoint(directory)
    except ExpertflowError:
        return "float32"  # transformers' fallback; loading such a directory fails later, naming what is wrong
    for name in checkpoint.keys():
        extent = checkpoint.extent_of(name)
        if extent.dtype.is_floating_point:
            nbytes[extent.dtype] = nbytes.get(extent.dtype, 0) + extent.nbytes
    if not nbytes:
        return "float32"
    return str(max(nbytes, key=nbytes.get)).removeprefix("torch.")
