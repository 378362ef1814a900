"""Engine configuration: one validated dataclass that every front end (CLI, API, bench) builds."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expertflow.checkpoint import stored_dtype
from expertflow.embedded import EMBEDDED_MODEL_DIR, shipped_predictor_for
from expertflow.errors import ExpertflowError
from expertflow.hub import resolve_model
from expertflow.cache.policies import policy_class, policy_settings
from expertflow.cache.stores import STORES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORE_NAMES = tuple(STORES)   # the store registry's names: --store's choices and this config's check
DEVICE_TYPES = ("cpu", "cuda")
EXPERTS_IMPLEMENTATIONS = ("auto", "eager", "grouped_mm", "batched_mm")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_size(text: str) -> int:
    """'2GiB', '512MB', '1.5g', '4096' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ExpertflowError(f"cannot read size {text!r}; write it like 2GiB, 512MiB, 300MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human_bytes(n: float) -> str:
    """Bytes as people read them: 512 B, 1.5 KiB, 3.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def slots_within(memory_budget: int, resident_bytes: int, expert_bytes: int) -> int:
    """Expert slots a whole fast-tier budget buys once the non-expert weights are in."""
    return max(memory_budget - resident_bytes, 0) // expert_bytes


def default_store(device: str) -> str:
    """The slow tier that fits the device: on a CPU the fast tier is RAM itself, so a host-RAM store would hold every
    expert in the memory the budget is meant to bound; the disk store keeps them in the files. On CUDA, host RAM is
    the slow tier beside GPU memory."""
    return "disk" if device.split(":")[0] == "cpu" else "host"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@dataclass
class EngineConfig:
    """What to run and under which fast-tier budget.

    The budget is one of: expert slots (`cache_experts`), bytes for expert slots (`cache_bytes`), or bytes
    for the whole fast tier (`memory_budget`: every non-expert weight, then as many expert slots as fit).
    Without one the policy defaults to `none` (all-resident: every expert resident); with one, to `lru`.
    """

    model: Path = EMBEDDED_MODEL_DIR
    cache_experts: int | None = None
    cache_bytes: int | None = None
    memory_budget: int | None = None
    policy: str | None = None
    store: str | None = None               # None: disk on a CPU device (its fast tier is RAM itself), host on CUDA
    device: str = "cpu"
    dtype: str = "auto"                    # auto: the checkpoint's own (config.json's dtype), as transformers does
    predictor: Path | None = None          # a trained RPP directory (policy expertflow plans from it); the
                                           # embedded model's own when it runs a forecasting policy
    transfer_ratio: float | None = None    # expert loads issued per layer window; None = no limit
    page_cache: bool = False               # disk store: read through the OS page cache (default: bypass it, so the
                                           # budget bounds the memory the run takes and every fetch reads the disk)
    io_threads: int = 1                    # expert transfers run at once (a device serving parallel reads gains)
    experts_implementation: str = "auto"   # whose arithmetic the experts reproduce bit for bit: auto is transformers'
                                           # default for the model (grouped_mm), or eager, grouped_mm, batched_mm
    policy_settings: dict[str, float] = field(default_factory=dict)  # the policy's knobs, e.g. PLEC's
                                           # {"threshold": 0.2}; empty: its defaults

    def __post_init__(self) -> None:
        self.model = resolve_model(self.model)  # a directory, or a hub id's snapshot in the Hugging Face cache
        if self.predictor is not None:
            self.predictor = Path(self.predictor).expanduser()
            if not self.predictor.is_dir():
                raise ExpertflowError(f"predictor directory {self.predictor} does not exist; train one with "
                                      "expertflow train-predictor --out DIR")
        if self.transfer_ratio is not None and self.transfer_ratio <= 0:
            raise ExpertflowError(f"--transfer-ratio must be positive (expert loads per layer), got {self.transfer_ratio}")
        budgets = [flag for flag, value in (("--cache-experts", self.cache_experts), ("--cache-bytes", self.cache_bytes),
                                            ("--memory-budget", self.memory_budget)) if value is not None]
        if len(budgets) > 1:
            raise ExpertflowError(f"give one fast-tier budget, not both {budgets[0]} and {budgets[1]}")
        if self.cache_experts is not None and self.cache_experts < 1:
            raise ExpertflowError(f"--cache-experts must be at least 1, got {self.cache_experts}")
        if self.cache_bytes is not None and self.cache_bytes < 1:
            raise ExpertflowError(f"--cache-bytes must be positive, got {self.cache_bytes}")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ExpertflowError(f"--memory-budget must be positive, got {self.memory_budget}")
        if self.store is None:
            self.store = default_store(self.device)
        if self.store not in STORE_NAMES:
            raise ExpertflowError(f"unknown store {self.store!r}; choose one of {', '.join(STORE_NAMES)}")
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ExpertflowError(f"unknown experts implementation {self.experts_implementation!r}; choose one of "
                                  f"{', '.join(EXPERTS_IMPLEMENTATIONS)}")
        if self.io_threads < 1:
            raise ExpertflowError(f"--io-threads must be at least 1 (expert reads run at once), got {self.io_threads}")
        if self.page_cache and self.store != "disk":
            raise ExpertflowError("--page-cache applies to --store disk only (the host store reads no file after loading)")
        if self.dtype == "auto":
            self.dtype = stored_dtype(self.model)
            if self.dtype not in DTYPES:
                raise ExpertflowError(f"{self.model} stores its weights as {self.dtype}, which expertflow does not "
                                      f"compute in; pass --dtype {' or '.join(DTYPES)}")
        if self.dtype not in DTYPES:
            raise ExpertflowError(f"unknown dtype {self.dtype!r}; choose auto or one of {', '.join(DTYPES)}")
        device_type = self.device.split(":")[0]
        if device_type not in DEVICE_TYPES:
            raise ExpertflowError(f"unknown device {self.device!r}; choose cpu or cuda")
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ExpertflowError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        if self.policy is None:
            # `none` is all-resident's alias, the name this default has always been reported by (outputs say it)
            self.policy = "none" if not budgets else "lru"
        policy_settings(self.policy, self.policy_settings)  # fails now, naming the knob, not at load time
        if self.predictor is None and policy_class(self.policy).uses_forecast:
            self.predictor = shipped_predictor_for(self.model)  # shipped with the package for exactly this routing

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def capacity(self, num_experts_total: int, expert_bytes: int, resident_bytes: int, minimum: int) -> int:
        """Cache slots this budget buys: explicit count, bytes // expert size, what the whole-tier budget
        leaves after the `resident_bytes` of non-expert weights (at most every expert), or every expert.
        `minimum`: the policy's fewest slots, which a memory budget must leave room for."""
        if self.cache_experts is not None:
            return self.cache_experts
        if self.cache_bytes is not None:
            return min(self.cache_bytes // expert_bytes, num_experts_total)
        if self.memory_budget is not None:
            slots = slots_within(self.memory_budget, resident_bytes, expert_bytes)
            if slots < minimum:
                needed = resident_bytes + minimum * expert_bytes
                raise ExpertflowError(
                    f"--memory-budget {_mib(self.memory_budget)} leaves room for {slots} experts after "
                    f"{_mib(resident_bytes)} of non-expert weights; policy {self.policy!r} needs {minimum} "
                    f"({_mib(expert_bytes)} each): use --memory-budget {math.ceil(needed / 2**20)}MiB or more")
            return min(slots, num_experts_total)
        return num_experts_total

    def capped_note(self, num_experts_total: int, expert_bytes: int, resident_bytes: int) -> str | None:
        """What to tell a user whose byte budget holds more than every expert: it was capped, not refused."""
        needed = num_experts_total * expert_bytes
        if self.cache_bytes is not None and self.cache_bytes > needed:
            return (f"--cache-bytes {_mib(self.cache_bytes)} is more than every expert takes ({_mib(needed)}): "
                    f"all {num_experts_total} experts are resident")
        if self.memory_budget is not None and self.memory_budget > needed + resident_bytes:
            return (f"--memory-budget {_mib(self.memory_budget)} is more than the whole model takes "
                    f"({_mib(needed + resident_bytes)}): all {num_experts_total} experts are resident")
        return None
