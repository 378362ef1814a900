"""Ensemble probe for the Routing Path Predictor (issue 4, session 9).

Loads N trained predictors, scores every trace's generated tokens with each member alone and with the
ensemble (the mean of the members' activation probabilities (B, S, L, E)), with the repo's own evaluation
(`expertflow.predictor.evaluate.evaluate`, the code behind `expertflow eval-predictor`), at each batch size.
Optionally also the mean of the members' logits (`--logit-mean`, a geometric-style average).

Cost per decoding step: median wall time of one incremental `RoutingPredictor.step` at the batch size (as
`eval-predictor` times it), for each member and for the ensemble (every member stepped, then averaged).

    OMP_NUM_THREADS=1 nice -n 19 python bench/ensemble_probe.py --threads 1 \
        --predictors expertflow/models/tiny-mixtral-32e-rpp results/s9-ens/rpp-seed1-ft \
        --traces results/traces/{alpaca_heldout,xsum_eval,wmt16_eval}.safetensors --batch-sizes 1 8 \
        --json-out results/s9-ens/ensemble.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from expertflow.predictor.evaluate import EvalConfig, evaluate
from expertflow.predictor.runtime import RoutingPredictor
from expertflow.traces import TraceSet, read_traces


def member_probs(predictor: RoutingPredictor, traces: TraceSet) -> list[np.ndarray]:
    """Per sequence (S, L, E) probabilities, exactly the `rpp` scorer of eval-predictor."""
    return [predictor.predict_array(s.token_ids) for s in traces.sequences]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def scorers_for(traces: TraceSet, names: list[str], probs: dict[str, list[np.ndarray]], logit_mean: bool) -> dict:
    index = {id(s): i for i, s in enumerate(traces.sequences)}

    def lookup(table: list[np.ndarray]):
        return lambda seq, pos: table[index[id(seq)]][pos]

    scorers = {name: lookup(probs[name]) for name in names}
    if len(names) > 1:
        n = len(traces.sequences)
        mean = [np.mean([probs[name][i] for name in names], axis=0) for i in range(n)]
        scorers["ensemble"] = lookup(mean)
        if logit_mean:
            lmean = [np.mean([_logit(probs[name][i]) for name in names], axis=0) for i in range(n)]
            scorers["ensemble_logit_mean"] = lookup(lmean)
    return scorers


def step_ms(predictors: list[RoutingPredictor], traces: TraceSet, batch_size: int, repeats: int) -> dict:
    """Median incremental step time (ms) per member and for the whole ensemble, as eval-predictor's
    `_step_ms` picks its batch: the batch_size longest-generated sequences, their prompts prefilled."""
    seqs = sorted(traces.sequences, key=lambda s: -len(s.generated_ids))[:batch_size]
    prompts = [s.prompt_ids.tolist() for s in seqs]
    steps = min(len(s.generated_ids) for s in seqs)
    member_times: list[list[float]] = [[] for _ in predictors]
    ensemble_times: list[float] = []
    median = lambda xs: float(sorted(xs)[len(xs) // 2]) if xs else float("nan")  # noqa: E731
    for _ in range(repeats):
        states = [p.start(prompts)[0] for p in predictors]
        for j in range(steps):
            tokens = [int(s.generated_ids[j]) for s in seqs]
            t_all = time.perf_counter()
            outs = []
            for m, p in enumerate(predictors):
                t0 = time.perf_counter()
                states[m], probs = p.step(states[m], tokens)
                member_times[m].append((time.perf_counter() - t0) * 1e3)
                outs.append(probs)
            torch.stack(outs).mean(0)
            ensemble_times.append((time.perf_counter() - t_all) * 1e3)
    return {"members_ms": [median(t) for t in member_times], "ensemble_ms": median(ensemble_times),
            "steps_timed": len(ensemble_times)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predictors", nargs="+", required=True, type=Path)
    ap.add_argument("--names", nargs="+", default=None, help="one name per predictor (default: directory names)")
    ap.add_argument("--traces", nargs="+", required=True, type=Path)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--logit-mean", action="store_true", help="also score the mean of the members' logits")
    ap.add_argument("--timing-repeats", type=int, default=3, help="0: skip the step timing")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--max-sequences", type=int, default=None, help="smoke tests: the first N sequences only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    names = args.names or [p.name for p in args.predictors]
    if len(names) != len(args.predictors) or len(set(names)) != len(names):
        raise SystemExit("--names: one distinct name per predictor")
    predictors = [RoutingPredictor.load(p) for p in args.predictors]
    out: dict = {"predictors": dict(zip(names, map(str, args.predictors))), "traces": {}}
    for path in args.traces:
        traces = read_traces(path)
        if args.max_sequences is not None:
            traces = dataclasses.replace(traces, sequences=traces.sequences[: args.max_sequences])
        t0 = time.perf_counter()
        probs = {name: member_probs(p, traces) for name, p in zip(names, predictors)}
        forward_s = time.perf_counter() - t0
        scorers = scorers_for(traces, names, probs, args.logit_mean)
        per_trace: dict = {"forward_seconds": round(forward_s, 1)}
        for b in args.batch_sizes:
            res = evaluate(traces, scorers, EvalConfig(batch_size=b))
            per_trace[f"batch_{b}"] = res
            line = "  ".join(f"{k} {r['b_acc']:.4f}/{r['precision']:.4f}" for k, r in res.items())
            print(f"{path.stem} batch {b} (B_acc/precision): {line}", flush=True)
            if args.timing_repeats > 0:
                per_trace[f"batch_{b}"]["step_ms"] = step_ms(predictors, traces, b, args.timing_repeats)
                print(f"{path.stem} batch {b} step ms: {per_trace[f'batch_{b}']['step_ms']}", flush=True)
        out["traces"][path.stem] = per_trace
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
