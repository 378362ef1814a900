"""`expertflow inspect`: a conformance report of a checkpoint, or a one-line error naming what is unsupported."""

from __future__ import annotations

import argparse
from expertflow.cache.policies import POLICIES
from expertflow.cli.options import add_model_option, model_or_embedded
from expertflow.cli.report import print_json_line, print_table
from expertflow.config import human_bytes
from expertflow.conformance import inspect_model


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="report architecture, experts, checkpoint layout, minimum cache")
    add_model_option(parser)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the report")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = model_or_embedded(args.model)
    report = inspect_model(model)
    minimum = ", ".join(f"{name} {n}" for name, n in report.min_cache_experts.items() if name in POLICIES)
    rows = [
        ("architecture", f"{report.architecture} ({report.model_type})"),
        ("layers", _layers(report)),
        ("experts", f"{report.experts_per_layer} per layer, top-{report.top_k}"),
        ("expert bytes", f"{human_bytes(report.expert_bytes)} each, {human_bytes(report.all_expert_bytes)} in all"),
        ("resident bytes", f"{human_bytes(report.resident_bytes)} (non-expert weights)"),
        ("checkpoint", f"{report.checkpoint_layout} experts, {report.checkpoint_dtype}, "
                       + (f"sharded ({report.shards} files)" if report.sharded else "single file")),
        ("minimum cache", f"{minimum} experts"),
    ]
    print_table(f"{model}", ("figure", "value"), rows)
    if args.json:
        print_json_line(report.as_dict())
    return 0


def _layers(report) -> str:
    if len(report.stacks) == 1:
        return (f"{report.layers}: MoE {_ranges(report.moe_layers)}"
                + (f", dense {_ranges(report.dense_layers)}" if report.dense_layers else ""))
    # Encoder-decoder: MoE layers (cache keys) are numbered over the stacks' sparse blocks in order.
    return "; ".join(f"{s['name']} {s['blocks']} blocks, MoE blocks {_ranges(s['moe_blocks'])} "
                     f"= layers {_ranges(s['moe_layers'])}" for s in report.stacks)


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'"""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(f"{start}" if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts) or "none"
