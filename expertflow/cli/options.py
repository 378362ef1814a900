"""The CLI's one vocabulary: every option more than one command takes is declared here once (its name, default,
choices and help), in groups a command picks from; the engine config they build; torch's threads.

Groups: model and engine (`add_model_option`, `add_device_options`, `add_engine_options` for a single run), cache
and policy (`add_cache_options`, `add_predictor_option`, `add_policy_setting_options`), sweeps as comma lists
(`add_sweep_options`, read by `comma_list`), threads (`add_threads_option`), decoding (`add_decoding_options`).
A value the parser refuses fails as one line (`expertflow: error: ...`), as every other bad input does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from expertflow.cache.policies import POLICY_NAMES, cli_settings, policy_names_help, setting_names
from expertflow.config import DTYPES, STORE_NAMES, EngineConfig, parse_size
from expertflow.embedded import EMBEDDED_MODEL_DIR
from expertflow.errors import ExpertflowError

T = TypeVar("T")


# Model and engine.

def add_model_option(parser: argparse.ArgumentParser, role: str = "") -> None:
    """--model, the same in every command: None is the embedded model (see `model_or_embedded`)."""
    parser.add_argument("--model", default=None,
                        help=f"{role}checkpoint directory or hub id (default: the embedded tiny-mixtral-32e)")


def model_or_embedded(model: str | None) -> str | Path:
    return EMBEDDED_MODEL_DIR if model is None else model


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """A command that runs the engine once (generate, serve): the model, its budget and policy, where experts live
    and what they compute in, torch's threads."""
    add_model_option(parser)
    add_cache_options(parser)
    add_device_options(parser)
    add_threads_option(parser)


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """Where experts live and what the model computes in and on: the same in generate, serve and bench."""
    parser.add_argument("--store", choices=STORE_NAMES, default=None,
                        help="slow tier for experts (default: disk on a CPU device, whose fast tier is RAM itself; "
                             "host RAM on CUDA)")
    add_page_cache_option(parser)
    parser.add_argument("--device", default="cpu", help="compute device: cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="weights' dtype (default auto: the checkpoint's own, as transformers loads it)")
    parser.add_argument("--io-threads", type=int, default=1, metavar="N",
                        help="expert transfers run at once by policies that prefetch (ring, pregated, plec); lru "
                             "and lfu load on demand, one at a time (default 1)")


# Cache and policy.

def add_cache_options(parser: argparse.ArgumentParser) -> None:
    """One run's fast-tier budget (one of three) and its cache policy."""
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--cache-experts", type=int, default=None, metavar="N", help="fast-tier expert slots")
    budget.add_argument("--cache-bytes", type=str, default=None, metavar="SIZE",
                        help="fast-tier budget for experts, e.g. 2GiB, 300MB")
    budget.add_argument("--memory-budget", type=str, default=None, metavar="SIZE",
                        help="fast-tier budget for the whole model, e.g. 2GiB: the non-expert weights, then as "
                             "many expert slots as fit")
    parser.add_argument("--policy", choices=POLICY_NAMES, default=None, metavar="NAME",
                        help=f"cache policy: {policy_names_help()} (default: none without a budget, lru with one)")
    add_predictor_option(parser)
    parser.add_argument("--transfer-ratio", type=float, default=None, metavar="X",
                        help="prefetches issued per layer window (default: no limit)")
    add_policy_setting_options(parser)


def add_predictor_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictor", type=Path, default=None, metavar="DIR",
                        help="trained routing predictor (RPP) that policy plec (expertflow) plans from (default for "
                             "the embedded model and its widened copies: the RPP shipped with it)")


def add_policy_setting_options(parser: argparse.ArgumentParser) -> None:
    """PLEC's knobs, in every command that runs it: generate, serve, simulate and bench (its expertflow systems)."""
    parser.add_argument("--prefetch-threshold", type=float, default=None, metavar="P",
                        help="policy plec (expertflow): the forecast probability worth a prefetch (default 0.5; lower "
                             "prefetches more: more hits, more loads)")
    parser.add_argument("--policy-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="a cache policy knob, repeatable: lead=3 (plec's PLECConfig: "
                             f"{setting_names('plec')})")


# Sweeps: comma lists, one point each.

def comma_list(flag: str, read: Callable[[str], T] = str) -> Callable[[str], tuple[T, ...]]:
    """The argparse type of a sweep flag: comma-separated items, each read by `read` (which raises ValueError
    with the rest of a sentence after the flag); a bad item is a one-line error naming the flag."""
    def parse(text: str) -> tuple[T, ...]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise ExpertflowError(f"{flag} is empty; give comma-separated values")
        try:
            return tuple(read(item) for item in items)
        except ValueError as exc:
            raise ExpertflowError(f"{flag} {exc}") from None
    return parse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"takes positive whole numbers, comma-separated like 1,4,16; got {text!r}")
    return value


def count_or_share(text: str) -> str:
    """'26' slots or '10%' of every expert, checked; resolved against the model by the command."""
    if text.endswith("%"):
        _percent(text)
    else:
        try:
            positive_int(text)
        except ValueError:
            raise ValueError(f"takes slot counts or shares of every expert, comma-separated like 26,10%; "
                             f"got {text!r}") from None
    return text


def size_or_share(text: str) -> str:
    """'200MiB' or '10%' of the all-in-memory footprint, checked; resolved against the model by the command."""
    if text.endswith("%"):
        _percent(text)
    else:
        try:
            ok = parse_size(text) >= 1
        except ExpertflowError:
            ok = False
        if not ok:
            raise ValueError(f"takes sizes or shares of the all-in-memory footprint, comma-separated like "
                             f"200MiB,10%; got {text!r}")
    return text


def _percent(text: str) -> float:
    try:
        share = float(text[:-1])
    except ValueError:
        share = -1.0
    if not 0 < share <= 100:
        raise ValueError(f"{text!r}: a percentage must be in (0, 100]")
    return share


def add_sweep_options(parser: argparse.ArgumentParser, batch_size: str, cache_experts: str | None = None,
                      memory_budget: bool = False, schedule_unit: str | None = None) -> None:
    """A sweep command's points (bench, simulate, schedule-eval), each flag a comma list read by `comma_list`. The
    defaults are the command's own sweep (a live bench point costs a run of every system, a replay almost nothing);
    --cache-experts and --schedule-unit are added only where a default is given, and `memory_budget` adds
    --memory-budget as the alternative to --cache-experts."""
    parser.add_argument("--batch-size", type=comma_list("--batch-size", positive_int), default=batch_size,
                        metavar="B[,B...]", help=f"sequences decoded together, one point each (default {batch_size})")
    if schedule_unit is not None:
        parser.add_argument("--schedule-unit", type=comma_list("--schedule-unit", positive_int),
                            default=schedule_unit, metavar="U[,U...]",
                            help=f"batches regrouped together, one point each (default {schedule_unit})")
    if cache_experts is None:
        return
    sizes = parser.add_mutually_exclusive_group() if memory_budget else parser
    sizes.add_argument("--cache-experts", type=comma_list("--cache-experts", count_or_share), default=cache_experts,
                       metavar="N[,N...]", help="fast-tier expert slots, one point each: counts or shares of every "
                                                f"expert, like 26,10%% (default {cache_experts.replace('%', '%%')})")
    if memory_budget:
        sizes.add_argument("--memory-budget", type=comma_list("--memory-budget", size_or_share), default=None,
                           metavar="SIZE[,SIZE...]",
                           help="whole fast-tier budgets instead, one point each: sizes or shares of the "
                                "all-in-memory footprint, like 200MiB,10%%; the non-expert weights come first, the "
                                "rest buys expert slots")


# Threads and decoding.

def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """--threads, with one default in every command."""
    parser.add_argument("--threads", type=_threads, default="auto", metavar="N|auto",
                        help="torch CPU threads (default auto: torch's own choice, one per core, as transformers, "
                             "vLLM and llama.cpp use them; 1 is much faster for a tiny model on a busy machine, where "
                             "torch's idle threads spin-wait between ops, and keeps a bench's ratios steady)")


def _threads(text: str) -> int:
    """--threads N, or auto: torch's choice as the command starts (before anything has set it)."""
    if text == "auto":
        return torch.get_num_threads()
    try:
        threads = int(text)
    except ValueError:
        raise ExpertflowError(f"--threads takes a number >= 1 or auto, got {text!r}") from None
    if threads < 1:
        raise ExpertflowError(f"--threads must be >= 1, got {threads}")
    return threads


def add_decoding_options(parser: argparse.ArgumentParser, sampling: bool = True) -> None:
    """How long each sequence decodes and, with `sampling`, at which temperature (bench and bench-quick decode
    greedily)."""
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                        help="new tokens per sequence (default 32)")
    if sampling:
        parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")


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
    """Set torch's intra-op threads (--threads; None leaves them), before the model loads.

    A process setting, not part of EngineConfig: torch's OpenMP workers spin-wait between ops, so on a
    busy machine a tiny model runs far faster on one thread than on torch's default of one per core."""
    if threads is None:
        return
    if threads < 1:
        raise ExpertflowError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
