"""Step the predictor one token at a time with cached keys/values: constant cost per decoding step.

Shape legend: B sequences, S prompt positions, W = window - 1 cached previous positions (oldest first),
H heads, Dh head size, D d_model, L MoE layers, E experts.
Every attention is causal over a fixed window, so a step needs only each attention's keys/values of the last W
positions and equals the full-sequence forward at that position (tested); `prefill` takes a prompt's state
from one full-sequence forward. Design: docs/design/predictor.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertflow.predictor.model import KV, LayerKV, RoutingPathModel


@dataclass
class StepState(LayerKV):
    """The keys/values (B, H, W, Dh) of each sequence's last W positions, per attention."""
    valid: torch.Tensor      # (B, W) bool: which cached slots hold real positions (the others are zeros)

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
    device = model.embed.weight.device
    zeros = lambda: (torch.zeros(batch, H, W, Dh, device=device), torch.zeros(batch, H, W, Dh, device=device))  # noqa: E731
    return StepState([zeros() for _ in model.encoder], [zeros() for _ in model.decoder],
                     [zeros() for _ in model.decoder], torch.zeros(batch, W, dtype=torch.bool, device=device))


@torch.inference_mode()
def step(model: RoutingPathModel, state: StepState, tokens: torch.Tensor,
         active: torch.Tensor | None = None) -> tuple[torch.Tensor, StepState]:
    """tokens (B,) -> logits (B, L, E) for them, and the state advanced by one position. Rows with
    active=False (B,) bool are fed but leave no trace in the cache (used to left-align ragged prompts)."""
    cfg = model.config
    B, device = tokens.shape[0], state.valid.device   # masks are built where the model and its state live
    tokens = tokens.to(device)
    active = torch.ones(B, dtype=torch.bool, device=device) if active is None else active.to(device)
    keep = torch.cat([state.valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)   # (B, W+1)
    distance = torch.arange(cfg.window - 1, -1, -1, device=device)[None]            # (1, W+1) oldest slot first
    hidden, kv = model.decode(tokens[:, None], model.attention_biases(distance, keep[:, None]), past=state)
    logits = model.logits(hidden)[:, 0]                                             # (B, L, E)
    advanced = StepState(*(_shift(kvs, active) for kvs in (kv.encoder, kv.decoder_self, kv.decoder_cross)),
                         valid=torch.where(active[:, None], keep[:, 1:], state.valid))
    return logits, advanced


@torch.inference_mode()
def prefill(model: RoutingPathModel, token_ids: list[list[int]]) -> tuple[torch.Tensor, StepState]:
    """Non-empty prompts, ragged, in one forward -> logits (B, L, E) of each prompt's last token and the
    state after it, as `feed_stepwise` leaves them.

    Prompts are right-padded (causality keeps the padding from touching real positions) and cut to their
    last `receptive_field` tokens: nothing earlier reaches the last token's logits, nor the keys/values of
    the last W positions (the deepest, the last decoder layer's self-attention input, depends on
    receptive_field - W tokens up to its own position)."""
    cfg = model.config
    W, device = cfg.window - 1, model.embed.weight.device
    tails = [ids[-cfg.receptive_field:] for ids in token_ids]
    lengths = torch.tensor([len(ids) for ids in tails], device=device)
    batch = torch.zeros(len(tails), int(lengths.max()), dtype=torch.long, device=device)   # (B, S)
    for i, ids in enumerate(tails):
        batch[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    hidden, kv = model.decode(batch, model.window_biases(batch.shape[1], device))         # (B, S, D)
    last = hidden[torch.arange(len(tails), device=device), lengths - 1]                     # (B, D)
    valid = lengths[:, None] - W + torch.arange(W, device=device) >= 0                       # (B, W)
    ends = lengths.tolist()
    window = lambda kvs: [(_last_slots(k, ends, W), _last_slots(v, ends, W)) for k, v in kvs]  # noqa: E731
    return model.logits(last), StepState(window(kv.encoder), window(kv.decoder_self), window(kv.decoder_cross),
                                         valid)


def feed_stepwise(model: RoutingPathModel, token_ids: list[list[int]]) -> tuple[torch.Tensor, StepState]:
    """`prefill` one `step` per token: ragged prompts are right-aligned in time by inactive steps, which
    leave nothing in the cache. The reference `prefill` is tested and benchmarked against."""
    longest = max(len(ids) for ids in token_ids)
    state, logits = empty_state(model, len(token_ids)), None
    for t in range(longest):
        offset = [t - (longest - len(ids)) for ids in token_ids]              # index into each prompt
        active = torch.tensor([o >= 0 for o in offset])
        tokens = torch.tensor([ids[o] if o >= 0 else 0 for ids, o in zip(token_ids, offset)])
        logits, state = step(model, state, tokens, active)
    return logits, state


def _last_slots(t: torch.Tensor, ends: list[int], W: int) -> torch.Tensor:
    """(B, H, S, Dh) over positions 0.. -> (B, H, W, Dh) at positions end-W .. end-1 of each row, zeros
    for the positions before 0 (as an empty state's slots)."""
    padded = F.pad(t, (0, 0, W, 0))                                     # (B, H, W + S, Dh): position p at W + p
    return torch.stack([padded[b, :, end:end + W] for b, end in enumerate(ends)])


def _shift(kvs: list[KV], active: torch.Tensor) -> list[KV]:
    # Drop the oldest slot for active rows; inactive rows keep their old cache untouched.
    rows = active[:, None, None, None]
    return [(torch.where(rows, k[:, :, 1:], k[:, :, :-1]), torch.where(rows, v[:, :, 1:], v[:, :, :-1]))
            for k, v in kvs]
