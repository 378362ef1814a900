"""Load a running `expertflow serve` from a separate process: throughput and latency per concurrency level.

For each level C, C asyncio clients in a closed loop send greedy `/v1/completions` requests (real alpaca
prompts, fixed `max_tokens`) until the level's request count is done. Reports generated tokens/s over the
level's wall time, request latency p50/p95 (send to full response), and the server's cache figures for
the level (deltas of `/metrics`). Warm-up requests run first. Prints a table and ends with one JSON line.

    expertflow serve --cache-experts 64 --scheduler fifo --port 8101 --threads 1 &
    python tools/serve_load.py --url http://127.0.0.1:8101 --concurrency 1,8,32 --label fifo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import numpy as np

from expertflow.cli.report import print_table
from expertflow.datasets import load_prompts


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0})
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]


async def level(client: httpx.AsyncClient, model: str, prompts: list[str], concurrency: int,
                max_tokens: int) -> dict:
    """C clients, each taking the next prompt as soon as its previous answer arrives."""
    queue = list(reversed(prompts))
    results: list[tuple[float, int]] = []

    async def worker() -> None:
        while queue:
            results.append(await one(client, model, queue.pop(), max_tokens))

    before = (await client.get("/metrics")).json()["cache"]
    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    seconds = time.perf_counter() - start
    after = (await client.get("/metrics")).json()["cache"]
    latency = np.array([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "p50_s": float(np.percentile(latency, 50)),
            "p95_s": float(np.percentile(latency, 95)), "hit_ratio": hits / max(hits + misses, 1),
            "expert_loads": after["loads"] - before["loads"]}


async def run(args: argparse.Namespace) -> list[dict]:
    async with httpx.AsyncClient(base_url=args.url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = load_prompts(args.dataset, limit=args.prompts)
        for p in prompts[:2]:  # warm-up: first-call costs off the clock
            await one(client, model, p, 4)
        rows = []
        for c in args.concurrency:
            count = max(c * args.rounds, args.min_requests)
            rows.append(await level(client, model, [prompts[i % len(prompts)] for i in range(count)], c,
                                    args.max_tokens))
        return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dataset", default="alpaca")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--label", default="", help="a name for this server (e.g. its scheduler) in the output")
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    print_table(f"serve load {args.label} ({args.max_tokens} new tokens per request)",
                ("clients", "requests", "tokens/s", "p50 s", "p95 s", "hit ratio", "expert loads"),
                [(r["concurrency"], r["requests"], f"{r['tokens_per_s']:.1f}", f"{r['p50_s']:.2f}",
                  f"{r['p95_s']:.2f}", f"{r['hit_ratio']:.3f}", r["expert_loads"]) for r in rows])
    print(json.dumps({"label": args.label, "max_tokens": args.max_tokens, "levels": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
