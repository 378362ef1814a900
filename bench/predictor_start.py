"""Micro-benchmark: `RoutingPredictor.start` on real prompts, one full-sequence forward (now) vs one
incremental step per prompt token (before, `incremental.feed_stepwise`), 1 thread.

    python bench/predictor_start.py [--predictor expertflow/models/tiny-mixtral-32e-rpp] \
        [--model expertflow/models/tiny-mixtral-32e] [--dataset alpaca] [--prompts 32] [--batch-sizes 1,8]

The first `--prompts` prompts of the set, tokenized by the model's tokenizer, are cut into consecutive
batches of each size; timed calls cycle through them, the two paths alternating, after a warm-up. Also
reported: one decoding `step` after the start (unchanged by this work, for scale), and the largest
difference between the two paths' last-token probabilities (dprob) and cached keys/values (dkv) over
every batch. `tokens` is the mean prompt length. Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")      # the box is shared; the engine's RPP runs on one thread

import torch  # noqa: E402  (after the thread settings)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from expertflow.embedded import EMBEDDED_MODEL_DIR, EMBEDDED_PREDICTOR_DIR  # noqa: E402
from expertflow.predictor.incremental import StepState, feed_stepwise  # noqa: E402
from expertflow.predictor.runtime import RoutingPredictor  # noqa: E402


def tokenized_prompts(model: str, dataset: str, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from expertflow.datasets import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(model)
    return [list(tokenizer(p)["input_ids"]) for p in load_prompts(dataset, limit=count)]


def stepwise_start(predictor: RoutingPredictor, prompts: list[list[int]]) -> tuple[StepState, torch.Tensor]:
    """`start` as it was: one incremental step per prompt token."""
    logits, state = feed_stepwise(predictor.model, prompts)
    return state, torch.sigmoid(logits)


def timed_ms(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return 1e3 * (time.perf_counter() - start)


def largest_difference(a: tuple[StepState, torch.Tensor], b: tuple[StepState, torch.Tensor]) -> tuple[float, float]:
    """Max |difference| of the probabilities, and of every cached key/value."""
    (sa, pa), (sb, pb) = a, b
    tensors = lambda s: [t for kvs in (s.encoder, s.decoder_self, s.decoder_cross)  # noqa: E731
                         for kv in kvs for t in kv]
    state = max(float((x - y).abs().max()) for x, y in zip(tensors(sa), tensors(sb), strict=True))
    return float((pa - pb).abs().max()), state


def measure(predictor: RoutingPredictor, prompts: list[list[int]], batch_size: int, repeats: int) -> dict:
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts) - batch_size + 1, batch_size)]
    for batch in batches[:2]:                                                           # warm-up
        stepwise_start(predictor, batch), predictor.start(batch)
    before, after, step = [], [], []
    for r in range(repeats):
        batch = batches[r % len(batches)]
        paths = [(before, stepwise_start), (after, predictor.start)]
        for times, fn in paths if r % 2 == 0 else paths[::-1]:
            times.append(timed_ms(fn, predictor, batch) if fn is stepwise_start else timed_ms(fn, batch))
        state, _ = predictor.start(batch)
        step.append(timed_ms(predictor.step, state, [ids[-1] for ids in batch]))
    diffs = [largest_difference(stepwise_start(predictor, b), predictor.start(b)) for b in batches]
    return {"batch_size": batch_size, "batches": len(batches),
            "mean_prompt_tokens": statistics.mean(len(ids) for b in batches for ids in b),
            "stepwise_ms": statistics.median(before), "one_pass_ms": statistics.median(after),
            "speedup": statistics.median(before) / statistics.median(after),
            "step_ms": statistics.median(step),
            "max_prob_diff": max(d[0] for d in diffs), "max_state_diff": max(d[1] for d in diffs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--predictor", default=str(EMBEDDED_PREDICTOR_DIR))
    p.add_argument("--model", default=str(EMBEDDED_MODEL_DIR), help="whose tokenizer makes the prompts' ids")
    p.add_argument("--dataset", default="alpaca")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(1)
    predictor = RoutingPredictor.load(args.predictor)
    prompts = tokenized_prompts(args.model, args.dataset, args.prompts)
    rows = [measure(predictor, prompts, int(b), args.repeats) for b in args.batch_sizes.split(",")]
    table = Table("batch", "tokens", "stepwise ms", "one-pass ms", "speed-up", "1 step ms", "max dprob", "max dkv",
                  title=f"RoutingPredictor.start, {args.dataset} prompts, {args.predictor}, 1 thread, median of "
                        f"{args.repeats}")
    for r in rows:
        table.add_row(str(r["batch_size"]), f"{r['mean_prompt_tokens']:.1f}", f"{r['stepwise_ms']:.2f}",
                      f"{r['one_pass_ms']:.2f}", f"{r['speedup']:.1f}x", f"{r['step_ms']:.2f}",
                      f"{r['max_prob_diff']:.1e}", f"{r['max_state_diff']:.1e}")
    Console(width=120).print(table)
    print(json.dumps({"predictor": args.predictor, "dataset": args.dataset, "prompts": args.prompts,
                      "repeats": args.repeats, "threads": torch.get_num_threads(), "results": rows}))


if __name__ == "__main__":
    main()
