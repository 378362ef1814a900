"""The systems a bench compares, by name: what each is, whether a cache size applies to it, and what a run of
one measures. How each runs is `runners.RUNNERS`; this catalogue imports none of them, so a sweep's config
can check its system names without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WARMUP_TOKENS = 2  # new tokens every system decodes once before its timed run


@dataclass
class Measured:
    sequences: list[list[int]]        # generated ids per prompt, EOS included, in prompt order
    seconds: float
    prefill_seconds: float            # the same batches for one new token each, timed after the run
    peak_expert_bytes: int            # fast-tier bytes held by experts at peak
    resident_bytes: int               # fast-tier bytes of every non-expert weight
    all_expert_bytes: int
    hit_ratio: float | None           # None: the system has no expert cache to hit
    expert_loads: int = 0
    bytes_moved: int = 0
    belady_loads: int | None = None   # Belady's MIN over the timed run's demand uses (engine systems)
    cache_experts: int | None = None  # the slots an engine ran with (it sizes them itself from a byte budget)
    notes: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(map(len, self.sequences))


@dataclass(frozen=True)
class System:
    uses_cache_size: bool             # False: one run per batch size, cache size does not apply
    policy: str | None = None         # the engine cache policy, for engine systems
    summary: str = ""


SYSTEMS: dict[str, System] = {
    "all-in-memory": System(uses_cache_size=False,
                            summary="transformers generate, every weight in memory (the speed limit)"),
    "accelerate": System(uses_cache_size=True,
                         summary="transformers + accelerate device_map under the budget, rest in offload_folder"),
    "lru": System(True, "lru", "expertflow engine, per-layer LRU cache (Cache-MoE)"),
    "lfu": System(True, "lfu", "expertflow engine, LFU cache"),
    "ring": System(True, "ring", "expertflow engine, ring prefetch of the next layers (SE-MoE)"),
    "pregated": System(True, "pregated", "expertflow engine, next-layer pre-gating (Pregated-MoE)"),
    "expertflow": System(True, "expertflow", "expertflow engine: RPP + token scheduler + PLEC"),
    "expertflow-no-ts": System(True, "expertflow",
                               "expertflow engine without the token scheduler: RPP + PLEC, batches in prompt order"),
}


def plans_from_forecast(name: str) -> bool:
    """Whether the system's cache plans from the RPP (it needs a predictor and takes PLEC's settings)."""
    return SYSTEMS[name].policy == "expertflow"
