"""`expertflow serve`: the OpenAI-compatible HTTP server (needs the `serve` extra: fastapi, uvicorn)."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from expertflow.cli.options import add_engine_options, apply_threads, engine_config
from expertflow.cli.report import print_note
from expertflow.config import parse_size
from expertflow.errors import ExpertflowError
from expertflow.scheduler import SERVE_SCHEDULERS  # not from expertflow.server: --help works without the serve extra

if TYPE_CHECKING:
    from expertflow.server import ServeConfig
    from expertflow.server.trace_recorder import RecordingConfig

API_KEY_ENV = "EXPERTFLOW_API_KEY"   # read when --api-key is not given, as vLLM reads VLLM_API_KEY


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_engine_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port to listen on, taken before the model loads so that one in use fails at once "
                             "(default 8000)")
    parser.add_argument("--scheduler", choices=SERVE_SCHEDULERS, default="fifo",
                        help="token scheduler regrouping the running requests each step (default fifo)")
    parser.add_argument("--max-batch-size", type=int, default=8, metavar="B",
                        help="sequences per batch; two units of two batches run at once, so up to 4B requests "
                             "decode together (default 8)")
    parser.add_argument("--replicas", type=int, default=None, metavar="N",
                        help="run N engine replicas as Ray actors behind this server, each with its own expert "
                             "cache (needs the ray extra)")
    parser.add_argument("--placement", choices=("routing", "round-robin"), default=None,
                        help="with --replicas, which replica runs a request: routing (the one whose running "
                             "requests use the experts the --predictor forecasts for it; round-robin without a "
                             "predictor) or round-robin (default routing)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require the header `Authorization: Bearer KEY` on every path but /health; without "
                             f"the flag the key is read from {API_KEY_ENV} (default: none, the server is open)")
    parser.add_argument("--max-request-bytes", default=None, metavar="SIZE",
                        help="largest request body, e.g. 4MiB or 4194304; a larger one is refused unread with "
                             "a 413 (default 4MiB)")
    parser.add_argument("--record-traces", type=Path, default=None, metavar="FILE",
                        help="write the routing of the requests served to FILE, a trace file the predictor can go "
                             "on training on (train-predictor --init-predictor DIR --traces FILE)")
    parser.add_argument("--record-traces-max-bytes", default=None, metavar="SIZE",
                        help="with --record-traces: rotate FILE to FILE.1 once it would pass SIZE, e.g. 64MiB "
                             "(default 64MiB)")
    parser.add_argument("--record-traces-keep", type=int, default=None, metavar="K",
                        help="with --record-traces: rotated files kept, FILE.1 (newest) to FILE.K (default 3)")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --record-traces: start a new recording over an existing FILE (its rotations "
                             "FILE.1... are never replaced)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from expertflow.server import build_service
        from expertflow.server.app import create_app
        from expertflow.server.trace_recorder import check_recording
    except ImportError as exc:
        raise ExpertflowError(f"serve needs the serve extra ({exc.name} is missing): "
                              "pip install 'expertflow-moe[serve]'") from exc
    from expertflow.api import ExpertflowModel

    apply_threads(args.threads)
    config = _serve_config(args)
    if args.replicas is None and args.placement is not None:
        raise ExpertflowError("--placement places requests across replicas: it needs --replicas N")
    if config.recording is not None:
        if args.replicas is not None:
            raise ExpertflowError("--record-traces records the routing of the local engine; it does not run with "
                                  "--replicas")
        check_recording(config.recording, args.overwrite)  # before the model loads, not after
    # The listening socket is made before the model loads and handed to uvicorn: a port in use fails in a
    # moment rather than after the load, and as the socket is held from then on, nothing can take the port
    # meanwhile (a bind test that closed its socket would leave that race). Connections made during the load
    # wait in the backlog and are answered once the app starts.
    with listen(config.host, config.port) as sock:
        model = ExpertflowModel(engine_config(args))
        print_note(model.budget_note)
        try:
            service = build_service(model, config) if args.replicas is None else _replica_service(model, config, args)
            server = uvicorn.Server(uvicorn.Config(create_app(service, config), host=config.host, port=config.port,
                                                   log_level=args.log_level))
            server.run(sockets=[sock])
        finally:
            model.close()
    return 0


def _serve_config(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig the flags ask for; the key comes from the environment when no flag gives one."""
    from expertflow.server import ServeConfig

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    limit = {} if args.max_request_bytes is None else {"max_request_bytes": parse_size(args.max_request_bytes)}
    try:
        return ServeConfig(host=args.host, port=args.port, scheduler=args.scheduler,
                           max_batch_size=args.max_batch_size, api_key=api_key, recording=_recording(args), **limit)
    except ValueError as exc:
        raise ExpertflowError(str(exc)) from exc


def _recording(args: argparse.Namespace) -> RecordingConfig | None:
    """The RecordingConfig --record-traces and its options ask for, or None."""
    from expertflow.server.trace_recorder import RecordingConfig

    given = {} if args.record_traces_max_bytes is None else {"max_bytes": parse_size(args.record_traces_max_bytes)}
    if args.record_traces_keep is not None:
        given["keep"] = args.record_traces_keep
    if args.record_traces is None:
        if given:
            raise ExpertflowError("--record-traces-max-bytes and --record-traces-keep size a recording: they need "
                                  "--record-traces FILE")
        return None
    return RecordingConfig(args.record_traces, **given)


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port, set up as uvicorn sets up its own (SO_REUSEADDR, so a port left in
    TIME_WAIT by a previous server is taken at once, and IPv6 for a host with a colon)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)   # uvicorn's default backlog
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ExpertflowError(f"port {port} on {host} is in use; pass --port N with a free port, or stop the "
                                  "server listening there") from exc
        raise ExpertflowError(f"cannot listen on {host} port {port}: {exc.strerror or exc}; pass another --host "
                              "or --port") from exc
    return sock


def _replica_service(model, config, args: argparse.Namespace):
    """The service over Ray replicas; Ray is imported only here, so a plain `serve` never loads it."""
    try:
        from expertflow.distributed.replicas import ReplicaConfig, build_replica_service
    except ImportError as exc:
        raise ExpertflowError(f"--replicas needs the ray extra ({exc.name} is missing): "
                              "pip install 'expertflow-moe[ray]'") from exc
    placement = {} if args.placement is None else {"placement": args.placement}
    try:
        replica_config = ReplicaConfig(replicas=args.replicas, threads=args.threads, **placement)
    except ValueError as exc:
        raise ExpertflowError(str(exc)) from exc
    service = build_replica_service(model, config, replica_config)
    if service.loop.placement.name != replica_config.placement:
        print(f"serve: placing requests {service.loop.placement.name} (routing-aware placement needs --predictor)",
              file=sys.stderr)
    return service
