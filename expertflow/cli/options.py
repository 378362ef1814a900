"""Engine flags shared by every command that runs a model, the config they build, and torch's threads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from expertflow.config import DTYPES, STORE_NAMES, EngineConfig, parse_size
from expertflow.errors import ExpertflowError
from expertflow.cache.policies import POLICIES, cli_settings, setting_names


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint directory or hub id (default: the embedded tiny-mixtral-32e)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--cache-experts", type=int, default=None, metavar="N", help="fast-tier expert slots")
    budget.add_argument("--cache-bytes", type=str, default=None, metavar="SIZE",
                        help="fast-tier budget for experts, e.g. 2GiB, 300MB")
    budget.add_argument("--memory-budget", type=str, default=None, metavar="SIZE",
                        help="fast-tier budget for the whole model, e.g. 2GiB: the non-expert weights, then as "
                             "many expert slots as fit")
    parser.add_argument("--policy", choices=sorted(POLICIES), default=None,
                        help="cache policy (default: none without a budget, lru with one)")
    parser.add_argument("--store", choices=STORE_NAMES, default=None,
                        help="slow tier for experts (default: disk on a CPU device, whose fast tier is RAM itself; "
                             "host RAM on CUDA)")
    add_page_cache_option(parser)
    parser.add_argument("--device", default="cpu", help="compute device: cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="weights' dtype (default auto: the checkpoint's own, as transformers loads it)")
    parser.add_argument("--predictor", type=Path, default=None, metavar="DIR",
                        help="trained routing predictor (RPP) the expertflow policy plans from")
    parser.add_argument("--transfer-ratio", type=float, default=None, metavar="X",
                        help="prefetches issued per layer window (default: no limit)")
    parser.add_argument("--prefetch-threshold", type=float, default=None, metavar="P",
                        help="policy expertflow: the forecast probability worth a prefetch (default 0.5; lower "
                             "prefetches more: more hits, more loads)")
    parser.add_argument("--policy-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a cache policy knob, repeatable: lead=3 (expertflow's PLECConfig: "
                             f"{setting_names('expertflow')})")
    parser.add_argument("--io-threads", type=int, default=1, metavar="N",
                        help="expert transfers run at once by policies that prefetch (ring, pregated, "
                             "expertflow); lru and lfu load on demand, one at a time (default 1)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads for the engine (default: torch's own choice)")


def add_page_cache_option(parser: argparse.ArgumentParser) -> None:
    """The disk store's one page-cache choice, the same name and default in every command."""
    parser.add_argument("--page-cache", action="store_true",
                        help="let disk reads go through the OS page cache (default: bypass it, so the budget bounds "
                             "the memory a run takes and a fetch really reads the disk: O_DIRECT where the file "
                             "system allows, else posix_fadvise DONTNEED after each read)")
    parser.add_argument("--disk-direct", action="store_true", help=argparse.SUPPRESS)  # the default since 0.2


def page_cache(args: argparse.Namespace) -> bool:
    if args.disk_direct:
        print("expertflow: note: --disk-direct is the default now (reads bypass the page cache) and will be removed; "
              "drop it, or pass --page-cache for the opposite", file=sys.stderr)
        if args.page_cache:
            raise ExpertflowError("--disk-direct and --page-cache ask for opposite reads; pass one")
    return args.page_cache


def engine_config(args: argparse.Namespace) -> EngineConfig:
    model = {"model": args.model} if args.model is not None else {}
    return EngineConfig(
        **model,
        cache_experts=args.cache_experts,
        cache_bytes=parse_size(args.cache_bytes) if args.cache_bytes is not None else None,
        memory_budget=parse_size(args.memory_budget) if args.memory_budget is not None else None,
        policy=args.policy, store=args.store, device=args.device, dtype=args.dtype,
        predictor=args.predictor, transfer_ratio=args.transfer_ratio, page_cache=page_cache(args),
        io_threads=args.io_threads, policy_settings=cli_settings(args.prefetch_threshold, args.policy_setting),
    )


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads when --threads was given, before the model loads.

    A process setting, not part of EngineConfig: torch's OpenMP workers spin-wait between ops, so on a
    busy machine a tiny model runs far faster on one thread than on torch's default of one per core."""
    if threads is None:
        return
    if threads < 1:
        raise ExpertflowError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
