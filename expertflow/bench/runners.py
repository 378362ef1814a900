"""How each bench system runs: `RUNNERS` maps every system name to the function that turns a `RunSpec`
into a `Measured` run (the engine's here, the transformers baselines' in `hf`).

Every system decodes the same prompt ids greedily for the same number of new tokens, timed end to end
(prefill included) after a short warm-up; batches are formed in prompt order unless the system has a
token scheduler of its own (`expertflow`; `expertflow-no-ts` is the same system with batches in prompt
order, the paper's "w/o TS", so the scheduler's gain is measured side by side). After the timed run, the
same batches are run once more for one new token each: that pass's time is the run's prefill cost (time to
first token), the same way for every system, so decode throughput can be told apart from prompt
processing. Its loads are not counted.
An engine run also logs the timed run's demand uses and replays them through Belady's MIN from the cache
state the run started in: the fewest loads any policy could have served that very routing with.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from expertflow.api import ExpertflowModel
from expertflow.bench.hf import run_accelerate, run_all_in_memory
from expertflow.bench.spec import RunSpec
from expertflow.bench.systems import SYSTEMS, WARMUP_TOKENS, Measured
from expertflow.config import EngineConfig
from expertflow.simulator import belady_loads
from expertflow.stats import RunStats


def run_engine(spec: RunSpec) -> Measured:
    """An expertflow engine run: the system's cache policy; generate_many batches (and, for `expertflow`,
    regroups with the token scheduler between steps)."""
    policy = SYSTEMS[spec.system].policy
    slots = None if spec.memory_budget is not None else spec.cache_experts
    model = ExpertflowModel(EngineConfig(model=spec.model, cache_experts=slots, memory_budget=spec.memory_budget,
                                         policy=policy,
                                         store=spec.store, page_cache=spec.page_cache and spec.store == "disk",
                                         dtype=spec.dtype, device=spec.device,
                                         predictor=spec.predictor, io_threads=spec.io_threads,
                                         policy_settings=spec.policy_settings))
    decoder_only = model.engine.parts.adapter.kind == "decoder"
    try:
        if decoder_only:
            model.generate_many(input_ids=spec.prompts[:1], batch_size=1, max_new_tokens=WARMUP_TOKENS)
            resident, uses = model.cache.record_uses()
            start = time.perf_counter()
            out = model.generate_many(input_ids=spec.prompts, batch_size=spec.batch_size, scheduler=spec.scheduler,
                                      schedule_unit=spec.schedule_unit, max_new_tokens=spec.max_new_tokens)
            seconds = time.perf_counter() - start
            model.cache.stop_recording()
            sequences, stats, notes = out.sequences, out.stats, {
                "activated_experts_per_batch": round(out.activated_experts_per_batch, 2),
                "activated_experts_per_token": round(out.activated_experts_per_token, 3),
                "decode_forwards": out.decode_forwards,
                "forecast_accuracy": _headline(out.forecast_accuracy)}
            start = time.perf_counter()
            model.generate_many(input_ids=spec.prompts, batch_size=spec.batch_size, max_new_tokens=1)
            prefill = time.perf_counter() - start
        else:  # encoder-decoder: no token scheduler yet, batches in prompt order
            sequences, stats, seconds, prefill, (resident, uses) = _generate_in_order(model, spec)
            notes = {"scheduler": "none (encoder-decoder: batches in prompt order)"}
    finally:
        model.close()
    policy = model.cache.residency.policy
    floor = belady_loads(uses, model.cache.residency.capacity, policy.layers, policy.num_experts, policy.top_k,
                         resident)
    return Measured(sequences=sequences, seconds=seconds, prefill_seconds=prefill,
                    peak_expert_bytes=stats.peak_expert_bytes,
                    resident_bytes=model.engine.parts.resident_bytes,
                    all_expert_bytes=stats.all_expert_bytes, hit_ratio=stats.hit_ratio,
                    expert_loads=stats.expert_loads, bytes_moved=stats.bytes_moved, belady_loads=floor,
                    cache_experts=model.cache.residency.capacity,
                    notes={"prefetch_hits": stats.prefetch_hits, "wasted_prefetches": stats.wasted_prefetches,
                           "transfer_wait_seconds": round(stats.transfer_wait_seconds, 3),
                           "transfer_reads": stats.transfer_reads,
                           "transfer_busy_seconds": stats.transfer_busy_seconds,
                           "transfer_read_seconds": stats.transfer_read_seconds,
                           "busy_ms_per_read": stats.busy_ms_per_read,
                           "slow_tier_reads": model.engine.parts.store.read_method, **notes})


def _headline(accuracy: dict | None) -> dict | None:
    """The live forecast accuracy's overall figures (per-layer lists stay out of every row)."""
    if accuracy is None:
        return None
    return {k: accuracy[k] for k in ("b_acc", "precision", "f1", "batches")}


def _generate_in_order(model, spec: RunSpec):
    """Batches of B prompts in order through `generate`; the cache figures span the whole timed run."""
    model.generate(input_ids=spec.prompts[:1], max_new_tokens=WARMUP_TOKENS)
    before = model.cache.figures()
    log = model.cache.record_uses()
    sequences: list[list[int]] = []
    start = time.perf_counter()
    for batch in spec.batches():
        sequences += model.generate(input_ids=batch, max_new_tokens=spec.max_new_tokens).sequences
    seconds = time.perf_counter() - start
    model.cache.stop_recording()
    stats = RunStats.between(before, model.cache.figures(), new_tokens=sum(map(len, sequences)),
                             prompt_tokens=sum(map(len, spec.prompts)), seconds=seconds, prefill_seconds=0.0)
    start = time.perf_counter()
    for batch in spec.batches():
        model.generate(input_ids=batch, max_new_tokens=1)
    return sequences, stats, seconds, time.perf_counter() - start, log


RUNNERS: dict[str, Callable[[RunSpec], Measured]] = {
    "all-in-memory": run_all_in_memory,
    "accelerate": run_accelerate,
    **{name: run_engine for name, system in SYSTEMS.items() if system.policy is not None},
}
