"""Probe: would the same token's earlier layers sharpen the RPP's forecast of its later layers?

Inside a forward the engine learns the true routing layer by layer: once layer l-1's router has run, the
routing of layers 0..l-1 is known before layer l's experts are needed. Two questions, both for the token's
own forward (the routing history probe, `routing_history_probe.py`, asked about the previous position):

1. **An exact layer 0.** The first router sees only the token embedding and one attention block, so a
   predictor could carry those and forecast layer 0 exactly. Upper bound: the predictor's B_acc with its
   layer-0 forecast replaced by the true routing (and, for scale, layers 0 and 1).
2. **A run-time refinement.** Per layer l >= 1, an MLP reads the predictor's logits for layer l and the true
   multi-hot routing of layers 0..l-1 and is trained (BCE, residual on the logits, so it starts as the
   predictor) to forecast layer l. Trained on traces the predictor never saw, scored by top-2 recall per
   layer on the eval traces' generated tokens. A history-only MLP (no predictor logits) says how much the
   earlier layers tell on their own.

    OMP_NUM_THREADS=1 python bench/earlier_layers_probe.py \
        --train results/traces/corpus_sampled_2.safetensors results/traces/corpus_sampled_3.safetensors \
        --eval results/traces/{alpaca_heldout,xsum_eval,wmt16_eval}.safetensors

Prints the figures and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from expertflow.embedded import EMBEDDED_PREDICTOR_DIR
from expertflow.predictor.evaluate import EvalConfig, evaluate, generated_positions
from expertflow.predictor.metrics import routing_mask
from expertflow.predictor.runtime import RoutingPredictor
from expertflow.traces import TraceSet, read_traces


def exact_layers_bound(predictor: RoutingPredictor, traces: TraceSet, batch_sizes: list[int]) -> dict:
    """B_acc of the predictor as is, and with layer 0 (then layers 0-1) forecast exactly."""
    probs = [predictor.predict_array(s.token_ids) for s in traces.sequences]
    index = {id(s): i for i, s in enumerate(traces.sequences)}
    E = probs[0].shape[-1]

    def exact(layers: tuple[int, ...]):
        def scorer(seq, pos):
            p = probs[index[id(seq)]][pos].copy()
            for layer in layers:
                p[:, layer] = routing_mask(seq.routing[pos, layer][:, None], E)[:, 0]
            return p
        return scorer

    scorers = {"rpp": lambda seq, pos: probs[index[id(seq)]][pos], "exact_0": exact((0,)), "exact_01": exact((0, 1))}
    return {f"batch_{b}": {name: round(r["b_acc"], 4) for name, r in evaluate(traces, scorers, EvalConfig(batch_size=b)).items()}
            for b in batch_sizes}


def features(predictor: RoutingPredictor, paths: list[Path], generated_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictor logits (N, L, E) and true multi-hot routing (N, L, E) over every scored position."""
    logits, targets = [], []
    for path in paths:
        for seq in read_traces(path).sequences:
            pos = generated_positions(seq) if generated_only else np.arange(seq.num_tokens)
            p = np.clip(predictor.predict_array(seq.token_ids)[pos], 1e-6, 1 - 1e-6)
            logits.append(np.log(p) - np.log1p(-p))
            targets.append(routing_mask(seq.routing[pos], p.shape[-1]))
    return torch.tensor(np.concatenate(logits), dtype=torch.float32), torch.tensor(np.concatenate(targets), dtype=torch.float32)


def _refined(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor, layer: int, with_logits: bool) -> torch.Tensor:
    """The refiner's logits for `layer`: from the true earlier layers, and residually on the predictor's logits."""
    history = targets[:, :layer].reshape(len(targets), -1)
    if not with_logits:
        return model(history)
    return model(torch.cat([logits[:, layer], history], 1)) + logits[:, layer]


def train_refiner(logits: torch.Tensor, targets: torch.Tensor, layer: int, with_logits: bool,
                  epochs: int, hidden: int = 256) -> nn.Module:
    E = targets.shape[-1]
    model = nn.Sequential(nn.Linear(layer * E + (E if with_logits else 0), hidden), nn.GELU(), nn.Linear(hidden, E))
    if with_logits:  # start as the predictor itself
        nn.init.zeros_(model[2].weight)
        nn.init.zeros_(model[2].bias)
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(targets)).split(512):
            out = _refined(model, logits[batch], targets[batch], layer, with_logits)
            loss = F.binary_cross_entropy_with_logits(out, targets[batch, layer])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def top2_recall(scores: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.gather(targets, -1, scores.topk(2, -1).indices).sum() / targets.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictor", type=Path, default=EMBEDDED_PREDICTOR_DIR)
    parser.add_argument("--train", nargs="+", type=Path, required=True, help="traces the predictor never saw")
    parser.add_argument("--eval", nargs="+", type=Path, required=True, help="eval traces (generated tokens scored)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    predictor = RoutingPredictor.load(args.predictor)

    out: dict = {"predictor": str(args.predictor), "exact_bound": {}, "refiner": {}}
    for path in args.eval:
        out["exact_bound"][path.stem] = bound = exact_layers_bound(predictor, read_traces(path), [1, 8])
        print(f"{path.stem}: B_acc (rpp / layer 0 exact / layers 0-1 exact) {bound}")

    logits, targets = features(predictor, args.train, generated_only=False)
    layers = range(1, targets.shape[1])
    refiners = {(layer, w): train_refiner(logits, targets, layer, w, args.epochs) for layer in layers for w in (True, False)}
    for path in args.eval:
        x, y = features(predictor, [path], generated_only=True)
        rows = {}
        with torch.no_grad():
            for layer in layers:
                refined = _refined(refiners[(layer, True)], x, y, layer, True)
                history = _refined(refiners[(layer, False)], x, y, layer, False)
                rows[layer] = {"rpp": round(top2_recall(x[:, layer], y[:, layer]), 4),
                               "rpp_plus_earlier": round(top2_recall(refined, y[:, layer]), 4),
                               "earlier_only": round(top2_recall(history, y[:, layer]), 4)}
        out["refiner"][path.stem] = rows
        print(f"{path.stem}: top-2 recall per layer (rpp / rpp + true earlier layers / earlier layers alone)")
        for layer, r in rows.items():
            print(f"  layer {layer}: {r['rpp']:.3f} / {r['rpp_plus_earlier']:.3f} / {r['earlier_only']:.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
