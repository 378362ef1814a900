"""Can the RPP forecast the routing of the forward *after* the coming one? A study for PLEC's eviction.

PLEC values a resident by its chance of use in the coming forward (the RPP's forecast) and, beyond it, by a
usage average u. An oracle forecast of the next h forwards cuts loads a lot (`bench/lookahead.py`); history
features cannot rank next uses better than u (`bench/reuse_features.py`, AUC 0.911). This probe trains a
second set of heads on the shipped RPP's frozen trunk: at position t it predicts the routing of token t + 1
(the forward after the one token t starts). Scored at batch 1 decode on held-out traces, for the target
"key used in forward j + 1" while forward j runs: the future heads, u (including forward j's true routing:
more than PLEC knows then), the RPP's own forecast of forward j, and logistic fits combining them.

    python bench/future_routing_probe.py --train results/traces/alpaca_train_greedy.safetensors \
        --test results/traces/xsum_tune.safetensors results/traces/wmt16_tune.safetensors

Shape legend: B sequences, S positions, L MoE layers, E experts, K top_k.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from expertflow.predictor.metrics import routing_mask
from expertflow.predictor.model import RoutingPathModel, load_model
from expertflow.traces import TraceSequence, read_traces

_spec = importlib.util.spec_from_file_location("reuse_features", Path(__file__).with_name("reuse_features.py"))
reuse = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reuse)


def future_targets(seq: TraceSequence, experts: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """-> token ids (S,) and targets (S - shift, L, E): position t's target is token t + shift's routing."""
    mask = routing_mask(seq.routing, experts)
    return seq.token_ids, mask[shift:]


def train_heads(rpp: RoutingPathModel, seqs: list[TraceSequence], shift: int, epochs: int, lr: float,
                batch_size: int, tune_trunk: bool) -> torch.nn.Module:
    """Fresh heads (a copy of the RPP's, as a start) trained to predict routing `shift` tokens ahead."""
    model = copy.deepcopy(rpp)
    for p in model.parameters():
        p.requires_grad_(tune_trunk)
    for p in model.heads.parameters():
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    E = rpp.config.num_experts
    rows = [future_targets(s, E, shift) for s in seqs if len(s.token_ids) > shift + 1]
    rng = np.random.default_rng(0)
    for epoch in range(epochs):
        order = rng.permutation(len(rows))
        total, n = 0.0, 0
        started = time.perf_counter()
        for g in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[g:g + batch_size]]
            S = max(len(ids) for ids, _ in batch)
            ids = torch.zeros(len(batch), S, dtype=torch.long)
            target = torch.zeros(len(batch), S, rpp.config.num_layers, E)
            valid = torch.zeros(len(batch), S, dtype=torch.bool)
            for i, (tok, tgt) in enumerate(batch):
                ids[i, :len(tok)] = torch.from_numpy(tok.astype(np.int64))
                target[i, :len(tgt)] = torch.from_numpy(tgt)
                valid[i, :len(tgt)] = True
            logits = model(ids)
            loss = (F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((-1, -2))
                    * valid).sum() / valid.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        print(f"  epoch {epoch + 1}: loss {total / n:.4f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    return model


@torch.inference_mode()
def score_rows(rpp: RoutingPathModel, future: RoutingPathModel, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows (keys x [u9, future head, RPP forecast of forward j]) and targets for every decode forward j >= 1
    with a next forward, batch 1."""
    traces = read_traces(path)
    L, E = traces.header.num_layers, traces.header.num_experts
    feats, targets = [], []
    for seq in traces.sequences:
        P, T = len(seq.prompt_ids), seq.routing.shape[0]
        if T - P < 3:
            continue
        ids = torch.from_numpy(seq.token_ids.astype(np.int64))[None]
        p_now = torch.sigmoid(rpp(ids))[0].numpy()        # (S, L, E): position t forecasts token t
        p_next = torch.sigmoid(future(ids))[0].numpy()    # position t forecasts token t + 1
        onehot = reuse._one_hot(seq, L, E)
        u9 = 0.1 * (onehot[:P].sum(0) > 0)                # after the prefill (forward 0)
        for t in range(P, T - 1):                         # forward j = t - P + 1 runs token t
            u9 = 0.9 * u9 + 0.1 * onehot[t]
            feats.append(np.stack([u9, p_next[t - 1], p_now[t]], -1).reshape(-1, 3).astype(np.float32))
            targets.append(onehot[t + 1].reshape(-1))
    return np.concatenate(feats), np.concatenate(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictor", type=Path, default=Path("expertflow/models/tiny-mixtral-32e-rpp"))
    parser.add_argument("--train", type=Path, nargs="+", required=True)
    parser.add_argument("--test", type=Path, nargs="+", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tune-trunk", action="store_true", help="train the whole network, not only the heads")
    args = parser.parse_args()
    torch.manual_seed(0)
    rpp = load_model(args.predictor).eval()
    seqs = [s for path in args.train for s in read_traces(path).sequences]
    print(f"training future heads on {len(seqs)} sequences")
    future = train_heads(rpp, seqs, 1, args.epochs, args.lr, args.batch_size, args.tune_trunk)
    names = ("u9", "future head", "rpp now")
    fits = ([0], [1], [0, 1], [0, 2], [0, 1, 2])
    x, y = score_rows(rpp, future, args.test[0])
    for path in args.test:
        x_test, y_test = score_rows(rpp, future, path)
        print(f"{path.name}: {len(y_test)} rows, base rate {y_test.mean():.3f}")
        for i, name in enumerate(names):
            print(f"  {name}: auc {reuse.auc(x_test[:, i], y_test):.4f}")
        for cols in fits:
            p, w, b = reuse.fit(x[:, cols], y, x_test[:, cols])
            loss = -np.mean(y_test * np.log(p + 1e-9) + (1 - y_test) * np.log(1 - p + 1e-9))
            print(f"  fit {[names[c] for c in cols]} (fit on {args.test[0].name}): auc {reuse.auc(p, y_test):.4f} "
                  f"logloss {loss:.4f} w {np.round(w, 2)}")


if __name__ == "__main__":
    main()
