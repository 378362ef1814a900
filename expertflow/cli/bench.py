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

import torch

from expertflow.bench.costs import measure_expert_costs
from expertflow.bench.harness import run_bench
from expertflow.bench.plots import write_plots
from expertflow.bench.report import (COLUMNS, PIPELINE_COLUMNS, VERSUS_COLUMNS, json_line, pipeline_rows, table_rows,
                                     title, versus_rows, write_results)
from expertflow.bench.spec import ENGINE_SCHEDULERS, BenchConfig, CacheSize
from expertflow.bench.systems import SYSTEMS
from expertflow.cli.options import add_page_cache_option, page_cache
from expertflow.cli.report import print_json_line, print_table
from expertflow.config import DTYPES, STORE_NAMES, default_store
from expertflow.datasets import load_prompts
from expertflow.embedded import EMBEDDED_MODEL_DIR, shipped_predictor_for
from expertflow.errors import ExpertflowError
from expertflow.hub import resolve_model
from expertflow.outputs import check_output_dir
from expertflow.cache.policies import cli_settings, setting_names
from expertflow.widen import widen_checkpoint

DEFAULT_SYSTEMS = "all-in-memory,accelerate,lru,ring,pregated,expertflow"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="every system side by side: throughput, memory, hit ratio")
    p.add_argument("--model", default=EMBEDDED_MODEL_DIR,
                   help="checkpoint directory or hub id (default: the embedded tiny-mixtral-32e)")
    p.add_argument("--dataset", default="alpaca", help="prompt set name or file (default alpaca)")
    p.add_argument("--prompts", type=int, default=16, help="number of prompts (default 16)")
    p.add_argument("--skip", type=int, default=0, metavar="N",
                   help="skip the dataset's first N prompts (default 0; alpaca from 800 on is held out from the "
                        "shipped RPP's training)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--cache-experts", default=None, help="fast-tier slots, counts or %% of experts: 10%%,64 "
                       "(default 10%%,25%%)")
    sizes.add_argument("--memory-budget", default=None, metavar="SIZES",
                       help="whole fast-tier budgets instead, sizes or %% of the all-in-memory footprint: 10%%,200MiB; "
                            "the non-expert weights come first, the rest buys expert slots")
    p.add_argument("--batch-size", default="1,4,16", help="sequences decoded together: 1,4,16")
    p.add_argument("--systems", default=DEFAULT_SYSTEMS, help=f"comma-separated from {', '.join(SYSTEMS)}")
    p.add_argument("--store", choices=STORE_NAMES, default=None,
                   help="slow tier for engine systems (default: disk on a CPU device, host RAM on CUDA)")
    p.add_argument("--device", default="cpu", help="compute device of every system: cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="every system's weights (default auto: the checkpoint's own, as transformers loads it)")
    add_page_cache_option(p)  # bypassed by default: the engine reads with O_DIRECT, accelerate runs in a memory
                              # cgroup that bounds its page cache
    p.add_argument("--predictor", type=Path, default=None, metavar="DIR",
                   help="RPP for the expertflow system (default for the embedded model and its widened copies: "
                        "its shipped RPP)")
    p.add_argument("--scheduler", default=None, choices=ENGINE_SCHEDULERS,
                   help="token scheduler of the expertflow system (default exhaustive: exact for units of up to "
                        "2 x 9, swap above)")
    p.add_argument("--prefetch-threshold", type=float, default=None, metavar="P",
                   help="the expertflow system's forecast probability worth a prefetch (default 0.5)")
    p.add_argument("--policy-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="a knob of the expertflow system's cache policy, repeatable: lead=3 (PLECConfig: "
                        f"{setting_names('expertflow')})")
    p.add_argument("--schedule-unit", type=int, default=2, help="batches regrouped together (default 2)")
    p.add_argument("--widen", type=int, default=None, metavar="N",
                   help="bench a zero-padded copy with expert intermediate size N (cached under --widen-dir)")
    p.add_argument("--widen-dir", type=Path, default=None,
                   help="where widened copies are kept (default ~/.cache/expertflow/widened)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: steadier ratios)")
    p.add_argument("--io-threads", type=int, default=1, metavar="N",
                   help="expert transfers at once for engine systems whose policy prefetches (default 1)")
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
        return [CacheSize.parse(s, whole_tier=True) for s in _names(args.memory_budget)]
    return [CacheSize.parse(s) for s in _names(args.cache_experts or "10%,25%")]


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, args.overwrite)  # before the sweep, which writes partial results as it goes
    args.model = resolve_model(args.model)  # once: each step below and each run's subprocess read the directory
    model = _widened(args) if args.widen is not None else args.model
    torch.set_num_threads(max(args.threads, 1))
    prompts = _prompt_ids(model, args.dataset, args.prompts, args.skip)  # bad input fails before any timing
    costs = measure_expert_costs(model) if (args.store or default_store(args.device)) == "disk" else None
    config = BenchConfig(
        model=model, systems=_names(args.systems), cache_sizes=_cache_sizes(args),
        batch_sizes=[_int(b, "--batch-size") for b in _names(args.batch_size)], out=args.out, store=args.store, device=args.device,
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


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ExpertflowError(f"{flag} takes whole numbers like 1,4,16; got {text!r}") from None
