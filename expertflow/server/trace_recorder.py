"""Recording the routing of served requests (`serve --record-traces FILE`), so a deployment's predictor can go
on training on its own traffic: `expertflow train-predictor --init-predictor DIR --traces FILE ...`.

The engine thread hands each finished request to `TraceRecorder.offer`, which never blocks: a bounded queue,
and a request that finds it full is dropped and counted. A writer thread rewrites the recording whole
(`TraceSet.write`: a temp file, then a rename) every `flush_sequences` requests or `flush_seconds`, and on
close. A file that would pass `max_bytes` is rotated, FILE -> FILE.1 -> ... -> FILE.keep; the recorder renames
and deletes only files it wrote itself.

Shape legend: T tokens, L MoE layers, K top_k.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from expertflow.engine.sequence import Sequence
from expertflow.errors import ExpertflowError
from expertflow.outputs import check_output_file
from expertflow.trace_collection import TraceableModel, TracingConfig, trace_header
from expertflow.traces import TraceHeader, TraceSequence, TraceSet

log = logging.getLogger(__name__)

DATASET = "served"   # the header's dataset of a recording
_FILE_OVERHEAD = 1024   # bytes of a trace file beside its tensors' (the safetensors and trace headers), about


@dataclass(frozen=True)
class RecordingConfig:
    """Where and how much: the recording goes to `path`, rotated once a file would pass `max_bytes`, keeping
    `keep` older files (path.1 newest ... path.keep oldest)."""

    path: Path
    max_bytes: int = 64 * 2**20
    keep: int = 3
    flush_sequences: int = 64     # write once this many requests wait ...
    flush_seconds: float = 30.0   # ... or this long after the first of them came
    queue_size: int = 1024        # requests waiting for the writer; more are dropped, never waited for

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.max_bytes < 4096:
            raise ValueError(f"the recording's max bytes must be at least 4096 (4 KiB), got {self.max_bytes}; "
                             "write a size like 64MiB")
        if self.keep < 0:
            raise ValueError(f"the recording keeps 0 or more rotated files, got {self.keep}")
        if self.flush_sequences < 1 or self.flush_seconds <= 0 or self.queue_size < 1:
            raise ValueError(f"flush_sequences and queue_size must be >= 1 and flush_seconds > 0, got "
                             f"{self.flush_sequences}, {self.queue_size} and {self.flush_seconds}")

    def slot(self, j: int) -> Path:
        """The recording (j = 0) or its j-th rotation."""
        return self.path if j == 0 else self.path.with_name(f"{self.path.name}.{j}")


def check_recording(config: RecordingConfig, overwrite: bool) -> None:
    """Before the model loads: FILE is new, or replaced with `overwrite`; its rotation slots hold nothing, as
    the recorder never replaces a file it did not write."""
    check_output_file(config.path, overwrite, "--record-traces")
    for j in range(1, config.keep + 1):
        if os.path.lexists(config.slot(j)):
            raise ExpertflowError(f"--record-traces {config.path}: {config.slot(j)} exists where the recording "
                                  "rotates to, and the recorder never replaces a file it did not write; move it "
                                  "away or choose a new path")


def served_header(model: TraceableModel) -> TraceHeader:
    """The header of a recording of `model`'s served requests: runs 1, no seed, max_new_tokens 0 (each request
    has its own); the temperature is set per file (`TraceRecorder`)."""
    return dataclasses.replace(trace_header(model, TracingConfig(DATASET, max_new_tokens=0)), seed=None)


@dataclass(frozen=True)
class _Served:
    """What the engine thread hands over: the tokens it fed and their routing rows."""

    index: int
    prompt: list[int]
    fed: list[int]                 # the generated tokens fed to the model (all but the last of a finished one)
    routing: list[np.ndarray]      # (rows, L, K) arrays, a row per token of prompt + fed
    temperature: float


_STOP = object()


class TraceRecorder:
    def __init__(self, config: RecordingConfig, header: TraceHeader) -> None:
        self.config = config
        self.header = header
        self._queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self._current: list[tuple[TraceSequence, float]] = []   # FILE's sequences and their temperatures
        self._bytes = _FILE_OVERHEAD    # FILE's size once written, about
        self._unwritten = 0             # of _current, sequences not in FILE yet
        self._written: set[Path] = set()   # files of ours on disk: the only ones rotation renames or replaces
        self._stopping = False
        self._lock = threading.Lock()
        self._figures = dict.fromkeys(("offered", "dropped", "sequences", "writes", "rotations", "write_errors",
                                       "file_bytes"), 0)
        self._thread = threading.Thread(target=self._run, name="expertflow-trace-recorder", daemon=True)

    # ---- called from other threads --------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is left and stop; waits at most `timeout` seconds for a stuck writer."""
        if not self._thread.is_alive():
            return
        self._stopping = True
        try:
            self._queue.put_nowait(_STOP)
        except queue.Full:   # the writer sees `_stopping` once it has drained the queue
            pass
        self._thread.join(timeout)

    def offer(self, seq: Sequence) -> None:
        """Hand over a finished sequence (on the engine thread); never blocks. The tokens fed to the model are
        recorded: the prompt, then every generated token but one not fed (a finished sequence's last)."""
        rows = sum(len(r) for r in seq.routing or [])
        if rows != len(seq.prompt) + seq.fed or rows == 0:
            if rows:
                log.warning("request %d: %d routing rows for %d tokens fed; not recorded", seq.index, rows,
                            len(seq.prompt) + seq.fed)
            return
        item = _Served(seq.index, list(seq.prompt), seq.generated[:seq.fed], seq.routing, seq.sampler.temperature)
        self._count(offered=1)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._count(offered=-1, dropped=1)

    def figures(self) -> dict:
        """For /metrics: requests recorded (written to the files), dropped (the writer was behind, or a write
        failed), waiting to be written, files written, rotations, write errors, and FILE's size."""
        with self._lock:
            f = dict(self._figures)
        waiting = f.pop("offered") - f["sequences"]
        return {"path": str(self.config.path), **f, "waiting": waiting}

    # ---- the writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        pending: list[_Served] = []
        deadline = math.inf
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, min(deadline - time.monotonic(), 1.0)))
            except queue.Empty:
                item = None
            if isinstance(item, _Served):
                pending.append(item)
                deadline = min(deadline, time.monotonic() + self.config.flush_seconds)
            stop = item is _STOP or (self._stopping and self._queue.empty())
            if pending and (stop or len(pending) >= self.config.flush_sequences or time.monotonic() >= deadline):
                try:
                    self._record(pending)
                except OSError:   # a rotation's rename failed: the server goes on, and so does the recording
                    log.exception("could not rotate the trace recording %s", self.config.path)
                    self._count(write_errors=1)
                pending, deadline = [], math.inf
            if stop:
                return

    def _record(self, served: list[_Served]) -> None:
        for item in served:
            seq = TraceSequence(np.asarray(item.prompt), np.asarray(item.fed), np.concatenate(item.routing),
                                prompt_index=item.index)
            size = seq.token_ids.nbytes + seq.routing.nbytes + 4 * 8   # + its four int64 per-sequence entries
            if self._current and self._bytes + size > self.config.max_bytes:
                self._write_current()
                self._rotate()
            self._current.append((seq, item.temperature))
            self._bytes += size
            self._unwritten += 1
        self._write_current()

    def _write_current(self) -> None:
        if not self._unwritten:
            return
        temperatures = {t for _, t in self._current}   # one float in the format: nan when requests differed
        header = dataclasses.replace(self.header, temperature=temperatures.pop() if len(temperatures) == 1
                                     else math.nan)
        path = self.config.path
        try:
            self._write(TraceSet(header, [s for s, _ in self._current]), path)
            self._written.add(path)
            size = path.stat().st_size
        except OSError:   # a full disk: the server goes on; these sequences are retried with the next write
            log.exception("could not write the trace recording %s", path)
            self._count(write_errors=1)
            return
        self._count(sequences=self._unwritten, writes=1)
        with self._lock:
            self._figures["file_bytes"] = size
        self._unwritten = 0

    def _write(self, traces: TraceSet, path: Path) -> None:
        traces.write(path)

    def _rotate(self) -> None:
        """FILE -> FILE.1 -> ... -> FILE.keep, each rename replacing the next (so our oldest goes); FILE itself is
        replaced by the next write. A slot holding a file we did not write (one put there while serving) ends
        the chain before it, so that file is never replaced."""
        slots = [self.config.slot(j) for j in range(self.config.keep + 1)]
        foreign = [j for j in range(1, len(slots)) if os.path.lexists(slots[j]) and slots[j] not in self._written]
        if foreign:
            log.warning("%s is no rotation of this recording; rotating short of it", slots[foreign[0]])
            slots = slots[:foreign[0]]
        lost, self._current, self._bytes, self._unwritten = self._unwritten, [], _FILE_OVERHEAD, 0
        self._count(rotations=1, dropped=lost, offered=-lost)   # a failed write's sequences
        for src, dst in zip(reversed(slots[:-1]), reversed(slots[1:])):
            if src in self._written:
                os.replace(src, dst)
                self._written.discard(src)
                self._written.add(dst)

    def _count(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                self._figures[name] += n
