"""`expertflow generate`: one prompt through the offloaded engine, then the run's figures."""

from __future__ import annotations

import argparse

from expertflow.api import ExpertflowModel, check_prompt
from expertflow.cli.options import add_engine_options, engine_config
from expertflow.cli.report import human_bytes, print_json_line, print_table
from expertflow.stats import RunStats


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text with offloaded experts")
    add_engine_options(parser)
    parser.add_argument("--prompt", required=True, help="input text")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_prompt(args.prompt)  # before the model loads: a typo should not cost a load
    config = engine_config(args)
    model = ExpertflowModel(config)
    ids = model.encode(args.prompt)
    out = model.generate(input_ids=[ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         seed=args.seed)
    text = model.decode(out.sequences[0])
    print(text)
    print_table(f"{model.name}, {config.policy}, {config.store}", ("figure", "value"),
                figure_rows(out.stats))
    if args.json:
        print_json_line({"text": text, "token_ids": out.sequences[0], "policy": config.policy,
                         "store": config.store, **out.stats.as_dict()})
    return 0


def figure_rows(stats: RunStats) -> list[tuple[str, str]]:
    return [
        ("new tokens", f"{stats.new_tokens}"),
        ("tokens/s", f"{stats.tokens_per_s:.1f}"),
        ("hit ratio", f"{stats.hit_ratio:.3f}"),
        ("expert loads", f"{stats.expert_loads}"),
        ("prefetch loads / hits / wasted", f"{stats.prefetch_loads} / {stats.prefetch_hits} / {stats.wasted_prefetches}"),
        ("correction (demand) loads", f"{stats.correction_loads}"),
        ("transfer wait", f"{stats.transfer_wait_seconds:.3f} s"),
        ("bytes moved", human_bytes(stats.bytes_moved)),
        ("cache slots", f"{stats.cache_experts} x {human_bytes(stats.expert_bytes)}"),
        ("peak expert bytes", human_bytes(stats.peak_expert_bytes)),
        ("all expert bytes", human_bytes(stats.all_expert_bytes)),
    ]
