"""How well do simple routing-history features rank an expert's next use (batch 1 decode)? A study.

For every decode forward of every sequence and every (layer, expert) key: the usage average PLEC keeps
(decay 0.9; `u9c` counts the prompt by its share of tokens), a fast average (decay 0.5), last-forward use,
the prompt's share of tokens routed to the key, whether the prompt used it, and forwards since its last use;
the target is "used within the next H forwards". Prints each feature's AUC and that of logistic fits on the
first trace file, tested on the second.

    python bench/reuse_features.py results/traces/xsum_tune.safetensors results/traces/wmt16_tune.safetensors

Shape legend: T tokens of a sequence, P its prompt tokens, L MoE layers, E experts, K top_k.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from expertflow.traces import TraceSequence, read_traces

FEATURES = ("u9", "u5", "u9c", "last", "pfrac", "pused", "since")
FITS = ([0], [2], [0, 3], [0, 1, 3], [2, 1, 3, 4], list(range(len(FEATURES))))
NEVER = 50  # forwards-since-last-use is capped here (and scaled to [0, 1])


def _one_hot(seq: TraceSequence, layers: int, experts: int) -> np.ndarray:
    """(T, L, E) 1 where a token was routed to an expert."""
    onehot = np.zeros((seq.routing.shape[0], layers, experts), np.float32)
    for k in range(seq.routing.shape[2]):
        np.put_along_axis(onehot, seq.routing[:, :, k].astype(int)[..., None], 1.0, axis=2)
    return onehot


def _sequence_rows(onehot: np.ndarray, prompt: int, horizon: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Feature rows (keys x FEATURES) and targets for each decode forward after the first of one sequence."""
    prompt_frac = onehot[:prompt].mean(0)
    used_prompt = (onehot[:prompt].sum(0) > 0).astype(np.float32)
    uses = [used_prompt] + list(onehot[prompt:])  # forward 0 is the prefill, forward j the (j-1)-th new token
    u9, u5, u9c = (np.zeros_like(prompt_frac) for _ in range(3))
    since = np.full_like(prompt_frac, NEVER)
    feats, targets = [], []
    for j, used in enumerate(uses[:-1]):
        u9 = 0.9 * u9 + 0.1 * used
        u5 = 0.5 * u5 + 0.5 * used
        u9c = 0.9 * u9c + 0.1 * (prompt_frac if j == 0 else used)
        since = np.where(used > 0, 0.0, since + 1)
        if j == 0:
            continue  # predict from a history holding at least one decode forward
        future = np.clip(sum(uses[j + 1: j + 1 + horizon]), 0, 1)
        columns = [u9, u5, u9c, used, prompt_frac, used_prompt, np.minimum(since, NEVER) / NEVER]
        feats.append(np.stack(columns, -1).reshape(-1, len(FEATURES)))
        targets.append(future.reshape(-1))
    return feats, targets


def rows(path: Path, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    traces = read_traces(path)
    h = traces.header
    feats, targets = [], []
    for seq in traces.sequences:
        if seq.routing.shape[0] - len(seq.prompt_ids) < 2:
            continue
        f, t = _sequence_rows(_one_hot(seq, h.num_layers, h.num_experts), len(seq.prompt_ids), horizon)
        feats += f
        targets += t
    return np.concatenate(feats), np.concatenate(targets)


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve, by the rank-sum (Mann-Whitney) formula."""
    ranks = np.empty(len(score))
    ranks[np.argsort(score)] = np.arange(len(score))
    positive = y > 0.5
    n1, n0 = positive.sum(), len(y) - positive.sum()
    return float((ranks[positive].sum() - n1 * (n1 - 1) / 2) / (n1 * n0))


def fit(x: np.ndarray, y: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Logistic regression by LBFGS on (x, y) -> (test probabilities, weights, bias)."""
    xt, yt = torch.tensor(x), torch.tensor(y)
    w = torch.zeros(xt.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        p = torch.sigmoid(torch.tensor(x_test) @ w + b).numpy()
    return p, w.detach().numpy(), b.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train", type=Path)
    parser.add_argument("test", type=Path)
    parser.add_argument("--horizons", default="1,4", help="forwards ahead the target looks (default 1,4)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for horizon in (int(h) for h in args.horizons.split(",")):
        x, y = rows(args.train, horizon)
        x_test, y_test = rows(args.test, horizon)
        print(f"horizon {horizon}: train {len(y)} rows, base rate {y.mean():.3f}")
        for i, name in enumerate(FEATURES):  # ties broken at random, so a binary feature is not favoured
            print(f"  {name}: auc {auc(x_test[:, i] + 1e-6 * rng.random(len(y_test)), y_test):.4f}")
        for cols in FITS:
            p, w, b = fit(x[:, cols], y, x_test[:, cols])
            loss = -np.mean(y_test * np.log(p + 1e-9) + (1 - y_test) * np.log(1 - p + 1e-9))
            print(f"  fit {[FEATURES[c] for c in cols]}: auc {auc(p, y_test):.4f} logloss {loss:.4f} "
                  f"w {np.round(w, 2)} b {b:.2f}")


if __name__ == "__main__":
    main()
