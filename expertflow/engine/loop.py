"""The step loop: one run of the batched decode loop over a changing set of sequences.

Every front end runs it: `generate` (its prompts as one static batch, FIFO, no pipeline), `--prompts-file`,
`serve` (requests added while others decode), `trace` and encoder-decoder models. `step()` reads in the paper's
order (Fig. 1): predict and schedule, plan and prefetch, run, sample and admit. The operations live in
`steps.BatchRunner`; this module holds one run's state (waiting, live and finished sequences, the plans in flight).
Dual-batch pipeline (paper 3.3.4): two units in flight, one predicted and scheduled on a worker while the other runs.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch

from expertflow.predictor.metrics import MetricAccumulator, routing_mask

from expertflow.engine.sequence import Batch, BatchRun, LoopSettings, Sequence


class StepOperations(Protocol):
    """The step's operations the loop drives (`steps.BatchRunner`)."""

    depth: int                # units in flight: 2 with the dual-batch pipeline, else 1
    settings: LoopSettings
    parts: object             # the loaded model's parts (`loading.OffloadedModel`)
    engine: object            # the model runner

    def admit(self, waiting: deque[Sequence], live: int) -> list[Batch]: ...
    def sample(self, batches: list[Batch], finished: list[Sequence]) -> list[Batch]: ...
    def regroup(self, batches: list[Batch]) -> list[Batch]: ...
    def run_batch(self, batch: Batch) -> BatchRun: ...
    def record_last(self, batch: Batch) -> None: ...


class StepLoop:
    """One run of the step loop over a changing set of sequences: `add` any time (from the loop's thread),
    `step()` runs one decode step of every unit in flight. Use as a context manager."""

    def __init__(self, runner: StepOperations) -> None:
        self.runner = runner
        self.waiting: deque[Sequence] = deque()
        self.finished: list[Sequence] = []
        self.distinct: list[int] = []          # distinct (layer, expert) pairs of each decode batch forward
        self.fed: list[int] = []               # tokens (rows) each decode batch forward fed
        adapter = runner.parts.adapter
        # the forecasts' batch-level accuracy against the routing each decode batch then executed
        self.accuracy = MetricAccumulator(len(runner.parts.layers), adapter.top_k, budget=None)
        self.schedule_seconds = 0.0
        self.schedule_wait = 0.0
        self.prefill_seconds = 0.0             # admitting sequences: their prompts' forwards
        self.record_seconds = 0.0              # a recording static batch's last forward (no step of the run)
        self._plans: dict[int, Future] = {}    # unit -> its regrouped batches, being planned on the worker
        self._live: dict[int, list[Sequence]] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expertflow-schedule")

    def __enter__(self) -> StepLoop:
        self.runner.engine.recorder.enabled = True
        return self

    def __exit__(self, *exc) -> None:
        self.runner.engine.recorder.enabled = False
        self._worker.shutdown(wait=True, cancel_futures=True)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self._plans)

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step of each unit in flight, in the paper's order: its plan (predicted and scheduled on
        the worker while the other unit ran) is taken, each batch runs (the cache plans and prefetches from the
        batch's forecast as the forward starts), then the unit samples, admits waiting sequences into free
        places and goes back to be predicted and scheduled. A batch (or a unit's plan) that fails finishes only
        its own sequences, with finish_reason "error"; the others go on."""
        for u in range(self.runner.depth):
            batches = self._planned(u)        # predict + schedule (done on the worker while the other unit ran)
            ran = []
            for batch in batches:
                if self._run(batch):          # plan/prefetch + run: the cache plans from the batch's forecast
                    ran.append(batch)
            self._advance(u, ran)             # sample + admit, then hand the unit back to be planned

    def _planned(self, u: int) -> list[Batch]:
        if u not in self._plans:
            return []
        try:
            return self._wait(self._plans.pop(u))
        except Exception as exc:  # the worker failed to predict or regroup this unit
            self._fail(self._live.pop(u, []), exc)
            return []

    def _run(self, batch: Batch) -> bool:
        """Run one batch; False if it failed (its sequences are finished with the error)."""
        try:
            ran = self.runner.run_batch(batch)
        except Exception as exc:  # a fault inside the engine: this batch's sequences fail, the rest go on
            self._fail(batch.members, exc)
            return False
        self.distinct.append(ran.distinct)
        self.fed.append(len(ran.routing))
        if ran.forecast is not None:
            self.accuracy.add(routing_mask(ran.routing, ran.forecast.shape[-1]), ran.forecast)
        return True

    def _fail(self, sequences: list[Sequence], exc: Exception) -> None:
        for seq in sequences:
            seq.finish_reason, seq.error = "error", exc
            self.finished.append(seq)

    def abort(self) -> list[Sequence]:
        """Drop every sequence in flight or waiting (after a failure) and return them; the session stays usable."""
        for plan in self._plans.values():
            plan.cancel()
        dropped = list(self.waiting) + [s for seqs in self._live.values() for s in seqs]
        self.waiting.clear()
        self._plans.clear()
        self._live.clear()
        return dropped

    def _advance(self, u: int, batches: list[Batch]) -> None:
        """Sample unit u's next tokens (admitting waiting sequences into free places first), then hand the
        unit to the worker to be predicted and regrouped; a unit with nothing left to run goes idle."""
        while True:
            t0 = time.perf_counter()
            batches = batches + self.runner.admit(self.waiting, sum(len(b.members) for b in batches))
            self.prefill_seconds += time.perf_counter() - t0
            running = self.runner.sample(batches, self.finished)
            self._record_ended(batches, running)
            batches = running
            if batches or not self.waiting:
                break
        self._live[u] = [s for b in batches for s in b.members]
        if not batches:
            return
        if self.runner.depth == 1:  # nothing runs meanwhile: plan in line
            plan: Future = Future()
            try:
                plan.set_result(self._timed_regroup(batches))
            except Exception as exc:  # as a worker's failure would, it fails this unit only
                plan.set_exception(exc)
            self._plans[u] = plan
        else:
            self._plans[u] = self._worker.submit(self._timed_regroup, batches)

    def _record_ended(self, before: list[Batch], running: list[Batch]) -> None:
        """A recording static batch that just ended takes one more forward for its last tokens' routing."""
        if not self.runner.settings.record_routing:
            return
        for batch in before:
            if all(batch is not r for r in running) and all(s.error is None for s in batch.members):
                t0 = time.perf_counter()
                self.runner.record_last(batch)
                self.record_seconds += time.perf_counter() - t0

    def _wait(self, plan: Future) -> list[Batch]:
        t0 = time.perf_counter()
        batches = plan.result()  # re-raises a failure of the worker here, in the caller
        self.schedule_wait += time.perf_counter() - t0
        return batches

    def _timed_regroup(self, batches: list[Batch]) -> list[Batch]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            regrouped = self.runner.regroup(batches)
        self.schedule_seconds += time.perf_counter() - t0
        return regrouped
