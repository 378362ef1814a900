"""`expertflow schedule-eval`: replay recorded decode steps through the token schedulers.

Shape legend: G generated tokens of a sequence, S all its tokens, L layers, E experts, K top_k.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from expertflow.cli.options import add_sweep_options, add_threads_option, comma_list
from expertflow.errors import ExpertflowError
from expertflow.outputs import check_output_file, write_atomic
from expertflow.scheduler.evaluate import Paths, Row, ScheduleEvalConfig, evaluate, generated_paths
from expertflow.traces import TraceSet, read_traces


HATCHES = {"predicted": "//", "predicted-prob": ".."}     # routing source -> bar hatch (true: plain)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("schedule-eval", help="distinct experts per batch under each token scheduler, "
                                                    "replayed from a trace file")
    p.add_argument("--traces", required=True, type=Path, help="trace file (from `expertflow trace`)")
    add_sweep_options(p, batch_size=_joined(ScheduleEvalConfig.batch_sizes),
                      schedule_unit=_joined(ScheduleEvalConfig.units))
    p.add_argument("--schedulers", type=comma_list("--schedulers"), default=None, metavar="NAME[,NAME...]",
                   help=f"default {_joined(ScheduleEvalConfig.schedulers)}")
    p.add_argument("--predictor", type=Path, default=None,
                   help="predictor directory: also schedule from its predicted routing, as top-k paths and as "
                        "probabilities (scored on the true one)")
    p.add_argument("--exact-nodes", type=int, default=None, help="branch-and-bound nodes per exact instance")
    p.add_argument("--exact-instances", type=int, default=None, help="instances per cell for the exact solver")
    add_threads_option(p)  # the predictor's
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="bar chart of the reductions")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    p.set_defaults(func=run_schedule_eval)


def _joined(values: tuple) -> str:
    """A config's default sweep as its flag writes it: (4, 8, 16) -> '4,8,16'."""
    return ",".join(map(str, values))


def _config(args: argparse.Namespace) -> ScheduleEvalConfig:
    given = {"batch_sizes": args.batch_size, "units": args.schedule_unit, "schedulers": args.schedulers,
             "exact_nodes": args.exact_nodes, "exact_instances": args.exact_instances}
    try:
        return ScheduleEvalConfig(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise ExpertflowError(str(exc)) from None


def predicted_probabilities(traces: TraceSet, directory: Path, threads: int) -> Paths:
    """The predictor's activation probabilities for every generated token: float32 (G, L, E) per sequence."""
    import torch

    from expertflow.predictor.runtime import RoutingPredictor

    torch.set_num_threads(threads)
    h = traces.header
    predictor = RoutingPredictor.load(directory, expect=(h.num_layers, h.num_experts))
    if predictor.config.top_k != h.top_k:
        raise ExpertflowError(f"predictor {directory} was trained on top-{predictor.config.top_k} routing but the "
                              f"traces route top-{h.top_k}; train one on this model's traces")
    return [predictor.predict_array(seq.token_ids)[len(seq.prompt_ids):] for seq in traces.sequences]


def top_k_paths(probabilities: Paths, top_k: int) -> Paths:
    """Top-k of each token's probabilities per layer: bool (G, L, E) per sequence."""
    out = []
    for probs in probabilities:
        top = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
        mask = np.zeros(probs.shape, dtype=bool)
        np.put_along_axis(mask, top, True, axis=-1)
        out.append(mask)
    return out


def run_schedule_eval(args: argparse.Namespace) -> int:
    if args.plot is not None:
        check_output_file(args.plot, args.overwrite, "--plot")  # before the replay, not after
    config = _config(args)
    traces = read_traces(args.traces)
    if not traces.sequences:
        raise ExpertflowError(f"{args.traces} holds no sequences")
    if args.predictor is not None and args.threads < 1:
        raise ExpertflowError(f"--threads must be >= 1, got {args.threads}")
    true = generated_paths(traces)
    probs = predicted_probabilities(traces, args.predictor, args.threads) if args.predictor else None
    predicted = top_k_paths(probs, traces.header.top_k) if probs else None
    rows = evaluate(true, predicted, config, probs)
    if not rows:
        raise ExpertflowError(f"{args.traces} has {len(true)} sequences, fewer than the smallest unit of "
                              f"{min(config.units)} x {min(config.batch_sizes)}; use smaller --batch-size or "
                              f"--schedule-unit")
    _print_table(rows, args.traces)
    _print_skipped(rows, config, len(true))
    if args.plot is not None:
        _plot(rows, args.plot)
    if args.json:
        print(json.dumps({"traces": str(args.traces), "predictor": str(args.predictor) if args.predictor else None,
                          "config": dataclasses.asdict(config), "rows": [dataclasses.asdict(r) for r in rows]}))
    return 0


def _print_table(rows: list[Row], path: Path) -> None:
    table = Table("U x B", "routing", "scheduler", "steps", "distinct/batch", "vs fifo", "vs exact", "solved", "ms",
                  title=f"{path.name}: distinct (layer, expert) pairs per batch, scored on the true routing; "
                        f"vs exact on the solved sample; ms per scheduling call")
    for r in rows:
        gap = f"{100 * r.gap_to_exact:+.2f}%" if r.gap_to_exact is not None else "-"
        table.add_row(f"{r.unit} x {r.batch_size}", r.routing, r.scheduler, str(r.instances),
                      f"{r.distinct_per_batch:.1f}", f"{-100 * r.reduction_vs_fifo:+.1f}%", gap,
                      f"{r.exact_solved}/{r.exact_tried}", f"{r.schedule_ms:.2f}")
    console = Console()
    console.width = max(console.width, 110)   # a squeezed 9-column table is unreadable in a log file
    console.print(table)


def _print_skipped(rows: list[Row], config: ScheduleEvalConfig, sequences: int) -> None:
    done = {(r.unit, r.batch_size) for r in rows}
    skipped = [f"{u} x {b}" for u in config.units for b in config.batch_sizes if (u, b) not in done]
    if skipped:
        Console().print(f"skipped {', '.join(skipped)}: a unit needs more than the trace's {sequences} sequences")


def _plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r.unit, r.batch_size) for r in rows})
    series = list(dict.fromkeys((r.routing, r.scheduler) for r in rows if r.scheduler != "fifo"))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(cells)), 4))
    for k, (routing, name) in enumerate(series):
        values = {(r.unit, r.batch_size): 100 * r.reduction_vs_fifo for r in rows
                  if (r.routing, r.scheduler) == (routing, name)}
        ax.bar(np.arange(len(cells)) + k * width, [values.get(c, 0.0) for c in cells], width,
               label=f"{name} ({routing} routing)", hatch=HATCHES.get(routing))
    ax.set_xticks(np.arange(len(cells)) + width * (len(series) - 1) / 2, [f"{u} x {b}" for u, b in cells])
    ax.set_xlabel("scheduling unit: batches x batch size")
    ax.set_ylabel("fewer distinct experts per batch than fifo (%)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix[1:] or "png", dpi=120)  # rendered first, so the file appears whole
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
