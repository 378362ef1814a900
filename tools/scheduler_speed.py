"""Wall time of one token-scheduling decision (2 x 32 tokens, L=8, E=32, K=2 by default), per scheduler.

Routing paths are drawn with a skewed per-layer expert popularity, from a fixed seed, or taken with `--traces`
from recorded decode steps (units of consecutive sequences, as schedule-eval cuts them). Schedulers that take
probabilities are also timed on them: drawn around the paths, or with `--predictor` the RPP's own forecasts of
those steps. `exhaustive` enumerates only small units and says when it fell back to `swap`. Warm-up, then the
median of `--repeats` calls; prints a table against the 10 ms goal and ends with one JSON line.

    python tools/scheduler_speed.py [--batch-size 32] [--unit 2] [--layers 8] [--experts 32] [--top-k 2]
                                    [--schedulers fifo,similarity,swap,exhaustive] [--traces FILE [--predictor DIR]]

FILE comes from `expertflow trace`, e.g. `expertflow trace --dataset xsum --samples 200 --max-new-tokens 32
--out results/traces/xsum_eval.safetensors`; DIR is an RPP such as the shipped expertflow/models/tiny-mixtral-32e-rpp.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")      # the box is shared; one decision is single-threaded
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402  (after the thread settings, which numpy reads at import)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from expertflow.scheduler import SCHEDULERS, expected_distinct, routing_paths, total_distinct  # noqa: E402
from expertflow.scheduler.exhaustive import ExhaustiveScheduler  # noqa: E402

GOAL_MS = 10.0


def skewed_routing(rng: np.random.Generator, n: int, layers: int, experts: int, top_k: int) -> np.ndarray:
    """(n, L, E) bool paths: each layer has its own Dirichlet popularity over experts."""
    popularity = rng.dirichlet(np.full(experts, 0.5), size=layers)                   # (L, E)
    ids = np.stack([[rng.choice(experts, top_k, replace=False, p=popularity[layer]) for layer in range(layers)]
                    for _ in range(n)])                                               # (n, L, K)
    return routing_paths(ids, experts)


def soft_routing(rng: np.random.Generator, paths: np.ndarray) -> np.ndarray:
    """(n, L, E) float32 probabilities around bool paths: sigmoid(+3 on a path, -5 off it, + N(0, 1.5)), about
    0.5 expected off-path experts per layer, like a fair RPP."""
    logits = np.where(paths, 3.0, -5.0) + rng.normal(0.0, 1.5, paths.shape)
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def trace_instances(path: str, batch_size: int, unit: int, count: int,
                    predictor: str | None) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Spread sample of a trace's decode steps: true paths, and the predictor's probabilities if given."""
    from expertflow.scheduler.evaluate import generated_paths, instances
    from expertflow.traces import read_traces

    traces = read_traces(path)
    true = generated_paths(traces)
    probs = None
    if predictor:
        from expertflow.cli.schedule import predicted_probabilities

        probs = predicted_probabilities(traces, predictor, threads=1)
    cases = instances(true, probs or true, batch_size, unit)
    if not cases:
        raise SystemExit(f"{path}: fewer than {batch_size * unit} sequences")
    picked = [cases[int(i)] for i in np.linspace(0, len(cases) - 1, min(count, len(cases)))]
    return [t for t, _ in picked], [p for _, p in picked] if probs else None


def time_scheduler(name: str, instances: list[np.ndarray], batch_size: int, unit: int,
                   repeats: int, probabilities: bool) -> dict:
    scheduler = SCHEDULERS[name]()
    score = expected_distinct if probabilities else total_distinct
    for routing in instances[:3]:
        scheduler.group(routing, batch_size, unit, probabilities=probabilities)          # warm-up
    times, costs = [], []
    for r in range(repeats):
        routing = instances[r % len(instances)]
        start = time.perf_counter()
        grouping = scheduler.group(routing, batch_size, unit, probabilities=probabilities)
        times.append(1e3 * (time.perf_counter() - start))
        costs.append(score(routing, grouping) / unit)
    times.sort()
    enumerated = isinstance(scheduler, ExhaustiveScheduler) and scheduler.enumerates(batch_size, unit)
    mode = ("enumerated" if enumerated else "swap fallback") if isinstance(scheduler, ExhaustiveScheduler) else ""
    return {"scheduler": name, "input": "probabilities" if probabilities else "paths", "mode": mode,
            "median_ms": times[len(times) // 2], "p90_ms": times[int(0.9 * (len(times) - 1))],
            "distinct_per_batch": float(np.mean(costs))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--unit", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--schedulers", default="fifo,similarity,swap,exhaustive")
    p.add_argument("--traces", default=None, help="take routing from this trace file instead of drawing it")
    p.add_argument("--predictor", default=None, help="with --traces: probabilities from this RPP directory")
    args = p.parse_args()
    if args.predictor and not args.traces:
        p.error("--predictor needs --traces (the steps it forecasts)")
    probs = None
    if args.traces:
        instances, probs = trace_instances(args.traces, args.batch_size, args.unit, 20, args.predictor)
        args.layers, args.experts = instances[0].shape[1:]
        args.top_k = int(instances[0][0, 0].sum())
    else:
        rng = np.random.default_rng(0)
        n = args.batch_size * args.unit
        instances = [skewed_routing(rng, n, args.layers, args.experts, args.top_k) for _ in range(10)]
    if probs is None:
        probs = [soft_routing(np.random.default_rng(1), paths) for paths in instances]
    rows = [time_scheduler(name, instances, args.batch_size, args.unit, args.repeats, False)
            for name in args.schedulers.split(",")]
    rows += [time_scheduler(name, probs, args.batch_size, args.unit, args.repeats, True)
             for name in args.schedulers.split(",") if SCHEDULERS[name].takes_probabilities]
    print_rows(rows, args)


def print_rows(rows: list[dict], args: argparse.Namespace) -> None:
    source = args.traces or "synthetic"
    table = Table("scheduler", "input", "mode", "median ms", "p90 ms", "distinct / batch", f"< {GOAL_MS:g} ms",
                  title=f"one decision: {args.unit} x {args.batch_size} tokens, L={args.layers} E={args.experts} "
                        f"K={args.top_k}, routing: {source}; probabilities: {args.predictor or 'drawn'} "
                        f"(distinct / batch is expected there)")
    for r in rows:
        table.add_row(r["scheduler"], r["input"], r["mode"], f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}",
                      f"{r['distinct_per_batch']:.1f}", "yes" if r["median_ms"] < GOAL_MS else "NO")
    console = Console()
    console.width = max(console.width, 110)     # squeezed columns are unreadable in a log file
    console.print(table)
    print(json.dumps({"routing": source, "probabilities": args.predictor or "drawn", "batch_size": args.batch_size,
                      "unit": args.unit, "layers": args.layers, "experts": args.experts, "top_k": args.top_k,
                      "goal_ms": GOAL_MS, "results": rows}))


if __name__ == "__main__":
    main()
