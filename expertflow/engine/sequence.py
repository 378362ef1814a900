"""What the step loop moves: sequences (one request each), the batches they decode in, what a batch forward did,
and the loop's settings and outputs.

Shape legend: L MoE layers, E experts, K top_k, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from expertflow.engine.sampling import Sampler
from expertflow.stats import RunStats

TokenCallback = Callable[["Sequence", int], None]


@dataclass
class Sequence:
    """One request: its prompt, limits and sampler (so its tokens do not depend on its batch-mates)."""

    index: int                       # the caller's id for it (position in a prompt list, request number)
    prompt: list[int]
    max_new_tokens: int
    sampler: Sampler
    on_token: TokenCallback | None = None   # called on the loop's thread with each new token
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None        # "stop" (eos), "length", "cancelled", or "error"
    error: BaseException | None = None      # why, when finish_reason is "error"
    cancelled: bool = False                 # set from any thread: the sequence leaves at its next step
    last_routing: np.ndarray | None = None  # (L, K) experts the last token fed to the model used
    forecast: np.ndarray | None = None      # (L, E) predicted probabilities for the next token fed
    rpp_state: object | None = None         # the RPP's incremental state for this sequence
    fed: int = 0                            # generated tokens fed to the model so far
    routing: list[np.ndarray] | None = None  # when recording: (n, L, K) rows of each token fed, prompt first


@dataclass
class Batch:
    members: list[Sequence]
    kv: object  # the runner's decoding state: a KVBatch (decoder-only) or an EncoderDecoderState
    logits: torch.Tensor | None = None  # (rows, V) next-token logits


@dataclass(frozen=True)
class LoopSettings:
    """How the step loop batches: B sequences a batch, U batches a scheduling unit, two units in flight with
    `pipeline`. A `static` loop runs its prompts as one batch to the end, as transformers' `generate` does: a
    finished row stays, fed padding, so every row's arithmetic is that of the whole batch (and the tokens equal
    transformers' batched generation); it is never regrouped."""

    batch_size: int
    unit: int = 2
    pipeline: bool = True
    static: bool = False
    record_routing: bool = False  # keep each sequence's routing (static loops only: a trace)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.unit < 1:
            raise ValueError(f"batch size and schedule unit must be >= 1, got {self.batch_size} and {self.unit}")
        if self.record_routing and not self.static:
            raise ValueError("routing is recorded by static loops only")


@dataclass(frozen=True)
class BatchRun:
    """What one decode batch forward did: the scheduler's measure and the forecast's check."""

    distinct: int                   # distinct (layer, expert) pairs the batch used
    routing: np.ndarray             # (rows, L, K) the experts each row's token was routed to
    forecast: np.ndarray | None     # (rows, L, E) the probabilities the batch was planned and scheduled from


@dataclass(frozen=True)
class ManyOutput:
    sequences: list[list[int]]           # generated ids per prompt, in input order
    stats: RunStats
    activated_experts_per_batch: float   # mean distinct (layer, expert) pairs per decode batch forward
    decode_forwards: int
    # distinct pairs summed over decode forwards, per token they fed: expert runs per token, what the scheduler
    # lowers. Unlike the per-batch mean it does not rise when regrouping fills fewer, fuller batches.
    activated_experts_per_token: float
    schedule_seconds: float              # spent predicting and scheduling, on the worker
    schedule_wait_seconds: float         # of that, what the model waited for (not hidden by the pipeline)
    # The RPP's batch-level accuracy over the run's decode batches as they ran (`MetricAccumulator.result`
    # without a budget: b_acc, precision, f1, per_layer, ...); None without forecasts.
    forecast_accuracy: dict | None = None
