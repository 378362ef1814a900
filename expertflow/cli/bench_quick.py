"""`expertflow bench-quick`: all-in-memory vs per-layer LRU at 25% and 10% of experts, host and disk stores.

Every configuration runs the same real prompts in one process, side by side, after a warm-up; the table
reports tokens/s relative to all-in-memory, and a check that every configuration produced the same tokens.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from expertflow.api import ExpertflowModel
from expertflow.cli.options import (add_decoding_options, add_model_option, add_threads_option, apply_threads,
                                    model_or_embedded)
from expertflow.cli.report import print_json_line, print_table
from expertflow.config import EngineConfig, human_bytes
from expertflow.datasets import load_prompts
from expertflow.hub import resolve_model


@dataclass(frozen=True)
class QuickRun:
    policy: str
    store: str
    cache_fraction: float | None  # None: every expert resident

    @property
    def label(self) -> str:
        size = "all" if self.cache_fraction is None else f"{self.cache_fraction:.0%}"
        return f"{self.policy} {size} {self.store}"


RUNS = (
    QuickRun("none", "host", None), QuickRun("none", "disk", None),
    QuickRun("lru", "host", 0.25), QuickRun("lru", "disk", 0.25),
    QuickRun("lru", "host", 0.10), QuickRun("lru", "disk", 0.10),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench-quick", help="tokens/s and peak expert memory: all-in-memory vs lru")
    add_model_option(parser)
    parser.add_argument("--dataset", default="alpaca", help="prompt set name or file (default alpaca)")
    parser.add_argument("--prompts", type=int, default=8, help="number of prompts (default 8)")
    add_decoding_options(parser, sampling=False)  # greedy: every configuration's tokens are compared
    add_threads_option(parser)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    prompts = load_prompts(args.dataset, limit=args.prompts)
    model = resolve_model(model_or_embedded(args.model))  # once, not per configuration: a hub id may need the network
    results: list[dict] = []
    for spec in tqdm(RUNS, desc="bench-quick", unit="config", disable=None):
        sizes = (results[0]["all_experts"], results[0]["min_experts"]) if results else None
        results.append(_measure(spec, model, prompts, args.max_new_tokens, sizes))
    reference = results[0]
    same = all(r["token_ids"] == reference["token_ids"] for r in results)
    rows = [(r["system"], r["cache_experts"], f"{r['tokens_per_s']:.1f}",
             f"{r['tokens_per_s'] / reference['tokens_per_s']:.2f}x", f"{r['hit_ratio']:.3f}", r["expert_loads"],
             human_bytes(r["peak_expert_bytes"])) for r in results]
    print_table(f"bench-quick: {len(prompts)} {args.dataset} prompts x {args.max_new_tokens} tokens, batch 1 "
                f"(same tokens: {same})",
                ("system", "cache experts", "tokens/s", "vs all-in-memory", "hit ratio", "loads", "peak expert bytes"),
                rows)
    if args.json:
        print_json_line({"same_tokens": same, "results": [{k: v for k, v in r.items() if k != "token_ids"}
                                                          for r in results]})
    return 0


def _measure(spec: QuickRun, model_dir: Path, prompts: list[str], max_new_tokens: int,
             sizes: tuple[int, int] | None) -> dict:
    """Run one configuration; `sizes` = (all experts, minimum cache) from the all-in-memory run."""
    capacity = None
    if spec.cache_fraction is not None:
        total, minimum = sizes
        capacity = max(round(total * spec.cache_fraction), minimum)
    model = ExpertflowModel(EngineConfig(model=model_dir, cache_experts=capacity, policy=spec.policy,
                                         store=spec.store))
    ids = [model.encode(p) for p in prompts]
    model.generate(input_ids=ids[:1], max_new_tokens=4)  # warm-up: first-call allocations, lazy inits
    outs = [model.generate(input_ids=[p], max_new_tokens=max_new_tokens) for p in ids]
    seconds = sum(o.stats.seconds for o in outs)
    tokens = sum(o.stats.new_tokens for o in outs)
    hits, corrections = sum(o.stats.hits for o in outs), sum(o.stats.correction_loads for o in outs)
    return {
        "system": spec.label, "policy": spec.policy, "store": spec.store,
        "cache_experts": outs[-1].stats.cache_experts, "tokens_per_s": tokens / seconds,
        "hit_ratio": hits / (hits + corrections) if hits + corrections else 1.0,
        "expert_loads": sum(o.stats.expert_loads for o in outs),
        "peak_expert_bytes": outs[-1].stats.peak_expert_bytes, "all_expert_bytes": outs[-1].stats.all_expert_bytes,
        "all_experts": model.num_moe_layers * model.num_experts, "min_experts": model.num_moe_layers * model.top_k,
        "token_ids": [o.sequences[0] for o in outs],
    }
