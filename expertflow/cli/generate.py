"""`expertflow generate`: a prompt (or a file of prompts, batched and scheduled) through the offloaded
engine, then the run's figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from expertflow.api import ExpertflowModel, check_prompt
from expertflow.cli.options import add_decoding_options, add_engine_options, apply_threads, engine_config
from expertflow.cli.report import print_json_line, print_note, print_table
from expertflow.config import human_bytes
from expertflow.datasets import load_prompts
from expertflow.engine.sampling import check_temperature
from expertflow.errors import ExpertflowError
from expertflow.scheduler import SCHEDULERS
from expertflow.stats import RunStats


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text with offloaded experts")
    add_engine_options(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="input text")
    source.add_argument("--prompts-file", type=Path, metavar="FILE",
                        help="many prompts: jsonl with a `prompt` field, or one prompt per line")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch with --prompts-file")
    parser.add_argument("--scheduler", choices=tuple(SCHEDULERS), default="fifo",
                        help="token scheduler regrouping sequences between batches (default fifo)")
    parser.add_argument("--schedule-unit", type=int, default=2, metavar="U",
                        help="batches regrouped together (default 2, as in the paper)")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="one unit at a time: predict and schedule in line instead of on a worker")
    add_decoding_options(parser)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    check_temperature(args.temperature)  # before the model loads, like the prompt
    if args.prompts_file is not None:
        return run_many(args)
    check_prompt(args.prompt)  # before the model loads: a typo should not cost a load
    config = engine_config(args)
    model = ExpertflowModel(config)
    print_note(model.budget_note)
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


def run_many(args: argparse.Namespace) -> int:
    prompts = load_prompts(str(args.prompts_file))
    if not prompts:
        raise ExpertflowError(f"{args.prompts_file} holds no prompts; write one per line or a `prompt` field per row")
    config = engine_config(args)
    model = ExpertflowModel(config)
    print_note(model.budget_note)
    out = model.generate_many(prompts, batch_size=args.batch_size, scheduler=args.scheduler,
                              schedule_unit=args.schedule_unit, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, seed=args.seed, pipeline=not args.no_pipeline)
    texts = [model.decode(ids) for ids in out.sequences]
    for i, text in enumerate(texts):
        print(f"[{i}] {text!r}")
    rows = [("prompts", f"{len(prompts)} in units of {args.schedule_unit} x {args.batch_size}, {args.scheduler}"),
            ("activated experts / batch", f"{out.activated_experts_per_batch:.2f}"),
            ("activated experts / token", f"{out.activated_experts_per_token:.2f}"),
            ("decode batch forwards", f"{out.decode_forwards}"),
            *_accuracy_rows(out.forecast_accuracy),
            ("predict + schedule time", f"{out.schedule_seconds:.3f} s ({out.schedule_wait_seconds:.3f} s not hidden)"),
            *figure_rows(out.stats)]
    print_table(f"{model.name}, {config.policy}, {config.store}", ("figure", "value"), rows)
    if args.json:
        print_json_line({"outputs": out.sequences, "texts": texts, "scheduler": args.scheduler,
                         "batch_size": args.batch_size, "schedule_unit": args.schedule_unit,
                         "activated_experts_per_batch": out.activated_experts_per_batch,
                         "activated_experts_per_token": out.activated_experts_per_token,
                         "decode_forwards": out.decode_forwards, "schedule_seconds": out.schedule_seconds,
                         "forecast_accuracy": out.forecast_accuracy,
                         "schedule_wait_seconds": out.schedule_wait_seconds, "pipeline": not args.no_pipeline,
                         "policy": config.policy, "store": config.store, **out.stats.as_dict()})
    return 0


def _accuracy_rows(accuracy: dict | None) -> list[tuple[str, str]]:
    if accuracy is None:
        return []
    return [("forecast B_acc / precision", f"{accuracy['b_acc']:.3f} / {accuracy['precision']:.3f} "
                                           f"(over the {accuracy['batches']} decode batches as they ran)")]


def _busy(stats: RunStats) -> str:
    if not stats.transfer_reads:
        return "no reads"
    return (f"{stats.transfer_busy_seconds:.3f} s for {stats.transfer_reads} reads "
            f"({stats.busy_ms_per_read:.2f} ms each at the concurrency they ran with)")


def figure_rows(stats: RunStats) -> list[tuple[str, str]]:
    return [
        ("new tokens", f"{stats.new_tokens}"),
        ("tokens/s", f"{stats.tokens_per_s:.1f}"),
        ("hit ratio", f"{stats.hit_ratio:.3f}"),
        ("expert loads", f"{stats.expert_loads}"),
        ("prefetch loads / hits / wasted", f"{stats.prefetch_loads} / {stats.prefetch_hits} / {stats.wasted_prefetches}"),
        ("correction loads", f"{stats.correction_loads}"),
        ("transfer wait", f"{stats.transfer_wait_seconds:.3f} s"),
        ("slow tier busy", _busy(stats)),
        ("bytes moved", human_bytes(stats.bytes_moved)),
        ("cache slots", f"{stats.cache_experts} x {human_bytes(stats.expert_bytes)}"),
        ("peak expert bytes", human_bytes(stats.peak_expert_bytes)),
        ("peak fast tier (+ resident weights)", human_bytes(stats.peak_fast_tier_bytes)),
        ("all expert bytes", human_bytes(stats.all_expert_bytes)),
    ]
