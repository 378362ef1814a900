"""How predictable is routing at all? The MoE model itself, perturbed only by number format, as a predictor.

A routing predictor is scored on the top-k experts each token's router picks. Where a router's k-th and
(k+1)-th logits are nearly tied, the pick flips under tiny changes of the hidden state; no predictor that
only approximates the model can be expected to get those right. This script scores the model's own router
probabilities, computed in a lower precision (bf16 / fp16) on the traced tokens, with the same metrics
and batches as `expertflow eval-predictor`: a ceiling for any approximation of the model, and a
measure of how much of the routing is a near-tie.

    python bench/routing_ceiling.py --traces results/traces/xsum_eval.safetensors [--dtypes bfloat16,float16]
                                    [--batch-size 1,8] [--model DIR]

Prints a table and a final JSON line {"results": [{"dtype", "batch_size", "b_acc", "precision", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from expertflow.predictor.evaluate import EvalConfig, evaluate  # noqa: E402
from expertflow.traces import TraceSequence, read_traces  # noqa: E402

EMBEDDED = os.path.join(os.path.dirname(__file__), "..", "expertflow", "models", "tiny-mixtral-32e")


def router_scorer(model: AutoModelForCausalLM):
    """(sequence, positions) -> (G, L, E) router probabilities of the model run on the traced tokens."""

    @torch.inference_mode()
    def score(seq: TraceSequence, positions: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(seq.token_ids[None].astype(np.int64))
        logits = model(input_ids=ids, output_router_logits=True).router_logits      # L x (S, E)
        probs = torch.stack([torch.softmax(x.float(), dim=-1) for x in logits], dim=1)  # (S, L, E)
        return probs[positions].numpy()

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", required=True)
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--batch-size", default="1,8")
    args = parser.parse_args()
    traces = read_traces(args.traces)
    rows = []
    for dtype in args.dtypes.split(","):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype)).eval()
        scorer = router_scorer(model)
        for batch_size in (int(b) for b in args.batch_size.split(",")):
            r = evaluate(traces, {"model": scorer}, EvalConfig(batch_size=batch_size))["model"]
            rows.append({"dtype": dtype, "batch_size": batch_size, "b_acc": r["b_acc"],
                         "precision": r["precision"], "per_layer": r["per_layer"]})
    table = Table("dtype", "batch", "B_acc", "precision", "worst layer")
    for row in rows:
        table.add_row(row["dtype"], str(row["batch_size"]), f"{row['b_acc']:.3f}", f"{row['precision']:.3f}",
                      f"{min(row['per_layer']):.3f}")
    Console().print(table)
    print(json.dumps({"traces": args.traces, "results": rows}))


if __name__ == "__main__":
    main()
