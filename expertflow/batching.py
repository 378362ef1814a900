"""Many sequences through the engine in scheduling units: U batches of B sequences, regrouped every step.

Each decoding step of a unit reads like the paper's pipeline (Fig. 1):
  predict  - the RPP forecasts each live sequence's next routing; without an RPP, the routing its
             previous token actually took stands in (the TLP guess)
  schedule - the token scheduler regroups the unit's live sequences into balanced batches
  regroup  - KV caches follow their sequences (Merge the unit's batches, Reindex to the new rows)
  run      - each batch forwards its tokens; the cache plans and prefetches from that batch's forecast
  sample   - next tokens; finished sequences leave and waiting ones join (continuous batching)

`BatchRunner` holds the operations; a `decode_session.DecodeSession` holds one run's state and drives
them, with two units in flight (the dual-batch pipeline), so `generate_many` and a server (which adds
requests while others decode) run the same loop.

Shape legend: N live sequences, L MoE layers, E experts, K top_k, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from expertflow.decode_session import DecodeSession
from expertflow.engine import Engine, Sampler, check_logits, check_request
from expertflow.errors import ExpertflowError
from expertflow.kv import KVBatch, merge, select
from expertflow.cache.policies.forecast import batch_forecast
from expertflow.scheduler import Grouping, Scheduler, routing_paths
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


@dataclass
class Batch:
    members: list[Sequence]
    kv: KVBatch
    logits: torch.Tensor | None = None  # (rows, V) next-token logits


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


class BatchRunner:
    def __init__(self, engine: Engine, scheduler: Scheduler, batch_size: int, unit: int = 2,
                 pipeline: bool = True) -> None:
        if batch_size < 1 or unit < 1:
            raise ValueError(f"batch size and schedule unit must be >= 1, got {batch_size} and {unit}")
        self.depth = 2 if pipeline else 1  # units in flight
        self.engine = engine
        self.scheduler = scheduler
        self.batch_size = batch_size
        self.unit = unit
        self.parts = engine.parts

    def session(self) -> DecodeSession:
        return DecodeSession(self)

    def run(self, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
            seed: int | None = None) -> ManyOutput:
        check_request(prompts, max_new_tokens, self.engine.max_positions)
        before = self.parts.cache.figures()
        start = time.perf_counter()
        with self.session() as session:
            for i, p in enumerate(prompts):
                session.add(Sequence(i, list(p), max_new_tokens, Sampler(temperature, seed)))
            while session.busy:
                session.round()
        seconds = time.perf_counter() - start
        done = sorted(session.finished, key=lambda s: s.index)
        failed = [s.error for s in done if s.error is not None]
        if failed:
            raise failed[0]
        stats = RunStats.between(before, self.parts.cache.figures(), new_tokens=sum(len(s.generated) for s in done),
                                 prompt_tokens=sum(map(len, prompts)), seconds=seconds, prefill_seconds=0.0,
                                 resident_bytes=self.parts.resident_bytes)
        return ManyOutput(sequences=[s.generated for s in done], stats=stats,
                          activated_experts_per_batch=float(np.mean(session.distinct)) if session.distinct else 0.0,
                          decode_forwards=len(session.distinct),
                          activated_experts_per_token=sum(session.distinct) / sum(session.fed) if session.fed else 0.0,
                          schedule_seconds=session.schedule_seconds,
                          schedule_wait_seconds=session.schedule_wait,
                          forecast_accuracy=session.accuracy.result() if session.accuracy.batches else None)

    # ---- the step's operations ----------------------------------------------------------------
    def admit(self, waiting: deque[Sequence], live: int) -> list[Batch]:
        """Prefill waiting sequences into free places of a unit, B at a time."""
        joining = [waiting.popleft() for _ in range(min(self.batch_size * self.unit - live, len(waiting)))]
        return [self._prefill(joining[i:i + self.batch_size]) for i in range(0, len(joining), self.batch_size)]

    def _prefill(self, members: list[Sequence]) -> Batch:
        ids, mask = self.engine.left_pad([s.prompt for s in members])
        logits, cache = self.engine.forward(ids, mask, None, self.engine.forecast([s.prompt for s in members], True))
        routing = self._take_routing(len(members), ids.shape[1])
        for row, seq in enumerate(members):
            seq.last_routing = routing[row, -1]
        if self._predicts:
            states, _ = self.engine.predictor.start_rows([s.prompt for s in members])
            for seq, state in zip(members, states):
                seq.rpp_state = state
        return Batch(members, KVBatch(cache, mask), logits)

    def sample(self, batches: list[Batch], finished: list[Sequence]) -> list[Batch]:
        """Append each row's next token; finished sequences leave their batch (their KV rows are dropped).
        A batch whose logits went NaN/Inf finishes its sequences with that error; the others go on."""
        eos = set(self.parts.eos_token_ids)
        kept = []
        for batch in batches:
            try:
                self._check(batch)
            except ExpertflowError as exc:
                for seq in batch.members:
                    seq.finish_reason, seq.error = "error", exc
                finished.extend(batch.members)
                continue
            rows = []
            for row, seq in enumerate(batch.members):
                if not seq.cancelled:
                    token = int(seq.sampler(batch.logits[row : row + 1])[0])
                    seq.generated.append(token)
                    if seq.on_token is not None:
                        seq.on_token(seq, token)
                seq.finish_reason = _finish_reason(seq, eos)
                if seq.finish_reason is None:
                    rows.append(row)
                else:
                    finished.append(seq)
            if len(rows) == len(batch.members):
                kept.append(batch)
            elif rows:
                kept.append(Batch([batch.members[r] for r in rows], select(batch.kv, rows)))
        return kept

    def _check(self, batch: Batch) -> None:
        """`engine.check_logits` over the batch's rows, each at its own step."""
        members = batch.members
        check_logits(batch.logits, [len(s.generated) for s in members],
                     lambda row: self.engine.nonfinite_layer(members[row].prompt + members[row].generated))

    def regroup(self, batches: list[Batch]) -> list[Batch]:
        """Predict each live sequence's routing, schedule, and move the KV rows to the new batches."""
        members = [seq for b in batches for seq in b.members]
        self._predict(members)
        grouping = self._group(members)
        if grouping is None:
            return batches
        # A new batch whose rows are an old batch's, in order, keeps that batch's KV as it is: only the others
        # are merged and reindexed (the scheduler often keeps most batches).
        start = np.cumsum([0] + [len(b.members) for b in batches])
        kept = {tuple(range(start[i], start[i + 1])): b for i, b in enumerate(batches)}
        moved = [rows for rows in grouping if tuple(rows) not in kept]
        kv = (merge([b.kv for b in batches]) if len(batches) > 1 else batches[0].kv) if moved else None
        return [kept[tuple(rows)] if tuple(rows) in kept else Batch([members[i] for i in rows], select(kv, rows))
                for rows in grouping]

    @property
    def _predicts(self) -> bool:
        """Whether forecasts are needed: by a scheduler that regroups, or by a policy that plans from them."""
        wanted = self.scheduler.name != "fifo" or self.parts.policy.uses_forecast
        return self.engine.predictor is not None and wanted

    def _predict(self, members: list[Sequence]) -> None:
        """Set each sequence's (L, E) forecast of the token about to be fed: one incremental RPP step over
        every live sequence, each carrying its own state (so regrouping costs nothing here)."""
        if not self._predicts:
            return
        states, probs = self.engine.predictor.step_rows([s.rpp_state for s in members],
                                                        [s.generated[-1] for s in members])
        for seq, state, p in zip(members, states, probs.float().cpu().numpy()):
            seq.rpp_state, seq.forecast = state, p

    def _group(self, members: list[Sequence]) -> list[list[int]] | None:
        """Rows of each new batch, or None to keep the batches as they are (fifo, or one batch)."""
        n = len(members)
        batches = math.ceil(n / self.batch_size)
        # Batches of one sequence activate that sequence's experts whatever the grouping: nothing to regroup.
        if self.scheduler.name == "fifo" or batches == 1 or self.batch_size == 1:
            return None
        routing, probabilities = self._routing(members)
        size = math.ceil(n / batches)
        ghosts = np.zeros((batches * size - n, *routing.shape[1:]), dtype=routing.dtype)  # activate nothing
        grouping: Grouping = self.scheduler.group(np.concatenate([routing, ghosts]), size, batches,
                                                  probabilities=probabilities)
        return [[i for i in rows if i < n] for rows in grouping.batches]

    def _routing(self, members: list[Sequence]) -> tuple[np.ndarray, bool]:
        """(N, L, E) routing to schedule on, and whether it is probabilities: the forecast (its top-k for a
        scheduler that needs 0/1 paths), else the previous token's routing."""
        if members[0].forecast is not None:
            probs = np.stack([s.forecast for s in members])
            if self.scheduler.takes_probabilities:
                return probs, True
            ids = np.argsort(-probs, axis=-1, kind="stable")[..., : self.parts.adapter.top_k]
        else:
            ids = np.stack([s.last_routing for s in members]).astype(np.int64)
        return routing_paths(ids, self.parts.adapter.num_experts), False

    def run_batch(self, batch: Batch) -> BatchRun:
        """Forward each member's last token."""
        rows = len(batch.members)
        mask = torch.cat([batch.kv.mask, torch.ones(rows, 1, dtype=batch.kv.mask.dtype,
                                                     device=batch.kv.mask.device)], dim=1)
        tokens = torch.tensor([[s.generated[-1]] for s in batch.members], device=self.engine.device)
        probs = np.stack([s.forecast for s in batch.members]) if batch.members[0].forecast is not None else None
        forecast = None
        if probs is not None and self.parts.policy.uses_forecast:
            forecast = batch_forecast(probs, self.parts.layers)
        batch.logits, cache = self.engine.forward(tokens, mask, batch.kv.cache, forecast)
        batch.kv = KVBatch(cache, mask)
        routing = self._take_routing(rows, 1)[:, 0]  # (rows, L, K)
        for seq, r in zip(batch.members, routing):
            seq.last_routing = r
        distinct = len({(layer, int(e)) for r in routing for layer, experts in enumerate(r) for e in experts})
        return BatchRun(distinct, routing, probs)

    def _take_routing(self, rows: int, width: int) -> np.ndarray:
        return self.engine.recorder.take().reshape(rows, width, len(self.parts.layers), self.parts.adapter.top_k)


def _finish_reason(seq: Sequence, eos: set[int]) -> str | None:
    if seq.cancelled:
        return "cancelled"
    if seq.generated and seq.generated[-1] in eos:
        return "stop"
    if len(seq.generated) >= seq.max_new_tokens:
        return "length"
    return None
