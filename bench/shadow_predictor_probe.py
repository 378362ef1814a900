"""Probe: is a shrunk copy of the MoE model a better routing predictor than the T5-style RPP?

The "shadow" keeps the model's own embeddings, attention, norms and routers (frozen) and replaces each
expert by one of intermediate width R (initialised from the R most important rows of the real expert,
then distilled: teacher-forced MSE of each MoE block's output, optionally plus KL between the shadow's
free-running router softmax and the real one). Its router logits are then the routing forecast. The
teacher is the embedded model itself; training text is corpus paragraphs and alpaca train prompts.

    python bench/shadow_predictor_probe.py --width 16 --steps 300            # MSE only
    python bench/shadow_predictor_probe.py --width 16 --steps 1200 --kl 1.0  # plus router KL

Prints B_acc / precision at batch 1 and 8 on the eval traces (docs/results/predictor.md), a table row per
trace, and a final JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertflow.datasets import load_prompts
from expertflow.embedded import EMBEDDED_MODEL_DIR
from expertflow.predictor.evaluate import EvalConfig, evaluate
from expertflow.traces import read_traces

EVAL_TRACES = ("alpaca_heldout", "xsum_eval", "wmt16_eval")


def build_shadow(teacher: torch.nn.Module, width: int) -> torch.nn.Module:
    """The teacher's architecture with experts of intermediate `width`: non-expert weights copied, each
    expert's `width` rows of largest |gate|+|up| times |down column| kept (transformers 5 fused layout)."""
    cfg = copy.deepcopy(teacher.config)
    full = cfg.intermediate_size
    cfg.intermediate_size = width
    shadow = type(teacher)(cfg).eval()
    shadow.load_state_dict({k: v for k, v in teacher.state_dict().items() if ".experts." not in k}, strict=False)
    with torch.no_grad():
        for t_layer, s_layer in zip(teacher.model.layers, shadow.model.layers):
            te, se = t_layer.mlp.experts, s_layer.mlp.experts
            for e in range(cfg.num_local_experts):
                gate, up = te.gate_up_proj[e, :full], te.gate_up_proj[e, full:]
                keep = (te.down_proj[e].norm(dim=0) * (gate.norm(dim=1) + up.norm(dim=1))).topk(width).indices
                se.gate_up_proj[e, :width], se.gate_up_proj[e, width:] = gate[keep], up[keep]
                se.down_proj[e] = te.down_proj[e][:, keep]
    for name, p in shadow.named_parameters():
        p.requires_grad_(".experts." in name)
    return shadow


def distill(teacher, shadow, seqs: list[list[int]], steps: int, kl_weight: float, batch: int = 16) -> float:
    L = len(teacher.model.layers)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, (i[0], o)))
             for n, layer in enumerate(teacher.model.layers)]
    params = [p for p in shadow.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for step in range(steps):
        chosen = [seqs[i] for i in rng.integers(0, len(seqs), batch)]
        n = max(len(s) for s in chosen)
        ids, mask = torch.full((batch, n), 1), torch.zeros(batch, n, dtype=torch.long)
        for i, s in enumerate(chosen):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        real = mask.reshape(-1).bool()
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=mask)
        loss = torch.zeros(())
        for n_layer in range(L):
            x, y = (t.reshape(-1, t.shape[-1])[real] for t in captured[n_layer])
            with torch.no_grad():
                router_logits, weights, index = teacher.model.layers[n_layer].mlp.gate(x)
            out = shadow.model.layers[n_layer].mlp.experts(x, index, weights)
            loss = loss + F.mse_loss(out, y) / y.pow(2).mean().clamp(min=1e-8)
            captured[n_layer] = (captured[n_layer][0], router_logits)
        if kl_weight > 0:
            free = shadow(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
            loss = loss + kl_weight * sum(
                F.kl_div(F.log_softmax(free[n_layer][real], -1), F.log_softmax(captured[n_layer][1], -1),
                         log_target=True, reduction="batchmean") for n_layer in range(L))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    for hook in hooks:
        hook.remove()
    return time.perf_counter() - start


def shadow_scorer(shadow):
    cache: dict[int, np.ndarray] = {}

    def scores(seq, positions: np.ndarray) -> np.ndarray:
        if id(seq) not in cache:
            ids = torch.as_tensor(seq.token_ids.astype(np.int64))[None]
            with torch.no_grad():
                logits = shadow(input_ids=ids, output_router_logits=True).router_logits
            cache[id(seq)] = torch.stack([r.reshape(ids.shape[1], -1) for r in logits], 1).softmax(-1).numpy()
        return cache[id(seq)][positions]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16, help="shadow expert intermediate size")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--kl", type=float, default=0.0, help="weight of the free-running router KL term")
    parser.add_argument("--traces-dir", type=Path, default=Path("results/traces"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32).eval()
    shadow = build_shadow(teacher, args.width)
    texts = load_prompts("corpus", limit=4000) + load_prompts("alpaca", limit=800)
    seqs = [ids for ids in (tokenizer(t)["input_ids"][:128] for t in texts) if len(ids) >= 16]
    seconds = distill(teacher, shadow, seqs, args.steps, args.kl)
    own = sum(p.numel() for n, p in shadow.named_parameters() if ".experts." in n)
    rows = []
    for name in EVAL_TRACES:
        traces = read_traces(args.traces_dir / f"{name}.safetensors")
        scorer = shadow_scorer(shadow)
        for batch in (1, 8):
            r = evaluate(traces, {"shadow": scorer}, EvalConfig(batch_size=batch))["shadow"]
            rows.append({"trace": name, "batch_size": batch, "b_acc": r["b_acc"], "precision": r["precision"]})
            print(f"{name:16s} batch {batch}: B_acc {r['b_acc']:.3f} precision {r['precision']:.3f}", flush=True)
    print(json.dumps({"width": args.width, "steps": args.steps, "kl": args.kl, "train_seconds": round(seconds),
                      "shadow_expert_parameters": own, "results": rows}))


if __name__ == "__main__":
    main()
