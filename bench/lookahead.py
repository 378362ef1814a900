"""How far must a forecast see? PLEC with an oracle forecast of the coming forward only (horizon 0), and
with oracle forecasts that also cover the next h forwards, against Belady's MIN.

Replays each trace through `expertflow.simulator.simulate` with `SimConfig.lookahead = h` (a simulator
option: every forward's forecast carries the true routing of the h forwards replayed after it, which
PLEC values by the discounted chance of the next use, see policies/plec.py). Horizon 0 is the most any
routing predictor can know, since the tokens of later forwards do not exist yet. Figures over decode
forwards: PLEC's hit ratio and loads / Belady's demand-paging loads. Prints a table, writes a PNG, and
ends with one JSON line.

    python bench/lookahead.py --traces results/traces/xsum_tune.safetensors [--horizons 0,1,2,4,8]
                              [--cache-experts 10%,25%] [--batch-size 1,8] [--transfer-ratio 15]
                              [--plot results/sim/lookahead.png] [--policy expertflow]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the box is shared

from expertflow.cli.report import print_json_line, print_table  # noqa: E402
from expertflow.cache.policies.forecast import one_hot_routing  # noqa: E402
from expertflow.simulator import SimConfig, batch_forwards, simulate  # noqa: E402
from expertflow.traces import TraceSet, read_traces  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _cache(text: str, total: int) -> int:
    return max(1, round(float(text[:-1]) / 100 * total)) if text.endswith("%") else int(text)


def study(traces: TraceSet, name: str, policy: str, horizons: list[int], caches: list[str], batches: list[int],
          ratio: float) -> list[dict]:
    """One row per (batch, cache, horizon): the policy's hit ratio and loads against Belady's."""
    h = traces.header
    layers = list(range(h.num_layers))
    oracle = [one_hot_routing(s.routing, h.num_experts) for s in traces.sequences]
    rows = []
    for batch in batches:
        forwards = batch_forwards(traces, batch, oracle)
        for text in caches:
            cache = _cache(text, h.num_layers * h.num_experts)
            floor = simulate(forwards, layers, h.num_experts, h.top_k, SimConfig("belady", cache, batch, ratio))
            for horizon in horizons:
                run = simulate(forwards, layers, h.num_experts, h.top_k,
                               SimConfig(policy, cache, batch, ratio, lookahead=horizon)).counters
                rows.append({"traces": name, "policy": policy, "cache": text, "cache_experts": cache,
                             "batch_size": batch, "horizon": horizon, "hit_ratio": run.hit_ratio, "loads": run.loads,
                             "reloads": run.reloads, "belady_loads": floor.counters.loads,
                             "belady_hit_ratio": floor.counters.hit_ratio,
                             "loads_vs_belady": run.loads / max(floor.counters.loads, 1)})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hit, loads) = plt.subplots(1, 2, figsize=(10, 4))
    for key in dict.fromkeys((r["traces"], r["cache"], r["batch_size"]) for r in rows):
        points = [r for r in rows if (r["traces"], r["cache"], r["batch_size"]) == key]
        label = f"{key[0]} {key[1]} b{key[2]}"
        hit.plot([r["horizon"] for r in points], [r["hit_ratio"] for r in points], marker="o", label=label)
        loads.plot([r["horizon"] for r in points], [r["loads_vs_belady"] for r in points], marker="o", label=label)
    loads.axhline(1.15, color="grey", linestyle="--", linewidth=1)
    hit.set(xlabel="forecast horizon h (forwards after the coming one)", ylabel="hit ratio", xscale="symlog")
    loads.set(xlabel="forecast horizon h (forwards after the coming one)", ylabel="loads / Belady", xscale="symlog")
    for ax in (hit, loads):
        ax.grid(alpha=0.3)
    loads.legend(fontsize=7)
    fig.suptitle("PLEC with an oracle forecast of the coming forward + h more", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--traces", nargs="+", type=Path, required=True)
    p.add_argument("--policy", default="expertflow")
    p.add_argument("--horizons", default="0,1,2,4,8")
    p.add_argument("--cache-experts", default="10%,25%")
    p.add_argument("--batch-size", default="1,8")
    p.add_argument("--transfer-ratio", type=float, default=15.0, help="expert loads per layer compute")
    p.add_argument("--plot", type=Path, default=Path("results/sim/lookahead.png"))
    args = p.parse_args()
    rows = [row for path in args.traces
            for row in study(read_traces(path), path.stem, args.policy, _ints(args.horizons),
                             args.cache_experts.split(","), _ints(args.batch_size), args.transfer_ratio)]
    print_table(f"{args.policy} with an oracle forecast of h more forwards, transfer ratio {args.transfer_ratio}",
                ("traces", "cache", "batch", "h", "hit ratio", "loads", "re-loads", "belady loads", "loads/belady"),
                [[r["traces"], f"{r['cache']} ({r['cache_experts']})", r["batch_size"], r["horizon"],
                  f"{r['hit_ratio']:.3f}", r["loads"], r["reloads"], r["belady_loads"], f"{r['loads_vs_belady']:.2f}"]
                 for r in rows])
    plot(rows, args.plot)
    print_json_line({"transfer_ratio": args.transfer_ratio, "results": rows})


if __name__ == "__main__":
    main()
