"""The bench sweep: plan every (system, cache size, batch size) run, measure each in a fresh subprocess,
check that every run produced the same tokens, and write the results.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from expertflow.bench.report import all_in_memory_row
from expertflow.bench.spec import BenchConfig, CacheSize, RunSpec
from expertflow.bench.systems import SYSTEMS, plans_from_forecast
from expertflow.conformance import inspect_model
from expertflow.errors import ExpertflowError


MIN_OWN_READS = 20  # fewer reads than this (a cache holding nearly everything) say little about the device


@dataclass(frozen=True)
class ModelShape:
    moe_layers: int
    experts: int
    top_k: int
    expert_bytes: int = 0     # one expert, as stored
    resident_bytes: int = 0   # every non-expert weight, as stored

    @property
    def total_experts(self) -> int:
        return self.moe_layers * self.experts

    @property
    def min_cache(self) -> int:
        return self.moe_layers * self.top_k  # one token's experts in every layer


def model_shape(model_dir: Path) -> ModelShape:
    """MoE layers (every stack), experts per layer and top-k, as the adapter finds them: no weights read."""
    report = inspect_model(model_dir)
    return ModelShape(len(report.moe_layers), report.experts_per_layer, report.top_k, report.expert_bytes,
                      report.resident_bytes)


def cache_slots(size: CacheSize, shape: ModelShape) -> int:
    return size.experts(shape.total_experts, shape.min_cache, shape.expert_bytes, shape.resident_bytes)


def plan_runs(config: BenchConfig, shape: ModelShape, prompts: list[list[int]], offload_dir: str) -> list[RunSpec]:
    """Batch size outermost, so a partial sweep still compares every system at the first batch size; within it
    the systems without a cache first, then each cache size's systems back to back, so the runs a ratio
    compares are the closest in time (this machine's disk speed drifts over minutes)."""
    budgets: dict[int, int | None] = {}
    for size in config.cache_sizes:
        budgets.setdefault(cache_slots(size, shape), size.budget_bytes(shape.total_experts, shape.expert_bytes,
                                                                       shape.resident_bytes) if size.whole_tier else None)
    uncached = [(name, None) for name in config.systems if not SYSTEMS[name].uses_cache_size]
    cached = [(name, experts) for experts in budgets for name in config.systems if SYSTEMS[name].uses_cache_size]
    return [RunSpec(
        memory_budget=budgets[experts] if experts is not None and SYSTEMS[name].policy else None,
        system=name, model=str(config.model), cache_experts=experts, batch_size=batch, prompts=prompts,
        max_new_tokens=config.max_new_tokens, store=config.store, device=config.device,
        page_cache=config.page_cache or config.store != "disk", dtype=config.dtype,
        predictor=str(config.predictor) if config.predictor else None,
        scheduler=config.scheduler if name == "expertflow" else "fifo",
        schedule_unit=config.schedule_unit, threads=config.threads, io_threads=config.io_threads,
        policy_settings=config.policy_settings if plans_from_forecast(name) else {},
        offload_dir=offload_dir) for batch in config.batch_sizes for name, experts in uncached + cached]


def measure(spec: RunSpec) -> dict:
    """Run `spec` in a fresh interpreter; its last stdout line is the result."""
    done = subprocess.run([sys.executable, "-m", "expertflow.bench.worker"], input=json.dumps(spec.to_json()),
                          capture_output=True, text=True)
    if done.returncode == -signal.SIGKILL and spec.system == "accelerate" and not spec.page_cache:
        raise ExpertflowError(f"bench run accelerate (cache {spec.cache_experts}, batch {spec.batch_size}) was killed, "
                              "most likely by its memory cgroup's limit (see expertflow/bench/hf.py WORKING_HEADROOM); "
                              "rerun with --page-cache to leave its page cache unbounded")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExpertflowError(f"bench run {spec.system} (cache {spec.cache_experts}, batch {spec.batch_size}) "
                              f"failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(config: BenchConfig, prompts: list[list[int]],
              checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Every run of the sweep -> the results document (rows without token ids, plus the token check).
    `checkpoint` gets the document so far after each run, so a long sweep leaves partial results behind."""
    if not prompts:
        raise ExpertflowError("no prompts to bench")
    shape = model_shape(config.model)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="expertflow-bench-") as scratch:
        plan = plan_runs(config, shape, prompts, scratch)
        # Whole sweeps one after another, so a machine's drift over time reaches every system alike.
        for spec in tqdm(plan * config.repeats, desc="bench", unit="run", disable=None):
            rows.append(_row(spec, measure(spec), shape))
            if checkpoint is not None:
                checkpoint(_document(config, shape, prompts, rows))
    return _document(config, shape, prompts, rows)


def _document(config: BenchConfig, shape: ModelShape, prompts: list[list[int]], rows: list[dict]) -> dict:
    reference = _reference(rows)
    results = []
    for runs in _by_point(rows):
        mismatched = max(sum(a != b for a, b in zip(run["sequences"], reference)) for run in runs)
        results.append({**{k: v for k, v in median_run(runs).items() if k != "sequences"},
                        "tokens_per_s_runs": [run["tokens_per_s"] for run in runs],
                        "mismatched_sequences": mismatched, "same_tokens": mismatched == 0})
    costs = config.notes.get("expert_costs")
    for row in results:
        cached = row.get("belady_loads") is not None
        row["read_ms"], row["read_ms_from"] = read_ms(row["notes"], costs) if cached else (None, "none")
        row["belady_ceiling_tokens_per_s"] = belady_ceiling(row, all_in_memory_row(results, row["batch_size"]))
    return {"same_tokens": all(r["same_tokens"] for r in results), "results": results,
            "setup": _setup(config, shape, prompts, rows)}


def _row(spec: RunSpec, got: dict, shape: ModelShape) -> dict:
    experts = got.get("cache_experts") or spec.cache_experts or shape.total_experts  # the engine's own count first
    return {
        "system": spec.system, "cache_experts": experts, "cache_share": experts / shape.total_experts,
        "planned_cache_experts": spec.cache_experts,  # the sweep's size this run stands for (None: no cache)
        "batch_size": spec.batch_size,
        "tokens_per_s": got["new_tokens"] / got["seconds"] if got["seconds"] > 0 else 0.0,
        "prefill_seconds": got["prefill_seconds"],
        "decode_tokens_per_s": _decode_rate(got),
        "peak_expert_bytes": got["peak_expert_bytes"],
        "peak_fast_tier_bytes": got["peak_expert_bytes"] + got["resident_bytes"],
        "peak_rss_bytes": got["peak_rss_bytes"], "baseline_rss_bytes": got["baseline_rss_bytes"],
        "hit_ratio": got["hit_ratio"], "expert_loads": got["expert_loads"], "bytes_moved": got["bytes_moved"],
        "belady_loads": got["belady_loads"],
        "loads_vs_belady": got["expert_loads"] / got["belady_loads"] if got["belady_loads"] else None,
        "all_expert_bytes": got["all_expert_bytes"], "new_tokens": got["new_tokens"], "seconds": got["seconds"],
        # the token scheduler's measure, and the RPP's batch-level accuracy on the decode batches as they ran
        "activated_experts_per_batch": got["notes"].get("activated_experts_per_batch"),
        "activated_experts_per_token": got["notes"].get("activated_experts_per_token"),
        "forecast_b_acc": (got["notes"].get("forecast_accuracy") or {}).get("b_acc"),
        "forecast_precision": (got["notes"].get("forecast_accuracy") or {}).get("precision"),
        "notes": got["notes"], "sequences": got["sequences"],
    }


def belady_ceiling(row: dict, base: dict | None) -> float | None:
    """The tokens/s the run could reach had it loaded only Belady's experts for its routing, each at the
    run's own cost of a read (`read_ms`), with every read hidden behind compute as fast as all-in-memory's
    (or that compute behind the reads): an estimate of the limit for any cache policy on this disk at the
    run's read concurrency. None without a Belady replay, an all-in-memory run at the batch size or a read cost."""
    read_ms = row.get("read_ms")
    if row.get("belady_loads") is None or base is None or read_ms is None:
        return None
    seconds = max(base["seconds"], row["belady_loads"] * read_ms / 1e3)
    return row["new_tokens"] / seconds if seconds > 0 else None


def read_ms(notes: dict, costs: dict | None) -> tuple[float | None, str]:
    """One expert read's cost for a run's ceiling, and where it came from: the run's own reads (the slow
    tier's busy time per read) when it read enough to tell, else the read timed once before the sweep."""
    if notes.get("transfer_reads", 0) >= MIN_OWN_READS:
        return notes["busy_ms_per_read"], "the run's own reads"
    if costs:
        return costs["load_ms"], "one read timed before the sweep"
    return None, "none"


def _by_point(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped by (system, cache size, batch size), in the order the points were first measured."""
    points: dict[tuple, list[dict]] = {}
    for row in rows:
        points.setdefault((row["system"], row["cache_experts"], row["batch_size"]), []).append(row)
    return list(points.values())


def median_run(runs: list[dict]) -> dict:
    """The repeat whose tokens/s is the median (the lower middle one for an even count): a real run whose
    figures belong together, not a blend of several."""
    return sorted(runs, key=lambda run: run["tokens_per_s"])[(len(runs) - 1) // 2]


def _decode_rate(got: dict) -> float:
    """Tokens after each sequence's first, per second of the run beyond its prefill pass (0: prefill took it all)."""
    decode_seconds = got["seconds"] - got["prefill_seconds"]
    later_tokens = got["new_tokens"] - len(got["sequences"])
    return later_tokens / decode_seconds if decode_seconds > 0 and later_tokens > 0 else 0.0


def _reference(rows: list[dict]) -> list[list[int]]:
    """The tokens every run must match: plain transformers one prompt at a time if it ran, else the first run."""
    for row in rows:
        if row["system"] == "all-in-memory" and row["batch_size"] == 1:
            return row["sequences"]
    return rows[0]["sequences"]


def _size_note(size: CacheSize, shape: ModelShape) -> dict:
    """How a requested size became slots; a whole-tier budget also says its bytes."""
    note = {"asked": size.text, "kind": "memory budget" if size.whole_tier else "expert slots",
            "cache_experts": cache_slots(size, shape)}
    if size.whole_tier:
        note["memory_budget_bytes"] = size.budget_bytes(shape.total_experts, shape.expert_bytes, shape.resident_bytes)
    return note


def _setup(config: BenchConfig, shape: ModelShape, prompts: list[list[int]], rows: list[dict]) -> dict:
    # What the engine's stores reported (O_DIRECT or not depends on the file system); else what was asked for.
    reads = sorted({row["notes"]["slow_tier_reads"] for row in rows if "slow_tier_reads" in row["notes"]})
    return {
        "model": str(config.model), "dataset": config.dataset, "prompts": len(prompts),
        "max_new_tokens": config.max_new_tokens, "decoding": "greedy", "threads": config.threads,
        "io_threads": config.io_threads,  # transfers at once where a policy prefetches; lru/lfu load on demand
        "repeats": config.repeats,  # each point's row is its median-tokens/s repeat; tokens_per_s_runs holds all
        "prefetch_threshold": config.policy_settings.get("threshold"),  # the expertflow system's (None: 0.5)
        "policy_settings": config.policy_settings,  # the expertflow system's PLECConfig knobs ({}: defaults)
        "store": config.store, "device": config.device, "dtype": config.dtype, "moe_layers": shape.moe_layers, "experts_per_layer": shape.experts,
        "top_k": shape.top_k, "total_experts": shape.total_experts,
        "cache_sizes": [_size_note(size, shape) for size in config.cache_sizes],
        "disk_reads": "; ".join(reads) if reads else
                      ("page cache bypassed" if config.store == "disk" and not config.page_cache else
                       "through the OS page cache" if config.store == "disk" else "host RAM store (no disk)"),
        "accelerate": "infer_auto_device_map(max_memory={'cpu': resident + cache experts x expert bytes}), rest to "
                      "disk offload_folder; CPU-only so 'cpu' is the fast tier. Its reads go through the page cache, "
                      "bounded where the OS allows: see each row's notes.offload_reads",
        "token_reference": "all-in-memory, batch 1" if "all-in-memory" in config.systems and 1 in config.batch_sizes
                           else "the first run",
        "systems": {name: SYSTEMS[name].summary for name in config.systems},
        "scheduler": config.scheduler, "schedule_unit": config.schedule_unit, **config.notes,
    }
