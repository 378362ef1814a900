"""`expertflow trace` (collect routing traces) and `expertflow trace-info` (summarise a trace file)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from expertflow.cli.options import add_decoding_options, add_model_option, add_threads_option, apply_threads
from expertflow.datasets import NAMED_DATASETS, load_prompts
from expertflow.errors import ExpertflowError
from expertflow.outputs import check_output_file
from expertflow.traces import TraceSet, read_traces, summarize
from expertflow.trace_collection import TracingConfig, collect_traces, encode_prompts


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trace", help="record the experts every token is routed to, over a prompt set")
    add_model_option(p)
    p.add_argument("--dataset", required=True, help=f"{', '.join(NAMED_DATASETS)}, or a .jsonl/.txt/.json path")
    p.add_argument("--samples", type=int, default=None, help="number of prompts (default: all)")
    p.add_argument("--skip", type=int, default=0, help="skip this many prompts first (for held-out sets)")
    p.add_argument("--runs", type=int, default=None, help="runs per prompt (sampling needs --temperature > 0)")
    add_decoding_options(p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="prompts generated together")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longer prompts keep head and tail")
    p.add_argument("--out", required=True, type=Path, help="trace file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--ray", action="store_true", help="split the batches across Ray workers (extra: expertflow-moe[ray])")
    p.add_argument("--address", default=None, help="with --ray: cluster to join (default: start a local one)")
    p.add_argument("--workers", type=int, default=None, help="with --ray: worker actors, one model each")
    add_threads_option(p)
    p.set_defaults(func=run_trace)

    info = subparsers.add_parser("trace-info", help="summarise a trace file: sizes, expert skew, entropy")
    info.add_argument("file", type=Path)
    info.set_defaults(func=run_trace_info)


def _config(args: argparse.Namespace) -> TracingConfig:
    given = {name: getattr(args, name) for name in
             ("runs", "max_new_tokens", "temperature", "seed", "batch_size", "max_prompt_tokens")}
    try:
        return TracingConfig(dataset=args.dataset, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise ExpertflowError(str(exc)) from None


def run_trace(args: argparse.Namespace) -> int:
    import expertflow

    check_output_file(args.out, args.overwrite)  # before the model loads and the trace runs
    apply_threads(args.threads)
    config = _config(args)
    if (args.samples is not None and args.samples < 1) or args.skip < 0:
        raise ExpertflowError("--samples must be >= 1 and --skip >= 0")
    prompts = load_prompts(args.dataset, limit=args.samples, skip=args.skip)
    if not prompts:
        raise ExpertflowError(f"dataset {args.dataset!r} has no prompts after skipping {args.skip}")
    if args.ray:
        traces = _trace_on_ray(args, prompts, config)
    elif args.address is not None or args.workers is not None:
        raise ExpertflowError("--address and --workers need --ray")
    else:
        model = expertflow.from_pretrained(args.model)
        if model.tokenizer is None:
            raise ExpertflowError(f"{args.model} has no tokenizer files; tracing a prompt set needs one")
        prompt_ids = encode_prompts(model.tokenizer, prompts, config.max_prompt_tokens)
        with tqdm(total=len(prompts) * config.runs, unit="seq", desc="tracing") as bar:
            traces = collect_traces(model, prompt_ids, config, on_batch=bar.update, first_index=args.skip)
    traces.write(args.out)
    Console().print(f"wrote {args.out}: {len(traces.sequences)} sequences, {traces.num_tokens} tokens")
    return 0


def _trace_on_ray(args: argparse.Namespace, prompts: list[str], config: TracingConfig) -> TraceSet:
    try:
        from expertflow.distributed.tracing import RayTraceConfig, collect_traces_ray
    except ImportError as exc:
        raise ExpertflowError(f"--ray needs Ray: pip install 'expertflow-moe[ray]' ({exc})") from None
    given = {name: getattr(args, name) for name in ("workers", "address") if getattr(args, name) is not None}
    try:
        ray_config = RayTraceConfig(**given)
    except ValueError as exc:
        raise ExpertflowError(str(exc)) from None
    with tqdm(total=len(prompts) * config.runs, unit="seq", desc="tracing (ray)") as bar:
        return collect_traces_ray(args.model, prompts, config, ray_config, on_batch=bar.update,
                                  first_index=args.skip)


def run_trace_info(args: argparse.Namespace) -> int:
    traces = read_traces(args.file)
    s = summarize(traces)
    h = traces.header
    console = Console()
    console.print(f"[bold]{args.file}[/]: model {h.model}, dataset {h.dataset or '?'}, L={h.num_layers} "
                  f"E={h.num_experts} K={h.top_k}, runs {h.runs}, temperature {h.temperature}, seed {h.seed}")
    console.print(f"{s.sequences} sequences from {s.prompts} prompts; {s.prompt_tokens} prompt + "
                  f"{s.generated_tokens} generated tokens")
    table = Table("layer", "top expert share", "Gini", "entropy / uniform", "prev-token overlap")
    for layer in range(h.num_layers):
        table.add_row(str(layer), f"{s.top_share[layer]:.3f}", f"{s.gini[layer]:.3f}",
                      f"{s.entropy[layer]:.3f}", f"{s.prev_token_overlap[layer]:.3f}")
    console.print(table)
    return 0
