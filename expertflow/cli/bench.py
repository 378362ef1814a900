"""`expertflow bench`: the paper's evaluation in one command, every system side by side.

Each (system, cache size, batch size) run decodes the same prompts greedily in a fresh subprocess;
results.json, results.md and PNG plots land in --out (a new or empty directory, or any with --overwrite:
other files there stay); the table is printed, and with --json a final
JSON line carries the figures.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from expertflow.bench.costs import measure_expert_costs
from expertflow.bench.harness import run_bench
from expertflow.bench.plots import write_plots
from expertflow.bench.report import (COLUMNS, PIPELINE_COLUMNS, VERSUS_COLUMNS, json_line, pipeline_rows, table_rows,
                                     title, versus_rows, write_results)
from expertflow.bench.spec import ENGINE_SCHEDULERS, BenchConfig, CacheSize
from expertflow.bench.systems import SYSTEMS
from expertflow.cli.options import (add_decoding_options, add_device_options, add_model_option,
                                    add_policy_setting_options, add_predictor_option, add_sweep_options,
                                    add_threads_option, apply_threads, comma_list, model_or_embedded, page_cache)
from expertflow.cli.report import print_json_line, print_table
from expertflow.config import default_store
from expertflow.datasets import load_prompts
from expertflow.embedded import shipped_predictor_for
from expertflow.errors import ExpertflowError
from expertflow.hub import resolve_model
from expertflow.outputs import check_output_dir
from expertflow.cache.policies import cli_settings
from expertflow.widen import widen_checkpoint

DEFAULT_SYSTEMS = "all-in-memory,accelerate,lru,ring,pregated,expertflow"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="every system side by side: throughput, memory, hit ratio")
    add_model_option(p)
    p.add_argument("--dataset", default="alpaca", help="prompt set name or file (default alpaca)")
    p.add_argument("--prompts", type=int, default=16, help="number of prompts (default 16)")
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="skip the dataset's first N prompts (default 0; alpaca from 800 on is held out from the "
                        "shipped RPP's training)")
    add_decoding_options(p, sampling=False)  # every system decodes greedily: their tokens are compared
    add_sweep_options(p, batch_size="1,4,16", cache_experts="10%,25%", memory_budget=True)
    p.add_argument("--systems", type=comma_list("--systems"), default=DEFAULT_SYSTEMS, metavar="NAME[,NAME...]",
                   help=f"comma-separated from {', '.join(SYSTEMS)} (default {DEFAULT_SYSTEMS})")
    add_device_options(p)  # page cache bypassed by default: the engine reads with O_DIRECT, accelerate runs in a
                           # memory cgroup that bounds its page cache
    add_predictor_option(p)
    p.add_argument("--scheduler", default=None, choices=ENGINE_SCHEDULERS,
                   help="token scheduler of the expertflow system (default exhaustive: exact for units of up to "
                        "2 x 9, swap above)")
    add_policy_setting_options(p)  # the expertflow systems' PLEC
    p.add_argument("--schedule-unit", type=int, default=2, help="batches regrouped together (default 2)")
    p.add_argument("--widen", type=int, default=None, metavar="N",
                   help="bench a zero-padded copy with expert intermediate size N (cached under --widen-dir)")
    p.add_argument("--widen-dir", type=Path, default=None,
                   help="where widened copies are kept (default ~/.cache/expertflow/widened)")
    add_threads_option(p)  # each run's process sets the same
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="run the whole sweep N times, one after another, and report each point's median run "
                        "(this machine's speed drifts; default 1)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for results and plots")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing --out: replace bench's files (results.*, *.png), keep any others")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    p.set_defaults(func=run)


def _cache_sizes(args: argparse.Namespace) -> list[CacheSize]:
    if args.memory_budget is not None:
        return [CacheSize.parse(s, whole_tier=True) for s in args.memory_budget]
    return [CacheSize.parse(s) for s in args.cache_experts]


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, args.overwrite)  # before the sweep, which writes partial results as it goes
    # Resolved once: each step below and each run's subprocess read the directory.
    args.model = resolve_model(model_or_embedded(args.model))
    model = _widened(args) if args.widen is not None else args.model
    apply_threads(args.threads)
    prompts = _prompt_ids(model, args.dataset, args.prompts, args.skip)  # bad input fails before any timing
    costs = measure_expert_costs(model) if (args.store or default_store(args.device)) == "disk" else None
    config = BenchConfig(
        model=model, systems=list(args.systems), cache_sizes=_cache_sizes(args),
        batch_sizes=list(args.batch_size), out=args.out, store=args.store, device=args.device,
        page_cache=page_cache(args), dtype=args.dtype, predictor=_predictor(args),
        **({"scheduler": args.scheduler} if args.scheduler else {}), schedule_unit=args.schedule_unit,
        max_new_tokens=args.max_new_tokens, threads=args.threads, io_threads=args.io_threads, repeats=args.repeats,
        policy_settings=cli_settings(args.prefetch_threshold, args.policy_setting), dataset=args.dataset,
        notes={"prompts_skipped": args.skip, "widened_to": args.widen,
               "expert_costs": costs.as_dict() if costs else None})
    doc = run_bench(config, prompts,
                    checkpoint=lambda partial: write_results(partial, config.out))
    write_results(doc, config.out)
    write_plots(doc, config.out)
    print_table(title(doc), COLUMNS, table_rows(doc))
    if pipeline := pipeline_rows(doc):
        print_table("token scheduler (TS) and routing predictor", PIPELINE_COLUMNS, pipeline)
    if against := versus_rows(doc):
        print_table("expertflow against every system", VERSUS_COLUMNS, against)
    print(f"results, table and plots in {config.out}")
    if args.json:
        print_json_line(json_line(doc))
    return 0


def _predictor(args: argparse.Namespace) -> Path | None:
    """--predictor, else the shipped RPP when the model is the embedded one or a widened copy of it: widening pads
    experts with zeros and leaves the routing exactly as it was, so a widened copy plans from the same predictor."""
    return args.predictor if args.predictor is not None else shipped_predictor_for(args.model)


def _widened(args: argparse.Namespace) -> Path:
    """The model widened to --widen N, made once and reused (widen writes its directory atomically)."""
    root = args.widen_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "expertflow" / "widened"
    target = root / f"{args.model.name}-i{args.widen}"
    return target if target.is_dir() else widen_checkpoint(args.model, target, args.widen)


def _prompt_ids(model: Path, dataset: str, count: int, skip: int = 0) -> list[list[int]]:
    from transformers import AutoTokenizer

    if count < 1:
        raise ExpertflowError(f"--prompts must be at least 1, got {count}")
    if skip < 0:
        raise ExpertflowError(f"--skip must be >= 0, got {skip}")
    if not any((model / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ExpertflowError(f"{model} has no tokenizer files; bench needs text prompts tokenized by the model")
    prompts = load_prompts(dataset, limit=count, skip=skip)
    if not prompts:
        raise ExpertflowError(f"dataset {dataset!r} has no prompts after skipping {skip}; lower --skip")
    tokenizer = AutoTokenizer.from_pretrained(model)
    return [list(tokenizer(p)["input_ids"]) for p in prompts]

