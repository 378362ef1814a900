"""What a bench sweep runs: the validated sweep config, and one run (system x cache size x batch size).

A run spec crosses a process boundary (each run is measured in a fresh subprocess, so its peak RSS is
its own), so it is plain data that round-trips through JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from expertflow.bench.systems import SYSTEMS, plans_from_forecast
from expertflow.cache.policies import policy_settings
from expertflow.checkpoint import stored_dtype
from expertflow.config import DTYPES, STORE_NAMES, default_store, parse_size, slots_within
from expertflow.errors import ExpertflowError

ENGINE_SCHEDULERS = ("similarity", "swap", "exhaustive")


@dataclass(frozen=True)
class CacheSize:
    """A fast-tier budget: expert slots (an absolute count, or a share of every expert the model has), or,
    with `whole_tier`, bytes for the whole fast tier (a size, or a share of the all-in-memory footprint:
    every weight resident), of which the non-expert weights come first and the rest buys expert slots."""

    text: str
    whole_tier: bool = False

    def experts(self, total: int, minimum: int, expert_bytes: int = 0, resident_bytes: int = 0) -> int:
        """Slots for a model with `total` experts of `expert_bytes` each and `resident_bytes` of other weights;
        a share of experts is never below `minimum` (one token's experts per layer), a memory budget that
        leaves fewer fails."""
        if not self.whole_tier:
            if self.text.endswith("%"):
                return max(round(total * float(self.text[:-1]) / 100), minimum)
            return int(self.text)
        slots = slots_within(self.budget_bytes(total, expert_bytes, resident_bytes), resident_bytes, expert_bytes)
        if slots < minimum:
            raise ExpertflowError(f"--memory-budget {self.text} leaves room for {slots} experts after "
                                  f"{resident_bytes / 2**20:.2f} MiB of non-expert weights; the bench needs at least "
                                  f"{minimum} (one token's experts in every layer)")
        return min(slots, total)

    def budget_bytes(self, total: int, expert_bytes: int, resident_bytes: int) -> int:
        """A whole-tier budget in bytes, for a model whose every weight in memory takes
        total x expert_bytes + resident_bytes."""
        if self.text.endswith("%"):
            return int((total * expert_bytes + resident_bytes) * float(self.text[:-1]) / 100)
        return parse_size(self.text)

    @classmethod
    def parse(cls, text: str, whole_tier: bool = False) -> "CacheSize":
        text = text.strip()
        flag = "--memory-budget" if whole_tier else "--cache-experts"
        if whole_tier and not text.endswith("%"):
            if parse_size(text) < 1:
                raise ExpertflowError(f"{flag} {text!r} must be positive")
            return cls(text, whole_tier)
        try:
            value = float(text[:-1]) if text.endswith("%") else int(text)
        except ValueError:
            example = "a size like 200MiB or a share like 10%" if whole_tier else "a count like 26 or a share like 10%"
            raise ExpertflowError(f"cannot read {flag} {text!r}; write {example}") from None
        if value <= 0 or (text.endswith("%") and value > 100):
            raise ExpertflowError(f"{flag} {text!r} must be a positive count or a share in (0, 100]%")
        return cls(text, whole_tier)


@dataclass
class BenchConfig:
    """One sweep: every system x cache size x batch size on the same prompts and greedy decoding."""

    model: Path
    systems: list[str]
    cache_sizes: list[CacheSize]
    batch_sizes: list[int]
    out: Path
    store: str | None = None           # None: the device's own slow tier (disk on a CPU, host RAM on CUDA)
    device: str = "cpu"                # where every system computes (cuda[:N]: the fast tier is GPU memory)
    page_cache: bool = False           # disk reads through the OS page cache (default: bypassed, O_DIRECT else DONTNEED)
    dtype: str = "auto"                # every system's weights: auto is the checkpoint's own, as transformers loads it
    predictor: Path | None = None      # the RPP the `expertflow` system plans and schedules from
    scheduler: str = "exhaustive"      # the token scheduler of the `expertflow` system
    schedule_unit: int = 2
    max_new_tokens: int = 32
    threads: int = 1
    io_threads: int = 1                # expert transfers at once for engine systems whose policy prefetches
    policy_settings: dict = field(default_factory=dict)  # the `expertflow` system's PLECConfig knobs ({}: defaults)
    repeats: int = 1                   # whole sweeps run one after another; each point reports its median
    dataset: str = "custom"
    notes: dict = field(default_factory=dict)  # provenance shown in results (widening, costs, ...)

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise ExpertflowError(f"unknown system {unknown[0] if unknown else '(none)'!r}; choose from "
                                  f"{', '.join(SYSTEMS)}")
        if len(set(self.systems)) != len(self.systems):
            raise ExpertflowError("--systems names a system twice")
        if not self.cache_sizes:
            raise ExpertflowError("give at least one --cache-experts size")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ExpertflowError(f"--batch-size values must be at least 1, got {self.batch_sizes}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ExpertflowError(f"unknown device {self.device!r}; choose cpu or cuda[:N]")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ExpertflowError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        if self.store is None:
            self.store = default_store(self.device)
        if self.store not in STORE_NAMES:
            raise ExpertflowError(f"unknown store {self.store!r}; choose host or disk")
        if self.scheduler not in ENGINE_SCHEDULERS:
            raise ExpertflowError(f"unknown scheduler {self.scheduler!r}; choose {' or '.join(ENGINE_SCHEDULERS)}")
        if min(self.max_new_tokens, self.threads, self.io_threads, self.schedule_unit, self.repeats) < 1:
            raise ExpertflowError("--max-new-tokens, --threads, --io-threads, --schedule-unit and --repeats must be "
                                  "at least 1")
        planning = [s for s in self.systems if plans_from_forecast(s)]
        if self.policy_settings:
            if not planning:
                raise ExpertflowError("--prefetch-threshold and --policy-setting apply to system expertflow; "
                                      "add it to --systems")
            policy_settings("expertflow", self.policy_settings)
        if planning and self.predictor is None:
            raise ExpertflowError(f"system {planning[0]} plans from a routing predictor; pass --predictor DIR "
                                  "(train one with expertflow train-predictor)")
        self.model = Path(self.model)
        self.out = Path(self.out)
        if self.dtype == "auto":
            self.dtype = stored_dtype(self.model)
        if self.dtype not in DTYPES:
            raise ExpertflowError(f"bench runs float32, bfloat16 or float16 weights, not {self.dtype}; pass --dtype")


@dataclass(frozen=True)
class RunSpec:
    """One measured run, handed to a worker subprocess as JSON."""

    system: str
    model: str
    cache_experts: int | None          # None: the system keeps every expert in memory
    batch_size: int
    prompts: list[list[int]]
    max_new_tokens: int
    store: str = "disk"
    device: str = "cpu"
    page_cache: bool = False
    dtype: str = "float32"
    predictor: str | None = None
    scheduler: str = "fifo"
    schedule_unit: int = 2
    threads: int = 1
    io_threads: int = 1
    policy_settings: dict = field(default_factory=dict)
    offload_dir: str | None = None     # scratch directory for accelerate's offload_folder
    # A whole-tier budget in bytes: an engine system sizes its slots from it as `generate --memory-budget`
    # does (a slot can hold spare room for zero-copy reads), so its row's cache_experts is the engine's count.
    memory_budget: int | None = None

    def batches(self) -> list[list[list[int]]]:
        """The prompts as batches of `batch_size`, in prompt order (systems without a token scheduler)."""
        return [self.prompts[i : i + self.batch_size] for i in range(0, len(self.prompts), self.batch_size)]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RunSpec":
        return cls(**data)
