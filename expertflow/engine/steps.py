"""The step's operations over batches of sequences, in scheduling units of U batches of B sequences.

  predict  - the RPP forecasts each live sequence's next routing; without an RPP, the routing its
             previous token actually took stands in (the TLP guess)
  schedule - the token scheduler regroups the unit's live sequences into balanced batches; KV caches follow
             (Merge the unit's batches, Reindex to the new rows)
  run      - each batch forwards its tokens through the runner; the cache plans and prefetches from that
             batch's forecast as the forward starts
  sample   - next tokens; finished sequences leave and waiting ones join (continuous batching)

`loop.StepLoop` drives them. The runner (`runner.DecoderRunner`, `seq2seq_runner.Seq2SeqRunner`) is the only
part that knows how the model is called.

Shape legend: N live sequences, L MoE layers, E experts, K top_k, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np
import torch

from expertflow.engine.loop import StepLoop
from expertflow.engine.sequence import Batch, BatchRun, LoopSettings, ManyOutput, Sequence
from expertflow.engine.runner import DecoderRunner, GenerationOutput
from expertflow.engine.sampling import Sampler, check_logits, check_request
from expertflow.errors import ExpertflowError
from expertflow.engine.kv import merge, select
from expertflow.scheduler import Grouping, Scheduler, routing_paths, scheduler_class
from expertflow.stats import RunStats


class BatchRunner:
    """The step's operations over batches of sequences (admit, sample, regroup, run a batch); a
    `StepLoop` drives them, one `step()` a decode step of every unit in flight."""

    def __init__(self, engine: DecoderRunner, scheduler: Scheduler, batch_size: int, unit: int = 2,
                 pipeline: bool = True, static: bool = False, record_routing: bool = False) -> None:
        self.settings = LoopSettings(batch_size, unit, pipeline, static, record_routing)
        if static and scheduler.name != "fifo":
            raise ValueError(f"a static batch is never regrouped; scheduler {scheduler.name!r} needs a dynamic one")
        self.engine = engine
        self.scheduler = scheduler
        self.parts = engine.parts
        self.last_logits: torch.Tensor | None = None  # (rows, V) a static batch's last sampled logits

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def unit(self) -> int:
        return self.settings.unit

    @property
    def depth(self) -> int:
        """Units in flight: two with the dual-batch pipeline, else one."""
        return 2 if self.settings.pipeline else 1

    def session(self) -> StepLoop:
        return StepLoop(self)

    def _drive(self, sequences: list[Sequence]) -> tuple[StepLoop, list[Sequence], dict]:
        """Run `sequences` to the end: the session, the finished sequences in input order, and the cache's figures
        before and the run's timings."""
        before = self.parts.cache.figures()
        start = time.perf_counter()
        with self.session() as session:
            for seq in sequences:
                session.add(seq)
            while session.busy:
                session.step()
        seconds = time.perf_counter() - start - session.record_seconds
        done = sorted(session.finished, key=lambda s: s.index)
        failed = [s.error for s in done if s.error is not None]
        if failed:
            raise failed[0]
        return session, done, {"before": before, "seconds": seconds, "prefill_seconds": session.prefill_seconds}

    def _stats(self, done: list[Sequence], timing: dict) -> RunStats:
        return RunStats.between(timing["before"], self.parts.cache.figures(),
                                new_tokens=sum(len(s.generated) for s in done),
                                prompt_tokens=sum(len(s.prompt) for s in done), seconds=timing["seconds"],
                                prefill_seconds=timing["prefill_seconds"], resident_bytes=self.parts.resident_bytes)

    def run(self, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
            seed: int | None = None) -> ManyOutput:
        check_request(prompts, max_new_tokens, self.engine.max_positions)
        sequences = [Sequence(i, list(p), max_new_tokens, Sampler(temperature, seed)) for i, p in enumerate(prompts)]
        session, done, timing = self._drive(sequences)
        return ManyOutput(sequences=[s.generated for s in done], stats=self._stats(done, timing),
                          activated_experts_per_batch=float(np.mean(session.distinct)) if session.distinct else 0.0,
                          decode_forwards=len(session.distinct),
                          activated_experts_per_token=sum(session.distinct) / sum(session.fed) if session.fed else 0.0,
                          schedule_seconds=session.schedule_seconds,
                          schedule_wait_seconds=session.schedule_wait,
                          forecast_accuracy=session.accuracy.result() if session.accuracy.batches else None)

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                 seed: int | None = None) -> GenerationOutput:
        """The prompts as one static batch (see `LoopSettings`): transformers' `generate`, step for step."""
        if not self.settings.static or self.batch_size < len(prompts):
            raise ValueError("generate runs its prompts as one static batch: BatchRunner(static=True, batch_size=N)")
        check_request(prompts, max_new_tokens, self.engine.max_positions)
        sampler = Sampler(temperature, seed)  # one draw per step for the whole batch, as transformers samples
        record = self.settings.record_routing
        sequences = [Sequence(i, list(p), max_new_tokens, sampler, routing=[] if record else None)
                     for i, p in enumerate(prompts)]
        _, done, timing = self._drive(sequences)
        return GenerationOutput(prompt_ids=[s.prompt for s in done], sequences=[s.generated for s in done],
                                stats=self._stats(done, timing),
                                routing=[np.concatenate(s.routing) for s in done] if record else None,
                                last_logits=self.last_logits)

    # ---- the step's operations ----------------------------------------------------------------
    def admit(self, waiting: deque[Sequence], live: int) -> list[Batch]:
        """Prefill waiting sequences into free places of a unit, B at a time."""
        joining = [waiting.popleft() for _ in range(min(self.batch_size * self.unit - live, len(waiting)))]
        return [self._prefill(joining[i:i + self.batch_size]) for i in range(0, len(joining), self.batch_size)]

    def _prefill(self, members: list[Sequence]) -> Batch:
        logits, kv, routing = self.engine.prefill([s.prompt for s in members])
        for seq, rows in zip(members, routing):
            seq.last_routing = rows[-1]
            if seq.routing is not None:
                seq.routing.append(rows)
        if self._predicts:
            states, _ = self.engine.predictor.start_rows([s.prompt for s in members])
            for seq, state in zip(members, states):
                seq.rpp_state = state
        return Batch(members, kv, logits)

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
            if self.settings.static:
                if self._sample_static(batch, eos):
                    kept.append(batch)
                else:
                    finished.extend(batch.members)
                continue
            rows = []
            for row, seq in enumerate(batch.members):
                if seq.cancelled:
                    seq.finish_reason = "cancelled"
                else:
                    _append(seq, int(seq.sampler(batch.logits[row : row + 1])[0]), eos)
                if seq.finish_reason is None:
                    rows.append(row)
                else:
                    finished.append(seq)
            if len(rows) == len(batch.members):
                kept.append(batch)
            elif rows:
                kept.append(Batch([batch.members[r] for r in rows], select(batch.kv, rows)))
        return kept

    def _sample_static(self, batch: Batch, eos: set[int]) -> bool:
        """A static batch's step: one draw over every row (as transformers samples), kept by the rows still
        running; whether any still runs. The batch's last logits are the run's."""
        tokens = batch.members[0].sampler(batch.logits).tolist()
        for seq, token in zip(batch.members, tokens):
            if seq.finish_reason is None:
                _append(seq, token, eos)
        self.last_logits = batch.logits
        return any(seq.finish_reason is None for seq in batch.members)

    def record_last(self, batch: Batch) -> None:
        """A recording static batch's last forward: each row's last token through the model (a trace holds the
        routing of every generated token), kept for the rows whose last token was not fed."""
        unfed = [row for row, s in enumerate(batch.members) if s.fed < len(s.generated)]
        planned = [batch.members[row] for row in unfed] if self.engine.plans_fed_rows else batch.members
        self._predict(planned)
        routing = self._forward(batch, [s.generated[-1] for s in batch.members], planned)[1]
        for row in unfed:
            batch.members[row].routing.append(routing[row][None])

    def _check(self, batch: Batch) -> None:
        """`engine.check_logits` over the batch's running rows, each at its own step."""
        members = batch.members
        done = torch.tensor([s.finish_reason is not None for s in members], device=batch.logits.device)
        check_logits(batch.logits, [len(s.generated) for s in members],
                     lambda row: self.engine.nonfinite_layer(members[row].prompt, members[row].generated), done)

    def regroup(self, batches: list[Batch]) -> list[Batch]:
        """Predict each live sequence's routing, schedule, and move the KV rows to the new batches."""
        members = [seq for b in batches for seq in b.members]
        self._predict(self._planned(members))
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
        """Forward each member's newest token; a static batch's finished rows feed padding."""
        fed = [row for row, s in enumerate(batch.members) if s.fed < len(s.generated)]
        tokens = [s.generated[-1] if row in fed else self.parts.pad_token_id for row, s in enumerate(batch.members)]
        planned = self._planned(batch.members)
        probs, routing = self._forward(batch, tokens, planned)
        routing = routing[fed]  # (fed rows, L, K)
        for row, r in zip(fed, routing):
            seq = batch.members[row]
            seq.fed, seq.last_routing = len(seq.generated), r
            if seq.routing is not None:
                seq.routing.append(r[None])
        distinct = len({(layer, int(e)) for r in routing for layer, experts in enumerate(r) for e in experts})
        return BatchRun(distinct, routing, probs if len(planned) == len(fed) else None)

    def _planned(self, members: list[Sequence]) -> list[Sequence]:
        """The members whose forecasts the batch's next forward plans from: every one of a dynamic batch; of a
        static batch the running rows, or (an encoder-decoder runner) the rows that feed a generated token."""
        if self.engine.plans_fed_rows:
            return [s for s in members if s.fed < len(s.generated)]
        return [s for s in members if s.finish_reason is None]

    def _forward(self, batch: Batch, tokens: list[int], planned: list[Sequence]
                 ) -> tuple[np.ndarray | None, np.ndarray]:
        """One decode forward of the batch on `tokens` (a row each), the cache planning from the forecasts of
        `planned`: those forecasts (rows, L, E) or None, and the forward's routing (rows of tokens, L, K)."""
        probs = np.stack([s.forecast for s in planned]) if planned and planned[0].forecast is not None else None
        forecast = None
        if probs is not None and self.parts.policy.uses_forecast:
            forecast = self.engine.plan_forecast(probs)
        batch.logits, batch.kv, routing = self.engine.decode(tokens, batch.kv, forecast)
        return probs, routing


def generate(engine: DecoderRunner, input_ids: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
             seed: int | None = None, record_routing: bool = False) -> GenerationOutput:
    """Prompts through the step loop as one static batch: one sequence, or transformers' batched `generate`,
    step for step (FIFO, no pipeline); `record_routing` keeps every token's routing, as a trace does."""
    runner = BatchRunner(engine, scheduler_class("fifo")(), max(len(input_ids), 1), unit=1, pipeline=False,
                         static=True, record_routing=record_routing)
    return runner.generate(input_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)


def _append(seq: Sequence, token: int, eos: set[int]) -> None:
    """A sampled token joins its sequence (streamed to its listener), and the sequence may finish with it."""
    seq.generated.append(token)
    if seq.on_token is not None:
        seq.on_token(seq, token)
    seq.finish_reason = _finish_reason(seq, eos)


def _finish_reason(seq: Sequence, eos: set[int]) -> str | None:
    if seq.cancelled:
        return "cancelled"
    if seq.generated and seq.generated[-1] in eos:
        return "stop"
    if len(seq.generated) >= seq.max_new_tokens:
        return "length"
    return None
