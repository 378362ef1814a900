"""Probe: does a sequence's own routing so far sharpen the RPP's forecast of its next token (issue 4, session 12)?

At decoding step t the engine has executed every earlier token of the sequence, prompt included, so it knows
their routing. Session 3's routing-history probe fed only the previous position's routing (+0.0-0.3 points).
This probe tries the whole sequence's usage instead, as a "cache" term on the RPP's logits, the way a
neural-cache language model adds the document's own word counts:

    score[t, l, e] = logit(p_rpp[t, l, e]) + alpha * log((c[t, l, e] + eps) / (pop[l, e] + eps))

where c[t, l, e] is the share of the sequence's (decayed by `gamma` per token) uses of layer l before t that
went to expert e, and pop the expert's share in the training traces. Tuned on the tuning splits, scored on the
eval traces with the repo's own evaluation (`expertflow.predictor.evaluate`), at batch 1 and 8.

    OMP_NUM_THREADS=1 python bench/sequence_cache_probe.py \
        --tune results/traces/{xsum,wmt16}_tune.safetensors \
        --eval results/traces/{alpaca_heldout,xsum_eval,wmt16_eval}.safetensors \
        --baseline-traces results/traces/alpaca_train_greedy.safetensors results/traces/corpus_sampled.safetensors
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from expertflow.embedded import EMBEDDED_PREDICTOR_DIR
from expertflow.predictor.baselines import build_tables
from expertflow.predictor.evaluate import EvalConfig, evaluate
from expertflow.predictor.metrics import routing_mask
from expertflow.predictor.runtime import RoutingPredictor
from expertflow.traces import TraceSet, read_traces


def usage_shares(routing: np.ndarray, num_experts: int, gamma: float) -> np.ndarray:
    """(T, L, K) routing -> (T, L, E): per position t, the decayed share of uses before t per expert
    (zeros at t = 0)."""
    mask = routing_mask(routing, num_experts).astype(np.float64)                  # (T, L, E)
    counts = np.zeros_like(mask)
    running = np.zeros(mask.shape[1:])
    for t in range(1, len(mask)):
        running = gamma * running + mask[t - 1]
        counts[t] = running
    totals = counts.sum(-1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


class TraceFeatures:
    """Per sequence: the RPP's logits and the usage shares at each gamma."""

    def __init__(self, traces: TraceSet, predictor: RoutingPredictor, gammas: list[float]) -> None:
        E = traces.header.num_experts
        self.traces = traces
        self.index = {id(s): i for i, s in enumerate(traces.sequences)}
        self.logits = [logit(predictor.predict_array(s.token_ids)) for s in traces.sequences]
        self.shares = {g: [usage_shares(s.routing, E, g) for s in traces.sequences] for g in gammas}

    def scorer(self, pop: np.ndarray, alpha: float, gamma: float, eps: float):
        prior = np.log(pop + eps)

        def score(seq, positions):
            i = self.index[id(seq)]
            base = self.logits[i][positions]
            if alpha == 0:
                return base
            return base + alpha * (np.log(self.shares[gamma][i][positions] + eps) - prior[None])
        return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--predictor", type=Path, default=EMBEDDED_PREDICTOR_DIR)
    ap.add_argument("--tune", type=Path, nargs="+", required=True)
    ap.add_argument("--eval", type=Path, nargs="+", required=True)
    ap.add_argument("--baseline-traces", type=Path, nargs="+", required=True, help="training traces for pop")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.35, 0.5])
    ap.add_argument("--gammas", type=float, nargs="+", default=[1.0, 0.97, 0.9])
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    predictor = RoutingPredictor.load(args.predictor)
    pop = build_tables([read_traces(p) for p in args.baseline_traces], predictor.config.vocab_size).popularity

    def sweep(paths: list[Path], grid) -> dict:
        out = {}
        for path in paths:
            feats = TraceFeatures(read_traces(path), predictor, sorted({g for _, g, _ in grid}))
            for alpha, gamma, eps in grid:
                for b in args.batch_sizes:
                    r = evaluate(feats.traces, {"s": feats.scorer(pop, alpha, gamma, eps)}, EvalConfig(batch_size=b))["s"]
                    out.setdefault(f"{alpha},{gamma},{eps}", {})[f"{path.stem}/b{b}"] = (r["b_acc"], r["precision"])
            print(f"{path.stem}: done", flush=True)
        return out

    grid = [(0.0, 1.0, 1e-3)] + [g for g in itertools.product(args.alphas, args.gammas, args.eps) if g[0] > 0]
    tuned = sweep(args.tune, grid)
    mean_b8 = {k: np.mean([v[0] for name, v in row.items() if name.endswith("/b8")]) for k, row in tuned.items()}
    for k in sorted(mean_b8, key=mean_b8.get, reverse=True)[:8]:
        print(f"tune  alpha,gamma,eps={k}: mean B_acc b8 {mean_b8[k]:.4f}")
    print(f"tune  rpp alone: {mean_b8['0.0,1.0,0.001']:.4f}")
    best = max(mean_b8, key=mean_b8.get)
    a, g, e = (float(x) for x in best.split(","))
    final = sweep(args.eval, [(0.0, 1.0, 1e-3), (a, g, e)])
    for k, row in final.items():
        print(k, "  ".join(f"{name} {b:.4f} ({p:.3f})" for name, (b, p) in row.items()))
    if args.json_out:
        args.json_out.write_text(json.dumps({"tune": tuned, "best": best, "eval": final}, indent=1))


if __name__ == "__main__":
    main()
