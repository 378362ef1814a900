"""Step the predictor one token at a time with cached keys/values: constant cost per decoding step.

Shape legend: B sequences, W = window - 1 cached previous positions (oldest first), H heads,
Dh head size, D d_model, L MoE layers, E experts.

Because every attention in the network is causal over a fixed window, a new position needs only each
layer's keys/values of the previous W positions: the encoder layers' self-attention inputs, the decoder
layers' self-attention inputs, and the decoder layers' projections of the encoder output (cross-attention).
A step is then one token through 4 small layers plus attention over W cached positions, whatever the
context length, and its output equals the full-sequence forward at that position (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertflow.predictor.model import RoutingPathModel, relative_bucket

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values (B, H, W, Dh)


@dataclass
class StepState:
    encoder: list[KV]        # per encoder layer
    decoder_self: list[KV]   # per decoder layer
    decoder_cross: list[KV]  # per decoder layer, projections of the encoder output
    valid: torch.Tensor      # (B, W) bool: which cached slots hold real positions

    def select(self, rows: list[int] | torch.Tensor) -> "StepState":
        """The state of a subset (or reordering) of the batch's sequences, e.g. after regrouping."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda kvs: [(k[rows], v[rows]) for k, v in kvs]  # noqa: E731
        return StepState(pick(self.encoder), pick(self.decoder_self), pick(self.decoder_cross), self.valid[rows])

    @staticmethod
    def concat(states: list["StepState"]) -> "StepState":
        """One batch holding the rows of `states` in order (every state has the same window)."""
        join = lambda attr: [(torch.cat([getattr(s, attr)[i][0] for s in states]),  # noqa: E731
                              torch.cat([getattr(s, attr)[i][1] for s in states]))
                             for i in range(len(getattr(states[0], attr)))]
        return StepState(join("encoder"), join("decoder_self"), join("decoder_cross"),
                         torch.cat([s.valid for s in states]))


def empty_state(model: RoutingPathModel, batch: int) -> StepState:
    cfg = model.config
    W, H, Dh = cfg.window - 1, cfg.num_heads, cfg.d_model // cfg.num_heads
    zeros = lambda: (torch.zeros(batch, H, W, Dh), torch.zeros(batch, H, W, Dh))  # noqa: E731
    return StepState([zeros() for _ in model.encoder], [zeros() for _ in model.decoder],
                     [zeros() for _ in model.decoder], torch.zeros(batch, W, dtype=torch.bool))


@torch.inference_mode()
def step(model: RoutingPathModel, state: StepState, tokens: torch.Tensor,
         active: torch.Tensor | None = None) -> tuple[torch.Tensor, StepState]:
    """tokens (B,) -> logits (B, L, E) for them, and the state advanced by one position. Rows with
    active=False (B,) bool are fed but leave no trace in the cache (used to left-align ragged prompts)."""
    cfg = model.config
    B = tokens.shape[0]
    active = torch.ones(B, dtype=torch.bool) if active is None else active
    keep = torch.cat([state.valid, torch.ones(B, 1, dtype=torch.bool)], dim=1)      # (B, W+1)
    mask = torch.zeros(B, 1, 1, cfg.window).masked_fill(~keep[:, None, None, :], float("-inf"))
    distance = torch.arange(cfg.window - 1, -1, -1)                                 # oldest slot first
    buckets = relative_bucket(distance, cfg.relative_buckets, cfg.window)
    enc_bias = model.enc_bias(buckets).T[None, :, None, :] + mask                   # (B, H, 1, W+1)
    dec_bias = model.dec_bias(buckets).T[None, :, None, :] + mask
    x = model.embed(tokens)[:, None]                                                # (B, 1, D)
    h, new_enc = x, []
    for block, cache in zip(model.encoder, state.encoder):
        n = block.norm1(h)
        k, v = _extend(cache, block.attn.project_kv(n))
        h = h + block.attn.attend(n, k, v, enc_bias)
        h = h + block.ff(block.norm2(h))
        new_enc.append((k, v))
    memory = model.enc_norm(h)
    y, new_self, new_cross = x, [], []
    for block, self_cache, cross_cache in zip(model.decoder, state.decoder_self, state.decoder_cross):
        n = block.norm1(y)
        k, v = _extend(self_cache, block.self_attn.project_kv(n))
        y = y + block.self_attn.attend(n, k, v, dec_bias)
        ck, cv = _extend(cross_cache, block.cross_attn.project_kv(memory))
        y = y + block.cross_attn.attend(block.norm2(y), ck, cv, mask)
        y = y + block.ff(block.norm3(y))
        new_self.append((k, v))
        new_cross.append((ck, cv))
    logits = model.heads(model.dec_norm(y))[:, 0]                            # (B, L, E)
    advanced = StepState(*(_shift(kvs, active) for kvs in (new_enc, new_self, new_cross)),
                         valid=torch.where(active[:, None], keep[:, 1:], state.valid))
    return logits, advanced


def _extend(cache: KV, new: KV) -> KV:
    """Cached (B, H, W, Dh) + new (B, H, 1, Dh) -> (B, H, W+1, Dh)."""
    return torch.cat([cache[0], new[0]], dim=2), torch.cat([cache[1], new[1]], dim=2)


def _shift(kvs: list[KV], active: torch.Tensor) -> list[KV]:
    # Drop the oldest slot for active rows; inactive rows keep their old cache untouched.
    rows = active[:, None, None, None]
    return [(torch.where(rows, k[:, :, 1:], k[:, :, :-1]), torch.where(rows, v[:, :, 1:], v[:, :, :-1]))
            for k, v in kvs]
