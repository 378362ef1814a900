"""PLEC's knobs (`PLECConfig`) swept on recorded traces: hit ratio and loads of each setting against Belady's.

Each setting replays the same decode batches through `expertflow.simulator.sweep` with PLEC built with it;
Belady's MIN is the floor. Tune on splits the eval figures never use, then check the chosen setting on the eval
traces. Prints a table and ends with one JSON line.

    python tools/plec_settings.py --traces FILE [FILE ...] [--threshold 0.3,0.4,0.5] [--lead none,1]
        [--cache-experts 10%,25%] [--batch-size 1,8,16] [--transfer-ratio 15] [--predictor DIR|oracle|tlp]

Trace files come from `expertflow trace`; the tuning splits are xsum / wmt16 prompts 400-499, e.g.
`expertflow trace --dataset xsum --skip 400 --samples 100 --out results/traces/xsum_tune.safetensors`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the box is shared

from expertflow.cache.policies.plec import PLECConfig  # noqa: E402
from expertflow.calibrate import predictions_for  # noqa: E402
from expertflow.cli.report import print_json_line, print_table  # noqa: E402
from expertflow.embedded import EMBEDDED_PREDICTOR_DIR  # noqa: E402
from expertflow.simulator import sweep  # noqa: E402
from expertflow.traces import read_traces  # noqa: E402


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _cache(text: str, total: int) -> int:
    return max(1, round(float(text[:-1]) / 100 * total)) if text.endswith("%") else int(text)


def study(path: Path, predictor: str, settings: list[PLECConfig], caches: list[str], batches: list[int],
          ratio: float) -> list[dict]:
    """One row per (setting, batch, cache): PLEC's hit ratio and loads, against Belady's."""
    traces = read_traces(path)
    h = traces.header
    sizes = {_cache(text, h.num_layers * h.num_experts): text for text in caches}
    predictions = predictions_for(traces, predictor)
    rows = []
    for setting in settings:
        knobs = {"expertflow": dataclasses.asdict(setting)}
        for r in sweep(traces, ["expertflow"], list(sizes), batches, ratio, predictions, settings=knobs):
            c = r.counters
            rows.append({"traces": path.stem, "cache": sizes[r.config.cache_experts],
                         "cache_experts": r.config.cache_experts, "batch_size": r.config.batch_size,
                         **knobs["expertflow"], "hit_ratio": c.hit_ratio, "loads": c.loads,
                         "wasted": c.wasted_prefetches, "loads_vs_belady": r.loads_vs_belady})
    return rows


def _lead(text: str) -> int | None:
    return None if text.strip().lower() == "none" else int(text)


def main() -> None:
    default = PLECConfig()  # each knob's default is the engine's own, so an unswept knob stays as shipped
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", nargs="+", type=Path, required=True)
    parser.add_argument("--predictor", default=str(EMBEDDED_PREDICTOR_DIR),
                        help="RPP directory, or oracle (the true routing) or tlp (the previous token's)")
    parser.add_argument("--threshold", default=str(default.threshold))
    parser.add_argument("--spare-threshold", default=str(default.spare_threshold))
    parser.add_argument("--beta", default=str(default.beta))
    parser.add_argument("--decay", default=str(default.decay))
    parser.add_argument("--lead", default=str(default.lead), help="layers, comma-separated; none: measured")
    parser.add_argument("--refetch-discount", default=str(default.refetch_discount))
    parser.add_argument("--cache-experts", default="10%,25%")
    parser.add_argument("--batch-size", default="1,8,16")
    parser.add_argument("--transfer-ratio", type=float, default=15.0)
    args = parser.parse_args()
    leads = [_lead(t) for t in args.lead.split(",") if t.strip()]
    settings = [PLECConfig(threshold=t, spare_threshold=sp, beta=b, decay=d, lead=lead, refetch_discount=r)
                for t, sp, b, d, lead, r in itertools.product(_floats(args.threshold), _floats(args.spare_threshold),
                                                              _floats(args.beta), _floats(args.decay), leads,
                                                              _floats(args.refetch_discount))]
    caches = [c.strip() for c in args.cache_experts.split(",")]
    batches = [int(b) for b in args.batch_size.split(",")]
    rows = [row for path in args.traces
            for row in study(path, args.predictor, settings, caches, batches, args.transfer_ratio)]
    print_table(f"PLEC settings, transfer ratio {args.transfer_ratio}, predictor {args.predictor}",
                ("traces", "cache", "batch", "threshold", "spare", "beta", "decay", "lead", "refetch", "hit ratio",
                 "loads", "wasted", "loads/belady"),
                [[r["traces"], r["cache"], str(r["batch_size"]), str(r["threshold"]), str(r["spare_threshold"]),
                  str(r["beta"]), str(r["decay"]), str(r["lead"]), str(r["refetch_discount"]), f"{r['hit_ratio']:.3f}",
                  str(r["loads"]), str(r["wasted"]), f"{r['loads_vs_belady']:.2f}"] for r in rows])
    print_json_line({"results": rows})


if __name__ == "__main__":
    main()
