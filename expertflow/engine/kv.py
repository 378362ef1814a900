"""KV caches that follow their sequences: reindex rows of a decode batch, and merge batches.

Rows of a batch are left-padded to a common length; the attention mask marks real positions and
position ids are derived from it, so padding a row further on the left (merge) or dropping columns
that are padding in every row (select) leaves each sequence's attention unchanged. These are the
paper's Merge and Reindex primitives for the token scheduler and continuous batching.

Shape legend: B rows, S cached positions, H kv heads, D head dim.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertflow.errors import ExpertflowError


@dataclass
class KVBatch:
    """The decoding state of a batch: the model's KV cache (B rows) and its attention mask (B, S)."""

    cache: object  # a transformers DynamicCache whose layers hold keys/values (B, H, S, D)
    mask: torch.Tensor

    @property
    def rows(self) -> int:
        return self.mask.shape[0]


def select(batch: KVBatch, rows: Sequence[int]) -> KVBatch:
    """Rows `rows` of a batch, in that order (Reindex); columns that are padding in all of them are dropped."""
    index = torch.tensor(list(rows), dtype=torch.long, device=batch.mask.device)
    mask = batch.mask.index_select(0, index)
    first = int(torch.nonzero(mask.sum(dim=0)).min()) if mask.numel() else 0
    return KVBatch(_map_layers(batch.cache, lambda t: t.index_select(0, index)[:, :, first:]), mask[:, first:])


def merge(batches: Sequence[KVBatch]) -> KVBatch:
    """One batch holding every row of `batches`, in order (Merge); shorter ones are left-padded."""
    width = max(b.mask.shape[1] for b in batches)
    mask = torch.cat([F.pad(b.mask, (width - b.mask.shape[1], 0)) for b in batches], dim=0)
    layers = [_layers(b.cache) for b in batches]
    merged = copy.copy(batches[0].cache)
    merged.layers = []
    for i, layer in enumerate(layers[0]):
        new = copy.copy(layer)
        for name in ("keys", "values"):
            parts = [getattr(ls[i], name) for ls in layers]
            setattr(new, name, torch.cat([F.pad(p, (0, 0, width - p.shape[-2], 0)) for p in parts], dim=0))
        merged.layers.append(new)
    return KVBatch(merged, mask)


def _layers(cache) -> list:
    layers = list(cache.layers)
    for layer in layers:
        if getattr(layer, "is_sliding", False):
            raise ExpertflowError("sequences of a sliding-window attention model cannot be regrouped; "
                                  "use the fifo scheduler")
        if not getattr(layer, "is_initialized", False):
            raise ExpertflowError("a KV cache layer is empty: sequences can be regrouped only after prefill")
    return layers


def _map_layers(cache, fn) -> object:
    out = copy.copy(cache)
    out.layers = []
    for layer in _layers(cache):
        new = copy.copy(layer)
        new.keys, new.values = fn(layer.keys), fn(layer.values)
        out.layers.append(new)
    return out
