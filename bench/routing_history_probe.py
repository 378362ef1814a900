"""Probe: does the RPP predict better when it also sees the routing the model already executed?

At decoding step t the engine knows every earlier token's routing (it ran them); the RPP as the paper has it
reads token ids only. This probe adds the previous position's (L, E) routing, multi-hot, as a second input
embedding (a linear map added to the token embedding, zero-initialised so training starts from the shipped
predictor's function), fine-tunes on the training traces, and scores B_acc with the true routing of the earlier
positions (what the engine would feed). Prompt positions see their own true routing too, which at run time is
known only after the prompt's forward: the figures are for decode steps, the ones B_acc scores.

    python bench/routing_history_probe.py --traces results/traces/alpaca_train_greedy.safetensors \
        results/traces/corpus_sampled.safetensors --epochs 3

Prints B_acc / precision per eval trace at batch 1 and 8, with and without the routing input, and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from expertflow.embedded import EMBEDDED_PREDICTOR_DIR
from expertflow.predictor.evaluate import EvalConfig, evaluate
from expertflow.predictor.metrics import routing_mask
from expertflow.predictor.model import RoutingPathModel, load_model
from expertflow.predictor.train import _batches, _collate, _pieces
from expertflow.traces import read_traces

EVAL_TRACES = ("alpaca_heldout", "xsum_eval", "wmt16_eval")


class HistoryRPP(nn.Module):
    """A trained RPP plus a routing-history embedding added to its token embedding."""

    def __init__(self, base: RoutingPathModel) -> None:
        super().__init__()
        cfg = base.config
        self.base = base
        self.history = nn.Linear(cfg.num_layers * cfg.num_experts, cfg.d_model, bias=False)
        nn.init.zeros_(self.history.weight)

    def forward(self, ids: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """ids (B, S), previous (B, S, L, E): the routing of position t-1 at t (zeros at 0) -> (B, S, L, E)."""
        b = self.base
        x = b.drop(b.embed(ids) + self.history(previous.flatten(2)))
        biases = b.window_biases(ids.shape[1], ids.device)
        memory = x
        for block in b.encoder:
            memory, _ = block(memory, biases.encoder)
        memory = b.enc_norm(memory)
        y = x
        for block in b.decoder:
            y, _, _ = block(y, memory, biases.decoder, biases.cross)
        return b.logits(y)


def shifted(targets: torch.Tensor) -> torch.Tensor:
    """(B, S, L, E) routing -> the previous position's at each position (zeros at the first)."""
    return F.pad(targets, (0, 0, 0, 0, 1, 0))[:, :-1]


def train(model: HistoryRPP, pieces: list, epochs: int, lr: float, batch_size: int, history_lr: float) -> float:
    """The new history map gets its own (larger) rate: it starts at zero beside embeddings of norm ~10."""
    E = model.base.config.num_experts
    params = [p for p in model.parameters() if p.requires_grad]
    base = [p for n, p in model.named_parameters() if not n.startswith("history.")]
    opt = torch.optim.AdamW([{"params": base, "lr": lr}, {"params": model.history.parameters(), "lr": history_lr}],
                            weight_decay=0.01)
    total = epochs * math.ceil(len(pieces) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, history_lr], total_steps=total, pct_start=0.05)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        bar = tqdm(_batches(pieces, batch_size, rng), desc=f"epoch {epoch + 1}/{epochs}", unit="batch")
        for batch in bar:
            ids, targets, valid, _ = _collate(batch, E)
            logits = model(ids, shifted(targets))
            loss = (F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1) * valid).sum()
            loss = loss / valid.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return time.perf_counter() - start


def scorer(model: HistoryRPP, E: int, history: bool):
    cache: dict[int, np.ndarray] = {}

    @torch.no_grad()
    def scores(seq, positions: np.ndarray) -> np.ndarray:
        if id(seq) not in cache:
            ids = torch.as_tensor(seq.token_ids.astype(np.int64))[None]
            routing = torch.from_numpy(routing_mask(seq.routing, E)).float()[None]
            previous = shifted(routing) if history else torch.zeros_like(routing)
            cache[id(seq)] = torch.sigmoid(model(ids, previous))[0].numpy()
        return cache[id(seq)][positions]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", nargs="+", type=Path, required=True, help="training traces")
    parser.add_argument("--init-predictor", type=Path, default=EMBEDDED_PREDICTOR_DIR)
    parser.add_argument("--traces-dir", type=Path, default=Path("results/traces"), help="where the eval traces are")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--history-lr", type=float, default=1e-2, help="learning rate of the history map")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", type=Path, default=None, help="write the fine-tuned weights here (torch.save)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HistoryRPP(load_model(args.init_predictor))
    E = model.base.config.num_experts
    seqs = [s for path in args.traces for s in read_traces(path).sequences]
    seconds = train(model, _pieces(seqs, 512), args.epochs, args.lr, args.batch_size, args.history_lr)
    if args.save:
        torch.save(model.state_dict(), args.save)
    rows = []
    for name in EVAL_TRACES:
        traces = read_traces(args.traces_dir / f"{name}.safetensors")
        for history in (False, True):
            score = scorer(model, E, history)
            for batch in (1, 8):
                r = evaluate(traces, {"rpp": score}, EvalConfig(batch_size=batch))["rpp"]
                rows.append({"trace": name, "history": history, "batch_size": batch, "b_acc": r["b_acc"],
                             "precision": r["precision"]})
                print(f"{name:16s} history {history!s:5s} batch {batch}: B_acc {r['b_acc']:.3f} "
                      f"precision {r['precision']:.3f}", flush=True)
    print(json.dumps({"epochs": args.epochs, "history_lr": args.history_lr, "train_seconds": round(seconds),
                      "history_weight_mean_abs": float(model.history.weight.abs().mean()),
                      "train_tokens": sum(s.num_tokens for s in seqs), "results": rows}))


if __name__ == "__main__":
    main()
