"""`expertflow serve`: the OpenAI-compatible HTTP server (needs the `serve` extra: fastapi, uvicorn)."""

from __future__ import annotations

import argparse
import sys

from expertflow.cli.options import add_engine_options, apply_threads, engine_config
from expertflow.errors import ExpertflowError

SERVE_SCHEDULERS = ("fifo", "similarity", "swap", "exhaustive")  # kept equal to expertflow.server.SERVE_SCHEDULERS by a test


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_engine_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
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
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from expertflow.server import ServeConfig, build_service
        from expertflow.server.app import create_app
    except ImportError as exc:
        raise ExpertflowError(f"serve needs the serve extra ({exc.name} is missing): "
                              "pip install 'expertflow-moe[serve]'") from exc
    from expertflow.api import ExpertflowModel

    apply_threads(args.threads)
    try:
        config = ServeConfig(host=args.host, port=args.port, scheduler=args.scheduler,
                             max_batch_size=args.max_batch_size)
    except ValueError as exc:
        raise ExpertflowError(str(exc)) from exc
    if args.replicas is None and args.placement is not None:
        raise ExpertflowError("--placement places requests across replicas: it needs --replicas N")
    model = ExpertflowModel(engine_config(args))
    try:
        service = build_service(model, config) if args.replicas is None else _replica_service(model, config, args)
        uvicorn.run(create_app(service), host=config.host, port=config.port, log_level=args.log_level)
    finally:
        model.close()
    return 0


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
