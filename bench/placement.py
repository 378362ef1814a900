"""Offline evaluation of request placement across replicas: routing-aware vs round-robin, on real traces.

Each of R replicas runs continuous batching (at most B running sequences; arrivals queue) and has its own
expert cache (a policy, lru by default, at a fraction of the L*E experts) replayed through the same
`Residency`/`CachePlanner` as `expertflow simulate`. Requests arrive one every `gap` decode steps (default:
enough to keep about B sequences running per replica) and are placed on arrival from their predicted
routing path (the trained RPP over the prompt: top-k of the last token, or the union over the prompt).
Figures over decode forwards: cache hit ratio, expert loads, and distinct (layer, expert) pairs per forward.
Prints a table and a final JSON line.

    python bench/placement.py [--traces results/traces/alpaca_heldout.safetensors] [--predictor results/rpp-alpaca]
                              [--prompts 64] [--replicas 2 4 8] [--batch-size 4] [--cache-fraction 0.25]
                              [--path rpp-last|rpp-union|oracle-union] [--policy lru] [--gap STEPS]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

os.environ.setdefault("OMP_NUM_THREADS", "1")       # the box is shared

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from expertflow.distributed.placement import (Placement, ReplicaSet, RoundRobin, RoutingAware, RoutingPath,  # noqa: E402
                                              prompt_path, routing_path)
from expertflow.cache.policies import policy_class  # noqa: E402
from expertflow.cache.planner import CachePlanner  # noqa: E402
from expertflow.cache.residency import CacheCounters, Residency  # noqa: E402
from expertflow.simulator import Forward, replay_forward  # noqa: E402
from expertflow.traces import NO_EXPERT, TraceHeader, TraceSequence, read_traces  # noqa: E402

PLACEMENTS = {
    "round-robin": lambda: RoundRobin(),
    "routing jaccard s1": lambda: RoutingAware("jaccard", slack=1),
    "routing jaccard s2": lambda: RoutingAware("jaccard", slack=2),
    "routing new s2": lambda: RoutingAware("new", slack=2),
    "routing hamming s2": lambda: RoutingAware("hamming", slack=2),
}


@dataclass(eq=False)   # identity: requests hold arrays
class Request:
    seq: TraceSequence
    path: RoutingPath
    arrival: float
    pos: int = 0            # generated tokens fed so far


@dataclass(eq=False)
class Replica:
    planner: CachePlanner
    batch_size: int
    queue: list[Request] = field(default_factory=list)
    running: list[Request] = field(default_factory=list)
    decode: CacheCounters = field(default_factory=CacheCounters)
    distinct: list[int] = field(default_factory=list)   # distinct pairs per decode forward

    def step(self, layers: list[int], index: int, replicas: ReplicaSet) -> None:
        new = [self.queue.pop(0) for _ in range(min(len(self.queue), self.batch_size - len(self.running)))]
        if new:
            self._replay([r.seq.routing[: len(r.seq.prompt_ids)] for r in new], layers, prefill=True)
        self.running += new
        if not self.running:
            return
        rows = [r.seq.routing[len(r.seq.prompt_ids) + r.pos][None] for r in self.running]
        self._replay(rows, layers, prefill=False)
        for r in self.running:
            r.pos += 1
        for r in [r for r in self.running if r.pos >= len(r.seq.generated_ids)]:
            self.running.remove(r)
            replicas.remove(index, r.path)

    def _replay(self, rows: list[np.ndarray], layers: list[int], prefill: bool) -> None:
        routing = np.concatenate(rows)                                                # (N, L, K)
        experts = tuple(tuple(np.unique(c[c != NO_EXPERT]).tolist()) for c in routing.transpose(1, 0, 2))
        before = self.planner.residency.counters.copy()
        replay_forward(self.planner, Forward(experts, None, prefill), layers)
        if not prefill:
            delta = self.planner.residency.counters.minus(before)
            self.decode = CacheCounters(**{f: getattr(self.decode, f) + getattr(delta, f)
                                           for f in CacheCounters.__dataclass_fields__})
            self.distinct.append(sum(len(e) for e in experts))


def simulate(seqs: Sequence[TraceSequence], paths: Sequence[RoutingPath], header: TraceHeader,
             placement: Placement, num_replicas: int, batch_size: int, cache: int, policy: str,
             gap: float) -> list[Replica]:
    layers = list(range(header.num_layers))
    replicas = [Replica(CachePlanner(Residency(cache, policy_class(policy)(cache, layers, header.num_experts,
                                                                             header.top_k)), None), batch_size)
                for _ in range(num_replicas)]
    state = ReplicaSet(num_replicas)
    requests = [Request(s, p, i * gap) for i, (s, p) in enumerate(zip(seqs, paths)) if len(s.generated_ids)]
    step, waiting = 0, list(requests)
    while waiting or any(r.queue or r.running for r in replicas):
        while waiting and waiting[0].arrival <= step:
            request = waiting.pop(0)
            chosen = placement.choose(request.path, state)
            state.add(chosen, request.path)
            replicas[chosen].queue.append(request)
        for index, replica in enumerate(replicas):
            replica.step(layers, index, state)
        step += 1
    return replicas


def request_paths(seqs: Sequence[TraceSequence], predictor_dir: str, top_k: int, mode: str) -> list[RoutingPath]:
    if mode == "oracle-union":   # the prompt's true routing: an upper bound on what prediction can give
        return [routing_path(s.routing[: len(s.prompt_ids)]) for s in seqs]
    from expertflow.predictor.runtime import RoutingPredictor

    predictor = RoutingPredictor.load(predictor_dir)
    rpp_mode = mode.removeprefix("rpp-")
    return [prompt_path(predictor.predict([s.prompt_ids.tolist()])[0].numpy(), top_k, rpp_mode) for s in seqs]


def summarize(replicas: list[Replica]) -> dict[str, float]:
    hits = sum(r.decode.hits for r in replicas)
    uses = sum(r.decode.uses for r in replicas)
    distinct = [d for r in replicas for d in r.distinct]
    return {"hit_ratio": hits / uses if uses else 1.0,
            "loads": sum(r.decode.loads for r in replicas),
            "distinct_per_forward": float(np.mean(distinct)) if distinct else 0.0,
            "decode_forwards": len(distinct),
            "per_replica_hit_ratio": [round(r.decode.hit_ratio, 4) for r in replicas]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--traces", default="results/traces/alpaca_heldout.safetensors")
    ap.add_argument("--predictor", default="results/rpp-alpaca")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--replicas", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batch-size", type=int, default=4, help="running sequences per replica")
    ap.add_argument("--cache-fraction", type=float, default=0.25, help="of L*E experts, per replica")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--path", choices=["rpp-last", "rpp-union", "oracle-union"], default="rpp-last")
    ap.add_argument("--gap", type=float, default=None, help="decode steps between arrivals")
    args = ap.parse_args()

    traces = read_traces(args.traces)
    h = traces.header
    seqs = traces.sequences[: args.prompts]
    paths = request_paths(seqs, args.predictor, h.top_k, args.path)
    cache = max(1, round(args.cache_fraction * h.num_layers * h.num_experts))
    mean_len = float(np.mean([len(s.generated_ids) for s in seqs]))
    table = Table("replicas", "placement", "hit ratio", "loads", "distinct / forward", "forwards", "per replica")
    results = []
    for n in args.replicas:
        gap = args.gap if args.gap is not None else mean_len / (n * args.batch_size)
        base = None
        for name, make in PLACEMENTS.items():
            figures = summarize(simulate(seqs, paths, h, make(), n, args.batch_size, cache, args.policy, gap))
            base = base or figures
            results.append({"replicas": n, "placement": name, "gap": gap, **figures})
            table.add_row(str(n), name, f"{figures['hit_ratio']:.3f} ({figures['hit_ratio'] - base['hit_ratio']:+.3f})",
                          str(figures["loads"]), f"{figures['distinct_per_forward']:.1f}",
                          str(figures["decode_forwards"]), " ".join(map(str, figures["per_replica_hit_ratio"])))
    console = Console(width=150)
    console.print(f"{len(seqs)} prompts of {args.traces}, paths {args.path}, cache {cache}/{h.num_layers * h.num_experts}"
                  f" experts per replica ({args.policy}), batch {args.batch_size}")
    console.print(table)
    print(json.dumps({"traces": args.traces, "prompts": len(seqs), "path": args.path, "cache_experts": cache,
                      "policy": args.policy, "batch_size": args.batch_size, "results": results}))


if __name__ == "__main__":
    main()
