"""How well do simple routing-history features rank an expert's next use (batch 1 decode)? A study.

For every decode forward of every sequence and every (layer, expert) key: the usage average PLEC keeps
(decay 0.9; `u9c` counts the prompt by its share of tokens), a fast average (decay 0.5), last-forward use,
the prompt's share of tokens routed to the key, whether the prompt used it, and forwards since its last use;
the target is "used within the next H forwards". Prints each feature's AUC and that of logistic fits on the
first trace file, tested on the second.

    python bench/reuse_features.py results/traces/xsum_tune.safetensors results/traces/wmt16_tune.safetensors
"""
import sys
import numpy as np
import torch
from expertflow.traces import read_traces

def rows(path, horizon):
    t = read_traces(path); h = t.header; L, E = h.num_layers, h.num_experts
    feats, targets = [], []
    for s in t.sequences:
        P, T = len(s.prompt_ids), s.routing.shape[0]
        if T - P < 2: continue
        onehot = np.zeros((T, L, E), np.float32)
        for k in range(s.routing.shape[2]):
            idx = s.routing[:, :, k].astype(int)
            np.put_along_axis(onehot, idx[..., None], 1.0, axis=2)
        prompt_frac = onehot[:P].mean(0)
        used_prompt = (onehot[:P].sum(0) > 0).astype(np.float32)
        # forwards: 0 = prefill, j = generated token P+j-1
        ind = [used_prompt] + [onehot[P + j] for j in range(T - P)]
        u9 = np.zeros((L, E), np.float32); u5 = np.zeros((L, E), np.float32); u9c = np.zeros((L, E), np.float32)
        since = np.full((L, E), 50.0, np.float32)
        for j, x in enumerate(ind[:-1]):
            xc = prompt_frac if j == 0 else x
            u9 = 0.9 * u9 + 0.1 * x; u5 = 0.5 * u5 + 0.5 * x; u9c = 0.9 * u9c + 0.1 * xc
            since = np.where(x > 0, 0.0, since + 1)
            if j == 0: continue  # predict decode forwards j+1 from history through j (>= 1 decode seen)
            fut = np.clip(sum(ind[j + 1: j + 1 + horizon]), 0, 1)
            feats.append(np.stack([u9, u5, u9c, x, prompt_frac, used_prompt, np.minimum(since, 50) / 50], -1).reshape(-1, 7))
            targets.append(fut.reshape(-1))
    return np.concatenate(feats), np.concatenate(targets)

def auc(score, y):
    order = np.argsort(score); r = np.empty(len(score)); r[order] = np.arange(len(score))
    pos = y > 0.5; n1 = pos.sum(); n0 = len(y) - n1
    return (r[pos].sum() - n1 * (n1 - 1) / 2) / (n1 * n0)

def fit(X, y, Xt, yt):
    X = torch.tensor(X); y = torch.tensor(y); Xt = torch.tensor(Xt)
    w = torch.zeros(X.shape[1], requires_grad=True); b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)
    def closure():
        opt.zero_grad(); loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y); loss.backward(); return loss
    opt.step(closure)
    with torch.no_grad():
        p = torch.sigmoid(Xt @ w + b).numpy()
    return p, w.detach().numpy(), b.item()

names = ["u9", "u5", "u9c", "last", "pfrac", "pused", "since"]
for horizon in (1, 4):
    X, y = rows(sys.argv[1], horizon); Xt, yt = rows(sys.argv[2], horizon)
    print(f"horizon {horizon}: train {len(y)} rows, base rate {y.mean():.3f}")
    for i, n in enumerate(names):
        print(f"  {n}: auc {auc(Xt[:, i] + 1e-6 * np.random.rand(len(yt)), yt):.4f}")
    for cols in ([0], [2], [0, 3], [0, 1, 3], [2, 1, 3, 4], list(range(7))):
        p, w, b = fit(X[:, cols], y, Xt[:, cols], yt)
        ll = -np.mean(yt * np.log(p + 1e-9) + (1 - yt) * np.log(1 - p + 1e-9))
        print(f"  fit {[names[c] for c in cols]}: auc {auc(p, yt):.4f} logloss {ll:.4f} w {np.round(w, 2)} b {b:.2f}")
