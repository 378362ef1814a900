"""Routing prediction baselines, scored like the predictor: (P, L, E) scores for P positions of a sequence.

Shape legend: T tokens of a sequence, P scored positions, L layers, E experts, K top_k, U seen token pairs.

* TLP (temporal locality): the previous token's true routing (the previous decoding step), per layer.
* SLP (spatial locality): the same token's true routing at the previous layer; layer 0, having no
  previous layer, takes the previous token's last layer (the layer that ran just before it).
* popularity: every token gets each layer's globally most used experts in the training traces.
* lookup: a table of each (previous token, token) pair's most frequent experts per layer in the training
  traces; unseen pairs fall back to the token alone, then to popularity.
TLP, SLP and lookup give one-hot scores; a small multiple of popularity breaks their ties, which only
matters for the fixed-budget metric (ranking beyond the K one-hot experts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from expertflow.errors import ExpertflowError
from expertflow.predictor.metrics import routing_mask
from expertflow.traces import TraceSequence, TraceSet

BASELINES_NAME = "baselines.safetensors"
_TIE_BREAK = 1e-3


@dataclass
class BaselineTables:
    """Statistics of the training traces that the popularity and lookup baselines need."""

    popularity: np.ndarray     # (L, E) float64 usage share per layer
    pair_keys: np.ndarray      # (U,) int64 sorted keys prev * vocab + token
    pair_experts: np.ndarray   # (U, L, K) int16 most frequent experts of each pair
    token_experts: np.ndarray  # (V, L, K) int16 most frequent experts per token; -1 if never seen
    vocab_size: int

    def save(self, directory: Path) -> None:
        save_file({"popularity": self.popularity, "pair_keys": self.pair_keys, "pair_experts": self.pair_experts,
                   "token_experts": self.token_experts}, str(directory / BASELINES_NAME),
                  metadata={"vocab_size": str(self.vocab_size)})

    @classmethod
    def load(cls, directory: Path) -> "BaselineTables":
        path = directory / BASELINES_NAME
        if not path.is_file():
            raise ExpertflowError(f"{directory}: no {BASELINES_NAME} (popularity/lookup tables); pass "
                                  "--baseline-traces with its training traces, or retrain with `expertflow train-predictor`")
        try:
            t = load_file(str(path))
            return cls(t["popularity"], t["pair_keys"], t["pair_experts"], t["token_experts"],
                       vocab_size=len(t["token_experts"]))
        except (SafetensorError, OSError, KeyError) as exc:
            raise ExpertflowError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); pass "
                                  "--baseline-traces with its training traces, or retrain with "
                                  "`expertflow train-predictor`") from None


def build_tables(traces: Sequence[TraceSet], vocab_size: int) -> BaselineTables:
    h = traces[0].header
    L, E, K = h.num_layers, h.num_experts, h.top_k
    seqs = [s for t in traces for s in t.sequences]
    ids = np.concatenate([s.token_ids for s in seqs]).astype(np.int64)                  # (T,)
    prev = np.concatenate([np.r_[-1, s.token_ids[:-1]] for s in seqs]).astype(np.int64)
    routing = np.concatenate([s.routing for s in seqs]).astype(np.int64)              # (T, L, K)
    used = routing >= 0
    layer_expert = (np.arange(L)[None, :, None] * E + routing)[used]
    popularity = np.bincount(layer_expert, minlength=L * E).reshape(L, E) / max(len(ids), 1) / K
    has_prev = prev >= 0
    pair_keys, pair_experts = _most_frequent(prev[has_prev] * vocab_size + ids[has_prev], routing[has_prev], E)
    tok_keys, tok_experts = _most_frequent(ids, routing, E)
    token_experts = np.full((vocab_size, L, K), -1, dtype=np.int16)
    token_experts[tok_keys] = tok_experts
    return BaselineTables(popularity, pair_keys, pair_experts, token_experts, vocab_size)


def _most_frequent(keys: np.ndarray, routing: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct key, the K experts per layer it was routed to most often, ties to the lower expert id:
    (U,), (U, L, K) int16. Counts only the (key, layer, expert) triples that occur: a dense (U, L, E) count
    of 2.7M tokens' pairs is gigabytes and minutes."""
    unique, inverse = np.unique(keys, return_inverse=True)
    L, K, E = routing.shape[1], routing.shape[2], num_experts
    used = routing >= 0                                                                # NO_EXPERT sets nothing
    group_of = inverse[:, None, None] * L + np.arange(L)[None, :, None]                # (key, layer) group
    codes, counts = np.unique((group_of * E + routing)[used], return_counts=True)
    group, expert = codes // E, codes % E
    order = np.lexsort((expert, -counts, group))                                       # most used first per group
    group, expert = group[order], expert[order]
    rank = np.arange(len(group)) - np.searchsorted(group, group)                        # place within its group
    top = np.full((len(unique) * L, K), -1, dtype=np.int64)
    keep = rank < K
    top[group[keep], rank[keep]] = expert[keep]
    _fill_unused(top, E)
    return unique, top.reshape(len(unique), L, K).astype(np.int16)


def _fill_unused(top: np.ndarray, num_experts: int) -> None:
    """Rows of `top` with fewer than K used experts (NO_EXPERT routing) end in -1: fill them, in place, with
    the lowest ids not already there, the order a stable sort of zero counts gives."""
    short = np.flatnonzero((top < 0).any(axis=1))
    if not len(short):
        return
    rows = top[short]
    present = np.zeros((len(short), num_experts + 1), dtype=bool)
    np.put_along_axis(present, np.where(rows < 0, num_experts, rows), True, axis=1)
    unused = np.argsort(present[:, :num_experts], axis=1, kind="stable")               # absent ids first, ascending
    missing = rows < 0
    # the -1s are the row's tail, so the j-th missing place takes the j-th absent id
    nth = np.cumsum(missing, axis=1) - 1
    rows[missing] = np.take_along_axis(unused, np.where(missing, nth, 0), axis=1)[missing]
    top[short] = rows


def _one_hot(experts: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """(P, L, K) expert ids -> (P, L, E) one-hot scores with the popularity tie-break."""
    return routing_mask(experts, prior.shape[-1]).astype(np.float32) + _TIE_BREAK * prior[None].astype(np.float32)


@dataclass
class TemporalBaseline:
    prior: np.ndarray  # (L, E)

    def scores(self, seq: TraceSequence, positions: np.ndarray) -> np.ndarray:
        return _one_hot(seq.routing[positions - 1], self.prior)


@dataclass
class SpatialBaseline:
    prior: np.ndarray  # (L, E)

    def scores(self, seq: TraceSequence, positions: np.ndarray) -> np.ndarray:
        r = seq.routing
        shifted = np.concatenate([r[positions - 1, -1:], r[positions, :-1]], axis=1)  # (P, L, K)
        return _one_hot(shifted, self.prior)


@dataclass
class PopularityBaseline:
    prior: np.ndarray  # (L, E)

    def scores(self, seq: TraceSequence, positions: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.prior.astype(np.float32), (len(positions), *self.prior.shape)).copy()


@dataclass
class LookupBaseline:
    tables: BaselineTables

    def scores(self, seq: TraceSequence, positions: np.ndarray) -> np.ndarray:
        t = self.tables
        ids = seq.token_ids.astype(np.int64)
        tok, prev = ids[positions], ids[positions - 1]
        popular = np.argsort(-t.popularity, axis=-1, kind="stable")[:, : t.token_experts.shape[-1]]  # (L, K)
        in_vocab = tok < t.vocab_size
        experts = np.where(in_vocab[:, None, None], t.token_experts[np.minimum(tok, t.vocab_size - 1)], -1)
        experts = np.where(experts[:, :1, :1] < 0, popular[None], experts)              # unseen token
        keys = prev * t.vocab_size + tok
        if len(t.pair_keys):
            where = np.searchsorted(t.pair_keys, keys).clip(max=len(t.pair_keys) - 1)
            found = t.pair_keys[where] == keys                                          # (P,)
            experts = np.where(found[:, None, None], t.pair_experts[where], experts)
        return _one_hot(experts, t.popularity)
