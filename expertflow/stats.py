"""The figures of a run, in one dataclass every front end prints from (CLI table, --json, bench)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from expertflow.cache.expert_cache import CacheFigures


@dataclass(frozen=True)
class RunStats:
    """A generate call's figures. Cache counters are this run's deltas; peak and sizes are lifetime."""

    new_tokens: int
    prompt_tokens: int
    seconds: float
    prefill_seconds: float
    hits: int
    # The misses: routed experts not resident when their layer ran, loaded then (the paper's run-time
    # correction), so expert_loads = correction_loads + prefetch_loads. Once also called "misses" and
    # "demand_loads"; as_dict still writes "misses" for older scripts.
    correction_loads: int
    expert_loads: int
    prefetch_loads: int
    evictions: int
    bytes_moved: int
    cache_experts: int
    expert_bytes: int
    peak_expert_bytes: int
    all_expert_bytes: int
    prefetch_hits: int = 0          # prefetches the forward they were fetched for used
    wasted_prefetches: int = 0      # prefetches evicted before their forward used them
    stale_prefetches: int = 0       # prefetches still unused when their forward ended
    reloads: int = 0                # loads of an expert evicted within the last few forwards
    transfer_wait_seconds: float = 0.0  # time layers spent waiting for background transfers
    resident_bytes: int = 0         # fast-tier bytes of every non-expert weight
    transfer_reads: int = 0         # slow-tier reads run (loads whose transfer went stale never read)
    transfer_read_seconds: float = 0.0  # their durations summed (concurrent reads each count in full)
    transfer_busy_seconds: float = 0.0  # time at least one read was running

    @property
    def peak_fast_tier_bytes(self) -> int:
        """Resident weights + peak expert slots: what a --memory-budget bounds."""
        return self.resident_bytes + self.peak_expert_bytes

    @property
    def busy_ms_per_read(self) -> float | None:
        """The run's own cost of one read at the concurrency it ran with (None: no reads)."""
        return 1e3 * self.transfer_busy_seconds / self.transfer_reads if self.transfer_reads else None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def hit_ratio(self) -> float:
        uses = self.hits + self.correction_loads
        return self.hits / uses if uses else 1.0

    @classmethod
    def between(cls, before: CacheFigures, after: CacheFigures, *, new_tokens: int, prompt_tokens: int,
                seconds: float, prefill_seconds: float, resident_bytes: int = 0) -> "RunStats":
        delta = after.counters.minus(before.counters)
        reads = after.reads.minus(before.reads)
        return cls(
            new_tokens=new_tokens, prompt_tokens=prompt_tokens, seconds=seconds, prefill_seconds=prefill_seconds,
            hits=delta.hits, correction_loads=delta.correction_loads, expert_loads=delta.loads,
            prefetch_loads=delta.prefetch_loads,
            evictions=delta.evictions, bytes_moved=delta.loads * after.expert_bytes,
            cache_experts=after.capacity_experts, expert_bytes=after.expert_bytes,
            peak_expert_bytes=after.peak_expert_bytes, all_expert_bytes=after.all_expert_bytes,
            prefetch_hits=delta.prefetch_hits,
            wasted_prefetches=delta.wasted_prefetches, stale_prefetches=delta.stale_prefetches,
            reloads=delta.reloads,
            transfer_wait_seconds=after.wait_seconds - before.wait_seconds, resident_bytes=resident_bytes,
            transfer_reads=reads.reads, transfer_read_seconds=reads.read_seconds,
            transfer_busy_seconds=reads.busy_seconds,
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "misses": self.correction_loads, "tokens_per_s": self.tokens_per_s,
                "hit_ratio": self.hit_ratio,
                "peak_fast_tier_bytes": self.peak_fast_tier_bytes, "busy_ms_per_read": self.busy_ms_per_read}
