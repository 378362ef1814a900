"""`expertflow train-predictor` and `expertflow eval-predictor`: the Routing Path Predictor from traces."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from expertflow.cli.options import add_threads_option, apply_threads
from expertflow.errors import ExpertflowError
from expertflow.hub import resolve_model
from expertflow.outputs import check_output_dir
from expertflow.predictor.baselines import (BaselineTables, LookupBaseline, PopularityBaseline, SpatialBaseline,
                                            TemporalBaseline, build_tables)
from expertflow.predictor.distill import RouterTeacher, check_against_traces
from expertflow.predictor.evaluate import EvalConfig, evaluate
from expertflow.predictor.model import PredictorConfig, RoutingPathModel, load_model, save_model
from expertflow.predictor.runtime import RoutingPredictor
from expertflow.predictor.train import TrainConfig, train_predictor
from expertflow.traces import TraceSet, read_traces

TRAINING_NAME = "training.json"
_MODEL_FLAGS = ("d_model", "d_ff", "num_heads", "encoder_layers", "decoder_layers", "window", "head_hidden",
                "dropout")
_TRAIN_FLAGS = ("epochs", "batch_size", "lr", "weight_decay", "val_fraction", "patience", "seed", "max_length",
                "freeze_embeddings", "distill_weight", "distill_temperature", "listwise_weight")


def register(subparsers: argparse._SubParsersAction) -> None:
    t = subparsers.add_parser("train-predictor", help="train the Routing Path Predictor on trace files")
    t.add_argument("--traces", nargs="+", required=True, type=Path, help="trace files (same model)")
    t.add_argument("--out", required=True, type=Path, help="predictor directory to write")
    t.add_argument("--overwrite", action="store_true",
                   help="write into an existing --out: replace the predictor's files, keep any others")
    t.add_argument("--init-embeddings", default=None, metavar="MODEL",
                   help="start the predictor's token embeddings from this MoE checkpoint's (directory or hub id)")
    t.add_argument("--init-predictor", type=Path, default=None, metavar="DIR",
                   help="go on training this predictor (its architecture; e.g. the shipped one, on more traces)")
    t.add_argument("--freeze-embeddings", action="store_true", default=None,
                   help="with --init-embeddings: keep them fixed (helps on tokens the traces never show)")
    t.add_argument("--distill-model", default=None, metavar="MODEL",
                   help="the traced MoE model (directory or hub id): add a KL term to its router softmax (soft "
                        "targets; the whole model is loaded in memory once to compute them)")
    add_threads_option(t)
    for flag, kind in (("distill-weight", float), ("distill-temperature", float), ("listwise-weight", float),
                       ("d-model", int), ("d-ff", int),
                       ("num-heads", int), ("encoder-layers", int),
                       ("decoder-layers", int), ("window", int), ("head-hidden", int), ("dropout", float), ("epochs", int),
                       ("batch-size", int), ("lr", float), ("weight-decay", float), ("val-fraction", float),
                       ("patience", int), ("seed", int), ("max-length", int)):
        t.add_argument(f"--{flag}", type=kind, default=None)
    t.set_defaults(func=run_train)

    e = subparsers.add_parser("eval-predictor", help="B_acc, precision, recall of the predictor vs baselines")
    e.add_argument("--predictor", required=True, type=Path, help="directory from train-predictor")
    e.add_argument("--traces", required=True, type=Path, help="trace file to evaluate on (generated tokens)")
    e.add_argument("--batch-size", type=int, default=None, help="sequences decoded together (default 1)")
    e.add_argument("--budget", type=int, default=None,
                   help="experts per layer for the fixed-budget metric (default: mean true batch demand)")
    e.add_argument("--baseline-traces", nargs="+", type=Path, default=None, metavar="FILE",
                   help="build the popularity and lookup tables from these traces (the predictor's training "
                        "traces) instead of the predictor directory's baselines.safetensors")
    add_threads_option(e)
    e.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    e.set_defaults(func=run_eval)


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _read_all(paths: list[Path]) -> list[TraceSet]:
    traces = [read_traces(p) for p in paths]
    shapes = {(t.header.num_layers, t.header.num_experts, t.header.top_k) for t in traces}
    if len(shapes) > 1:
        raise ExpertflowError(f"trace files disagree on (layers, experts, top_k): {sorted(shapes)}")
    if not any(t.sequences for t in traces):
        raise ExpertflowError("the trace files hold no sequences")
    return traces


def _vocab_size(traces: list[TraceSet], embeddings: torch.Tensor | None) -> int:
    # The model's vocabulary when known (header or embeddings), so ids unseen in training stay in range.
    declared = max(t.header.vocab_size for t in traces)
    seen = max(int(s.token_ids.max()) for t in traces for s in t.sequences if s.num_tokens) + 1
    return max(declared, seen, 0 if embeddings is None else embeddings.shape[0])


def _embeddings(model_dir: str | None) -> torch.Tensor | None:
    if model_dir is None:
        return None
    import expertflow

    return expertflow.from_pretrained(model_dir).model.get_input_embeddings().weight.detach().clone()


def _new_config(args: argparse.Namespace, traces: list[TraceSet], embeddings: torch.Tensor | None) -> PredictorConfig:
    h = traces[0].header
    return PredictorConfig(vocab_size=_vocab_size(traces, embeddings), num_layers=h.num_layers,
                           num_experts=h.num_experts, top_k=h.top_k, model_name=h.model,
                           **_given(args, _MODEL_FLAGS))


def _start(args: argparse.Namespace, traces: list[TraceSet]) -> RoutingPathModel | None:
    """The predictor --init-predictor names, checked against the flags and the traces it goes on from."""
    if args.init_predictor is None:
        return None
    if args.init_embeddings is not None or _given(args, _MODEL_FLAGS):
        raise ExpertflowError("--init-predictor keeps that predictor's architecture and embeddings; drop "
                              "--init-embeddings and the model flags (--d-model, --head-hidden, ...)")
    start = load_model(args.init_predictor)
    h, c = traces[0].header, start.config
    if (c.num_layers, c.num_experts, c.top_k) != (h.num_layers, h.num_experts, h.top_k) or \
            _vocab_size(traces, None) > c.vocab_size:
        raise ExpertflowError(f"{args.init_predictor} predicts {c.num_layers} layers x {c.num_experts} experts "
                              f"(top-{c.top_k}, {c.vocab_size} tokens) but the traces are {h.num_layers} x "
                              f"{h.num_experts} (top-{h.top_k}): train it on traces of its own model")
    return start


def _teacher(model_dir: str | None, traces: list[TraceSet], config: PredictorConfig) -> RouterTeacher | None:
    if model_dir is None:
        return None
    teacher = RouterTeacher.load(resolve_model(model_dir))
    check_against_traces(teacher, config.num_layers, config.num_experts)
    if teacher.vocab_size < _vocab_size(traces, None):
        raise ExpertflowError(f"--distill-model {model_dir} has {teacher.vocab_size} tokens but the traces use ids up "
                              f"to {_vocab_size(traces, None) - 1}: pass the traced model")
    return teacher


def run_train(args: argparse.Namespace) -> int:
    check_output_dir(args.out, args.overwrite)  # before hours of training, not after
    apply_threads(args.threads)
    traces = _read_all(args.traces)
    embeddings = _embeddings(args.init_embeddings)
    start = _start(args, traces)
    try:
        model_config = start.config if start is not None else _new_config(args, traces, embeddings)
        train_config = TrainConfig(**_given(args, _TRAIN_FLAGS))
    except ValueError as exc:
        raise ExpertflowError(str(exc)) from None
    if train_config.freeze_embeddings and embeddings is None:
        raise ExpertflowError("--freeze-embeddings needs --init-embeddings MODEL_DIR")
    if embeddings is not None and embeddings.shape[0] != model_config.vocab_size:
        raise ExpertflowError(f"{args.init_embeddings} has {embeddings.shape[0]} embeddings but the traces use "
                              f"token ids up to {model_config.vocab_size - 1}: is it the traced model?")
    teacher = _teacher(args.distill_model, traces, model_config)
    result = train_predictor(traces, model_config, train_config, embeddings=embeddings, start=start, teacher=teacher)
    tables = build_tables(traces, model_config.vocab_size)
    summary = {
        "traces": [str(p) for p in args.traces], "train": dataclasses.asdict(train_config),
        "init_embeddings": str(args.init_embeddings) if args.init_embeddings else None,
        "init_predictor": str(args.init_predictor) if args.init_predictor else None,
        "distill_model": str(args.distill_model) if args.distill_model else None,
        "parameters": result.model.num_parameters(), "bytes": result.model.num_bytes(),
        "seconds": round(result.seconds, 1), "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
        "train_sequences": result.train_sequences, "val_sequences": result.val_sequences,
        "train_tokens": result.train_tokens, "history": result.history,
    }

    def write_extra(directory: Path) -> None:
        tables.save(directory)
        (directory / TRAINING_NAME).write_text(json.dumps(summary, indent=2) + "\n")

    save_model(result.model, args.out, write_extra)
    best = result.history[result.best_epoch - 1] if result.best_epoch else {}
    Console().print(f"wrote {args.out}: {summary['parameters']:,} parameters ({summary['bytes'] / 1e6:.2f} MB), "
                    f"{summary['seconds']:.0f} s, best epoch {result.best_epoch} "
                    f"(val loss {best.get('val_loss', float('nan')):.4f}, "
                    f"val top-k recall {best.get('val_recall', float('nan')):.3f})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    predictor = RoutingPredictor.load(args.predictor)
    traces = read_traces(args.traces)
    if not traces.sequences:
        raise ExpertflowError(f"{args.traces} holds no sequences; trace a prompt set with `expertflow trace`")
    if args.baseline_traces:  # e.g. the shipped predictor, which carries no tables
        tables = build_tables([read_traces(p) for p in args.baseline_traces], predictor.config.vocab_size)
    else:
        tables = BaselineTables.load(args.predictor)
    h, c = traces.header, predictor.config
    if (h.num_layers, h.num_experts, h.top_k) != (c.num_layers, c.num_experts, c.top_k):
        raise ExpertflowError(f"{args.traces} has L={h.num_layers} E={h.num_experts} K={h.top_k} but the predictor "
                              f"predicts L={c.num_layers} E={c.num_experts} K={c.top_k}")
    top_id = max((int(s.token_ids.max()) for s in traces.sequences if s.num_tokens), default=0)
    if top_id >= c.vocab_size:
        raise ExpertflowError(f"{args.traces} has token id {top_id}, outside the predictor's vocabulary of "
                              f"{c.vocab_size}: traces and predictor come from different models")
    try:
        config = EvalConfig(**_given(args, ("batch_size", "budget")))
    except ValueError as exc:
        raise ExpertflowError(str(exc)) from None
    scorers = {
        "rpp": lambda seq, pos: predictor.predict_array(seq.token_ids)[pos],
        "tlp": TemporalBaseline(tables.popularity).scores,
        "slp": SpatialBaseline(tables.popularity).scores,
        "popularity": PopularityBaseline(tables.popularity).scores,
        "lookup": LookupBaseline(tables).scores,
    }
    results = evaluate(traces, scorers, config)
    results["rpp"].update(_step_ms(predictor, traces, config.batch_size))
    _print_tables(results, args, config.batch_size)
    if args.json:
        print(json.dumps(results))
    return 0


def _step_ms(predictor: RoutingPredictor, traces: TraceSet, batch_size: int) -> dict[str, float]:
    """Median wall time of one decoding step for a batch of the traces' sequences: the incremental
    `step` (after `start` on their prompts) and the stateless `predict_next` on full contexts."""
    seqs = sorted(traces.sequences, key=lambda s: -len(s.generated_ids))[:batch_size]
    prompts = [s.prompt_ids.tolist() for s in seqs]
    steps = min(len(s.generated_ids) for s in seqs)
    state, _ = predictor.start(prompts)
    incremental = []
    for j in range(steps):
        start = time.perf_counter()
        state, _ = predictor.step(state, [int(s.generated_ids[j]) for s in seqs])
        incremental.append((time.perf_counter() - start) * 1e3)
    stateless = []
    for _ in range(5):
        start = time.perf_counter()
        predictor.predict_next([s.token_ids.tolist() for s in seqs])
        stateless.append((time.perf_counter() - start) * 1e3)
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
    return {"step_ms": median(incremental), "predict_next_ms": median(stateless)}


def _print_tables(results: dict, args: argparse.Namespace, batch_size: int) -> None:
    console = Console()
    budget = results["rpp"]["budget"]["experts_per_layer"]
    table = Table("method", "B_acc", "precision", "recall", "F1", f"P@{budget}", f"R@{budget}", f"F1@{budget}",
                  title=f"{args.traces.name}: batch size {batch_size}, {results['rpp']['batches']} batches "
                        f"(top-k per token OR-ed over the batch; @{budget}: fixed per-layer budget)")
    for name, r in results.items():
        b = r["budget"]
        table.add_row(name, *(f"{x:.3f}" for x in (r["b_acc"], r["precision"], r["recall"], r["f1"],
                                                    b["precision"], b["recall"], b["f1"])))
    console.print(table)
    layers = Table("layer", *results, title="B_acc per layer")
    for layer in range(len(results["rpp"]["per_layer"])):
        layers.add_row(str(layer), *(f"{r['per_layer'][layer]:.3f}" for r in results.values()))
    console.print(layers)
    rpp = results["rpp"]
    console.print(f"RPP cost per decoding step, batch {batch_size}, CPU: {rpp['step_ms']:.2f} ms incremental "
                  f"(cached step), {rpp['predict_next_ms']:.1f} ms stateless (predict_next)")
