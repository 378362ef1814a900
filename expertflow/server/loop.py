"""The engine thread: it owns one `StepLoop` and is the only thread that runs the model.

HTTP handlers (on the asyncio loop) hand it sequences and calls through a thread-safe inbox; between two
rounds it takes everything waiting there, so a request that arrives while others decode joins at the next
step. Tokens and outcomes go back through each request's `Listener`, which crosses to asyncio with
`loop.call_soon_threadsafe`. A failure inside a step fails the requests in flight (`session.abort()`),
and the loop goes on serving. With a `TraceRecorder`, each request's routing is kept and its finished
sequence handed to the recorder (never waited for)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from expertflow.engine.steps import BatchRunner, Sequence
from expertflow.engine.loop import StepLoop
from expertflow.server.metrics import cache_figures
from expertflow.server.scoring import token_logprobs
from expertflow.server.trace_recorder import TraceRecorder

log = logging.getLogger(__name__)


class Listener(Protocol):
    """Where one sequence's outcome goes; every method is called on the engine thread."""

    def on_token(self, seq: Sequence, token: int) -> None: ...

    def on_finish(self, seq: Sequence) -> None: ...

    def on_error(self, seq: Sequence, exc: BaseException) -> None: ...


@dataclass
class _Add:
    seq: Sequence
    listener: Listener


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future


_STOP = object()


class EngineLoop:
    def __init__(self, runner: BatchRunner, recorder: TraceRecorder | None = None) -> None:
        self.runner = runner
        self.recorder = recorder
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: dict[int, Listener] = {}   # sequence index -> its listener, while in the session
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="expertflow-engine", daemon=True)

    # ---- called from any thread ----------------------------------------------------------------
    def start(self) -> None:
        if self.recorder is not None:
            self.recorder.start()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout)
        if self.recorder is not None:  # after the engine thread: it has handed over every finished request
            self.recorder.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def running(self) -> int:
        """Work handed to the engine and not yet done: sequences waiting, prefilling or decoding, and queued
        scoring calls (each belongs to a request still running)."""
        return len(self._listeners) + self._inbox.qsize()

    def next_index(self) -> int:
        return next(self._ids)

    def add(self, seq: Sequence, listener: Listener) -> None:
        """Queue a sequence; it joins the running batches at the next step."""
        seq.on_token = listener.on_token
        if self.recorder is not None:
            seq.routing = []  # the engine appends the routing of each token it feeds
        self._inbox.put(_Add(seq, listener))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between two rounds (the model is not safe to share across threads)."""
        future: Future = Future()
        self._inbox.put(_Call(fn, future))
        return future

    async def score(self, ids: list[int]) -> torch.Tensor:
        return await asyncio.wrap_future(self.call(lambda: token_logprobs(self.runner.engine, ids)))

    async def cache_report(self) -> dict:
        return cache_figures(self.runner.engine.parts.cache.figures())

    async def report(self) -> dict:
        return {}

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        with self.runner.session() as session:
            while self._take_inbox(session, block=not session.busy):
                if session.busy:
                    self._round(session)

    def _take_inbox(self, session: StepLoop, block: bool) -> bool:
        """Admit queued sequences and run queued calls; False once asked to stop. Blocks only when idle."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is _STOP:
                self._fail_all(session.abort(), RuntimeError("the server is shutting down"))
                return False
            if isinstance(item, _Add):
                self._listeners[item.seq.index] = item.listener
                session.add(item.seq)
            else:
                self._run_call(item)

    def _round(self, session: StepLoop) -> None:
        try:
            session.step()
        except Exception as exc:  # a failure inside the engine: fail what was in flight, keep serving
            log.exception("engine round failed; failing the requests in flight")
            self._deliver(session)
            self._fail_all(session.abort(), exc)
            return
        self._deliver(session)

    def _deliver(self, session: StepLoop) -> None:
        for seq in session.finished:
            listener = self._listeners.pop(seq.index)
            if seq.error is not None:  # its batch failed inside the engine; the session went on
                log.error("request %d failed in the engine: %s", seq.index, seq.error)
                listener.on_error(seq, seq.error)
            else:
                listener.on_finish(seq)
                if self.recorder is not None:  # not a failed one: NaN logits or a fault make its routing suspect
                    self.recorder.offer(seq)
        session.finished.clear()

    def _fail_all(self, dropped: list[Sequence], exc: BaseException) -> None:
        for seq in dropped:
            self._listeners.pop(seq.index).on_error(seq, exc)

    @staticmethod
    def _run_call(call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn())
        except Exception as exc:  # re-raised where the caller awaits the future
            call.future.set_exception(exc)
