"""One bench run in its own process: `python -m expertflow.bench.worker < spec.json`.

A fresh process per run is what makes peak RSS a per-system figure (the allocator never gives memory
back, so an in-process sweep would report the largest system's peak for everyone after it). The last
stdout line is the run's JSON.
"""

from __future__ import annotations

import json
import resource
import sys

import torch

from expertflow.bench.runners import RUNNERS
from expertflow.bench.spec import RunSpec


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(spec: RunSpec) -> dict:
    torch.set_num_threads(spec.threads)
    start_rss = _peak_rss_bytes()  # python + torch + transformers imported, no model yet
    measured = RUNNERS[spec.system](spec)
    return {
        "sequences": measured.sequences, "seconds": measured.seconds, "new_tokens": measured.new_tokens,
        "prefill_seconds": measured.prefill_seconds,
        "peak_expert_bytes": measured.peak_expert_bytes, "resident_bytes": measured.resident_bytes,
        "all_expert_bytes": measured.all_expert_bytes, "hit_ratio": measured.hit_ratio,
        "expert_loads": measured.expert_loads, "bytes_moved": measured.bytes_moved,
        "belady_loads": measured.belady_loads, "cache_experts": measured.cache_experts, "notes": measured.notes,
        "peak_rss_bytes": _peak_rss_bytes(), "baseline_rss_bytes": start_rss,
    }


def main() -> int:
    import transformers  # noqa: F401  imported before the baseline RSS is read, as every system needs it

    spec = RunSpec.from_json(json.loads(sys.stdin.read()))
    sys.stdout.write(json.dumps(run(spec)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
