"""The `expertflow` command: one subcommand per module, each with a `register(subparsers)` function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from expertflow.errors import ExpertflowError

# Each module registers its subcommands; the order here is the order in `expertflow --help`.
_COMMAND_MODULES = ("generate", "serve", "inspect_model", "perplexity", "bench", "bench_quick", "widen", "trace", "predictor", "schedule", "simulate")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="expertflow", description="Run MoE models with offloaded experts.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"expertflow.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # a value an option's type refuses is an ExpertflowError too (cli.options)
        return int(args.func(args) or 0)
    except ExpertflowError as exc:
        print(f"expertflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("expertflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
