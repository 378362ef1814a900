"""Live token scheduling on the embedded model: fifo vs similarity vs swap, side by side in one run.

For each batch size B and scheduling unit U, every scheduler decodes the same real prompts through the
engine (per-layer LRU cache at --cache-experts) and reports distinct activated (layer, expert) pairs
per batch forward, expert loads, hit ratio and tokens/s, and whether all schedulers produced the same
tokens. Prints a table and ends with one JSON line.

    python tools/live_scheduling.py [--predictor expertflow/models/tiny-mixtral-32e-rpp] [--dataset xsum]
                                    [--prompts 32] [--batch-sizes 4,8,16] [--units 2,4]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from tqdm import tqdm

import expertflow
from expertflow.cli.report import print_table
from expertflow.datasets import load_prompts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="xsum")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128, help="keep each prompt's last N tokens")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--cache-experts", type=int, default=64)
    parser.add_argument("--batch-sizes", default="4,8,16")
    parser.add_argument("--units", default="2,4")
    parser.add_argument("--schedulers", default="fifo,similarity,swap")
    parser.add_argument("--predictor", default=None, help="RPP directory (default: previous-token routing)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = expertflow.from_pretrained(cache_experts=args.cache_experts, predictor=args.predictor)
    prompts = [model.encode(p)[-args.prompt_tokens:] for p in load_prompts(args.dataset, limit=args.prompts)]
    grid = [(b, u, s) for b in map(int, args.batch_sizes.split(",")) for u in map(int, args.units.split(","))
            for s in args.schedulers.split(",")]
    results, outputs = [], {}
    for b, u, s in tqdm(grid, desc="live scheduling", disable=None):
        out = model.generate_many(input_ids=prompts, batch_size=b, schedule_unit=u, scheduler=s,
                                  max_new_tokens=args.max_new_tokens)
        outputs[(b, u, s)] = out.sequences
        results.append({"batch_size": b, "schedule_unit": u, "scheduler": s,
                        "activated_experts_per_batch": out.activated_experts_per_batch,
                        "expert_loads": out.stats.expert_loads, "hit_ratio": out.stats.hit_ratio,
                        "tokens_per_s": out.stats.tokens_per_s, "schedule_seconds": out.schedule_seconds,
                        "schedule_wait_seconds": out.schedule_wait_seconds})
    base = {(r["batch_size"], r["schedule_unit"]): r for r in results if r["scheduler"] == "fifo"}
    rows = []
    for r in results:
        f = base.get((r["batch_size"], r["schedule_unit"]))
        cut = 1 - r["activated_experts_per_batch"] / f["activated_experts_per_batch"] if f else float("nan")
        r["reduction_vs_fifo"] = cut
        rows.append((f"{r['schedule_unit']}x{r['batch_size']}", r["scheduler"],
                     f"{r['activated_experts_per_batch']:.1f}", f"{cut:+.1%}", r["expert_loads"],
                     f"{r['hit_ratio']:.3f}", f"{r['tokens_per_s']:.1f}",
                     f"{r['schedule_seconds']:.2f} / {r['schedule_wait_seconds']:.2f}"))
    same = len({json.dumps(v) for v in outputs.values()}) == 1
    print_table(f"live scheduling, {args.dataset} x{len(prompts)}, lru {args.cache_experts}, "
                f"routing from {args.predictor or 'previous token'} (same tokens: {same})",
                ("U x B", "scheduler", "experts/batch", "vs fifo", "loads", "hit", "tok/s", "sched s (exposed)"), rows)
    print(json.dumps({"same_tokens": same, "predictor": args.predictor, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
