"""`expertflow serve`: an OpenAI-compatible HTTP server over the batched, scheduled engine.

Parts: `loop.EngineLoop` (the engine thread that owns a StepLoop), `service.Service` (requests to
sequences and events to responses), `app.create_app` (the routes), and with `--record-traces` a
`trace_recorder.TraceRecorder`. `build_service` wires them."""

from __future__ import annotations

from dataclasses import dataclass, field

from expertflow.api import ExpertflowModel
from expertflow.engine.steps import BatchRunner
from expertflow.scheduler import SERVE_SCHEDULERS, scheduler_class
from expertflow.server.loop import EngineLoop
from expertflow.server.metrics import ServerMetrics
from expertflow.server.service import Service
from expertflow.server.trace_recorder import RecordingConfig, TraceRecorder, served_header


@dataclass(frozen=True)
class ServeConfig:
    """How the server batches: scheduling units of two batches of `max_batch_size` sequences, two units in
    flight, so up to 4 x max_batch_size requests decode at once; the rest wait and join as slots free.

    With `api_key`, every path but /health needs `Authorization: Bearer <api_key>`; a request body over
    `max_request_bytes` is refused with a 413. With `recording`, the routing of the requests served is written
    to a trace file (`trace_recorder`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    scheduler: str = "fifo"
    max_batch_size: int = 8
    api_key: str | None = field(default=None, repr=False)   # kept out of reprs and so out of logs
    max_request_bytes: int = 4 * 2**20
    recording: RecordingConfig | None = None

    def __post_init__(self) -> None:
        if self.scheduler not in SERVE_SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SERVE_SCHEDULERS)}, got {self.scheduler!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"max batch size must be at least 1, got {self.max_batch_size}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.api_key is not None:
            _check_api_key(self.api_key)
        if self.max_request_bytes < 1024:
            raise ValueError(f"max request bytes must be at least 1024 (1 KiB), got {self.max_request_bytes}; "
                             "write a size like 4MiB")


def _check_api_key(key: str) -> None:
    """The message never quotes the key."""
    if not key:
        raise ValueError("the API key is empty: pass a non-empty --api-key KEY, or leave it out to serve without a key")
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise ValueError(f"the API key ({len(key)} characters) must be printable ASCII without spaces, as "
                         "clients send it in an `Authorization: Bearer KEY` header")


def build_service(model: ExpertflowModel, config: ServeConfig, runner: BatchRunner | None = None,
                  recorder: TraceRecorder | None = None) -> Service:
    """A service over `model` batching and recording as `config` says; `runner` replaces the default
    BatchRunner (tests pass one whose batches fail), `recorder` the one `config.recording` asks for (tests pass
    one whose writes stall)."""
    if runner is None:
        runner = BatchRunner(model.engine, scheduler_class(config.scheduler)(), config.max_batch_size, unit=2)
    if recorder is None and config.recording is not None:
        recorder = TraceRecorder(config.recording, served_header(model))
    metrics = ServerMetrics(recording=None if recorder is None else recorder.figures)
    return Service(model, EngineLoop(runner, recorder), metrics)
