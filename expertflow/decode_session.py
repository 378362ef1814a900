"""One run of the batched step loop over a changing set of sequences, as a session.

`batching.BatchRunner` holds the step's operations (admit, sample, regroup, run a batch); a
`DecodeSession` holds one run's state (waiting, live and finished sequences, the plans in flight) and
drives those operations, so `BatchRunner.run` (a fixed prompt list) and a server (which adds requests
while others decode) run the same loop.

Dual-batch pipeline (paper section 3.3.4): two units are in flight; while one unit's batches run on the
model, a worker thread predicts and schedules the other, so that cost is hidden behind compute.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from expertflow.predictor.metrics import MetricAccumulator, routing_mask

if TYPE_CHECKING:  # batching imports this module to open sessions; only the annotations name its classes
    from expertflow.batching import Batch, BatchRunner, Sequence


class DecodeSession:
    """One run of the step loop over a changing set of sequences: `add` any time (from the loop's thread),
    `round()` runs one decode step of every unit in flight. Use as a context manager."""

    def __init__(self, runner: BatchRunner) -> None:
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
        self._plans: dict[int, Future] = {}    # unit -> its regrouped batches, being planned on the worker
        self._live: dict[int, list[Sequence]] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expertflow-schedule")

    def __enter__(self) -> DecodeSession:
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
    def round(self) -> None:
        """Each unit in turn: wait for its plan, run its batches, sample, and hand it back to the worker,
        which then plans it while the next unit runs. A batch (or a unit's plan) that fails finishes only
        its own sequences, with finish_reason "error"; the others go on."""
        for u in range(self.runner.depth):
            batches = self._planned(u)
            self._advance(u, [batch for batch in batches if self._ran(batch)])

    def _planned(self, u: int) -> list[Batch]:
        if u not in self._plans:
            return []
        try:
            return self._wait(self._plans.pop(u))
        except Exception as exc:  # the worker failed to predict or regroup this unit
            self._fail(self._live.pop(u, []), exc)
            return []

    def _ran(self, batch: Batch) -> bool:
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
            batches = batches + self.runner.admit(self.waiting, sum(len(b.members) for b in batches))
            batches = self.runner.sample(batches, self.finished)
            if batches or not self.waiting:
                break
        self._live[u] = [s for b in batches for s in b.members]
        if batches:
            self._plans[u] = self._worker.submit(self._timed_regroup, batches)

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
